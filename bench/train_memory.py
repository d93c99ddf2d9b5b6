"""What a decoder train step keeps for its backward pass: XLA's temporary memory, per activation rule.

The teacher-forced scan keeps, for the backward pass, tensors of every time step; the attention's
are the large ones ([batch, P, A] each: 51 MiB a step at batch 128, fp32, the tutorial's 14x14 grid,
21 steps). This compiles the decoder's loss and gradient (no optimizer; compiling only, nothing runs)
in each of these ways in one process and reports the compiled program's temporary memory (XLA's
`memory_analysis`, the same number on any backend for the same program; a GPU's peak adds the
arguments and outputs) and the scan's per-step tensors of the attention's size:

  jax_tanh     the attention's tanh as `jnp.tanh` (flaxcap before session 16): jax's gradient rule
               g (1 + y)(1 - y) keeps y and 1 - y
  flaxcap      the default: `layers.tanh` keeps y only (the gradient from it, in float32)
  recompute    `config.decoder.recompute_attention`: none kept, the backward pass recomputes them
  late_grad, recompute+late_grad   `config.decoder.late_projected_grad`: the projected features'
               gradient summed after the backward scan (`flaxcap/attention_grad.py`)

With --repeats=N the compiled gradients also run, on random features and tokens, the variants
taking turns N times (median seconds, and the ratio to jax_tanh: the same process, the same inputs).

    python3 bench/train_memory.py --output=docs/benchmarks/cpu/train_memory.json   # ~1 minute
    python3 bench/train_memory.py --batch_sizes=32 --dtypes=float32 --repeats=5     # and timings
"""

import functools
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoder as decoder_lib  # noqa: E402
from flaxcap import layers  # noqa: E402

_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "32,128", "Comma-separated batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_SIZES = flags.DEFINE_enum("sizes", "tutorial", sorted(workloads.SIZES), "Feature grid and sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 0,
                                "Timed calls of each variant, taking turns (0: compile only).")
_OUTPUT = flags.DEFINE_string("output", "train_memory", "JSON path, or a name under bench/results/.")

# variant -> (the attention's tanh, Decoder options)
VARIANTS = {"jax_tanh": (jnp.tanh, {}), "flaxcap": (layers.tanh, {}),
            "recompute": (layers.tanh, {"recompute_attention": True}),
            "late_grad": (layers.tanh, {"late_projected_grad": True}),
            "recompute+late_grad": (layers.tanh, {"recompute_attention": True,
                                                  "late_projected_grad": True})}

COLUMNS = [common.Column("variant", "variant"), common.Column("dtype", "dtype"),
           common.Column("batch", "batch"), common.Column("temp_mib", "temp MiB", ",.0f"),
           common.Column("vs_jax_tanh", "vs jax_tanh", ".2f"),
           common.Column("attention_residuals", "kept a step"),
           common.Column("attention_residual_mib", "kept MiB", ",.0f"),
           common.Column("seconds", "s/step", ".3f"),
           common.Column("speedup", "speed vs jax_tanh", ".2f")]


def _scan_residuals(loss, *args):
  """Shapes and dtypes of what the forward scan returns for the backward pass (its stacked outputs)."""
  jaxpr = jax.make_jaxpr(jax.grad(loss))(*args).jaxpr
  forward_scan = next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan")
  return [v.aval for v in forward_scan.outvars]


def measure(sizes, dtype: str, batch: int, variant: str) -> tuple[dict, object]:
  """(row, the compiled gradient function of (params, features, tokens))."""
  tanh, options = VARIANTS[variant]
  activations = layers.ATTENTION_ACTIVATIONS
  original, activations["tanh"] = activations["tanh"], tanh  # read while tracing
  try:
    decoder = decoder_lib.Decoder(vocab_size=sizes.vocab, embed_dim=sizes.dim, hidden_dim=sizes.dim,
                                  attention_dim=sizes.dim, dropout_rate=0.0,
                                  dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                                  **options)
    features = jax.ShapeDtypeStruct((batch, sizes.grid, sizes.grid, sizes.channels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, sizes.max_len - 1), jnp.int32)
    params = jax.eval_shape(functools.partial(decoder.init, deterministic=True),
                            jax.random.key(0), features, tokens)["params"]

    def loss(params, features, tokens):
      logits, attention = decoder.apply({"params": params}, features, tokens, deterministic=True)
      return jnp.mean(logits ** 2) + jnp.mean(attention ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, features, tokens).compile()
    attention_shape = (sizes.max_len - 1, batch, 1, sizes.locations, sizes.dim)
    kept = [aval for aval in _scan_residuals(loss, params, features, tokens)
            if tuple(aval.shape) == attention_shape]
  finally:
    activations["tanh"] = original
  return {"variant": variant, "dtype": dtype, "batch": batch,
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
          "attention_residuals": len(kept),
          "attention_residual_mib": sum(a.size * a.dtype.itemsize for a in kept) / 2**20}, compiled


def time_turns(compiled: dict, sizes, batch: int, repeats: int) -> dict:
  """Median seconds of each compiled gradient, the variants taking turns `repeats` times."""
  features = jnp.asarray(workloads.random_features(batch, sizes))
  tokens = jnp.asarray(workloads.random_tokens(batch, sizes)[:, :-1])
  any_fn = next(iter(compiled.values()))
  params = jax.tree.map(lambda spec: jax.random.normal(jax.random.key(0), spec.shape, spec.dtype) * 0.05,
                        any_fn.args_info[0][0], is_leaf=lambda x: hasattr(x, "shape"))
  for fn in compiled.values():  # warm-up
    jax.block_until_ready(fn(params, features, tokens))
  times = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, features, tokens))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def main(argv):
  del argv
  sizes = workloads.SIZES[_SIZES.value]
  info = common.machine(torch_too=False)
  rows = []
  for dtype in _DTYPES.value:
    for batch in common.int_list(_BATCH_SIZES.value):
      baseline, compiled, batch_rows = None, {}, []
      for variant in VARIANTS:
        row, compiled[variant] = measure(sizes, dtype, batch, variant)
        baseline = baseline or row["temp_mib"]
        row["vs_jax_tanh"] = row["temp_mib"] / baseline
        batch_rows.append(row)
        print(row, flush=True)
      if _REPEATS.value:
        seconds = time_turns(compiled, sizes, batch, _REPEATS.value)
        for row in batch_rows:
          row.update(seconds=seconds[row["variant"]],
                     speedup=seconds["jax_tanh"] / seconds[row["variant"]])
      rows += batch_rows
  common.print_table(rows, COLUMNS, title=(
      f"decoder loss + gradient compiled ({sizes.grid}x{sizes.grid}x{sizes.channels}, "
      f"{sizes.max_len - 1} steps): XLA's temporary memory; {common.machine_line(info)}"))
  common.write_json(_OUTPUT.value, {"benchmark": "train_memory", "machine": info,
                                    "sizes": _SIZES.value, "rows": rows})


if __name__ == "__main__":
  app.run(main)
