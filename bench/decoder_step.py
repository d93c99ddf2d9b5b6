"""Decoder training-step speed on cached features: flaxcap's Decoder against naive baselines.

One jitted train step = teacher-forced decoder forward + `caption_loss` + backward + optax Adam update,
with dropout on, on random cached features (default 7x7x1280, EfficientNet-Lite0's last stage).

Variants, all measured in the same process on the same batch:
  flaxcap        `flaxcap.decoder.Decoder`: features projected once, embeddings' gate input and the whole
                 deep output + vocabulary layer hoisted out of an `nn.scan` whose body holds two matmuls.
  naive_scan     the textbook cell under `nn.scan`: each step looks up its word, projects the features
                 (unless XLA hoists it), runs `nn.LSTMCell` on [embedding; context] and the vocabulary layer.
  naive_unrolled the same cell in a Python loop over time (unrolled into one graph); not run by default:
                 on the CPU it compiles for minutes (21 copies of the step, each with its dropout keys).

    python bench/decoder_step.py --steps=3
Prints a table and writes JSON (default bench/results/decoder_step.json).
"""

import functools
import json
import os
import pathlib
import platform
import sys
import time

from absl import app
from absl import flags
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flaxcap import decoder as decoder_lib  # noqa: E402
from flaxcap import model as model_lib  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 64, "Captions per train step.")
_GRID = flags.DEFINE_integer("grid", 7, "Feature grid side (P = grid^2).")
_CHANNELS = flags.DEFINE_integer("channels", 1280, "Feature channels C.")
_MAX_LEN = flags.DEFINE_integer("max_len", 22, "Caption tokens incl. <bos>/<eos>; T = max_len - 1.")
_VOCAB = flags.DEFINE_integer("vocab", 3000, "Vocabulary size V.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding, hidden and attention size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps per variant (after one warm-up step).")
_VARIANTS = flags.DEFINE_list("variants", ["flaxcap", "naive_scan"],
                              "What to time: flaxcap, naive_scan, naive_unrolled.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OUTPUT = flags.DEFINE_string("output", "bench/results/decoder_step.json", "Where the JSON goes.")


class NaiveCell(nn.Module):
  """One step written the straightforward way: everything per step, flax's LSTMCell."""
  vocab_size: int
  dim: int
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, carry, features, tokens, deterministic):
    embedded = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)  # [batch, E]
    c, h = carry
    projected = nn.Dense(self.dim, name="feature_att")(features)  # [batch, P, A], every step
    scores = nn.Dense(1, use_bias=False, name="score")(
        jnp.tanh(projected + nn.Dense(self.dim, name="hidden_att")(h)[:, None]))[..., 0]
    attention = jax.nn.softmax(scores, axis=-1)
    context = jnp.sum(attention[..., None] * features, axis=1)  # [batch, C]
    context = jax.nn.sigmoid(nn.Dense(1, name="gate")(h)) * context
    (c, h), _ = nn.LSTMCell(self.dim, name="lstm")((c, h), jnp.concatenate([embedded, context], -1))
    dropout = nn.Dropout(self.dropout_rate)
    out = nn.Dense(self.dim, name="hidden_out")(dropout(h, deterministic=deterministic))
    out = out + nn.Dense(self.dim, use_bias=False, name="context_out")(context) + embedded
    logits = nn.Dense(self.vocab_size, name="logits")(dropout(jnp.tanh(out), deterministic=deterministic))
    return (c, h), (logits, attention)


class NaiveDecoder(nn.Module):
  """The naive cell over time, by `nn.scan` or by an unrolled Python loop."""
  vocab_size: int
  dim: int
  unrolled: bool = False

  @nn.compact
  def __call__(self, features, input_tokens, *, deterministic):
    features = einops.rearrange(features, "b h w c -> b (h w) c")
    mean = jnp.mean(features, axis=1)
    carry = (jnp.tanh(nn.Dense(self.dim, name="init_c")(mean)),
             jnp.tanh(nn.Dense(self.dim, name="init_h")(mean)))
    if self.unrolled:
      cell = NaiveCell(self.vocab_size, self.dim, name="cell")
      outputs = []
      for t in range(input_tokens.shape[1]):
        carry, out = cell(carry, features, input_tokens[:, t], deterministic)
        outputs.append(out)
      logits, attention = (jnp.stack(x, axis=1) for x in zip(*outputs))
      return logits, attention
    scan = nn.scan(NaiveCell, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   in_axes=(nn.broadcast, 1, nn.broadcast), out_axes=1)
    _, (logits, attention) = scan(self.vocab_size, self.dim, name="cell")(
        carry, features, input_tokens, deterministic)
    return logits, attention


def make_decoder(variant: str, dtype):
  dim, vocab = _DIM.value, _VOCAB.value
  if variant == "flaxcap":
    return decoder_lib.Decoder(vocab_size=vocab, embed_dim=dim, hidden_dim=dim, attention_dim=dim,
                               dropout_rate=0.5, dtype=dtype)
  if dtype != jnp.float32:
    raise app.UsageError("the naive baselines run in float32 only")
  return NaiveDecoder(vocab_size=vocab, dim=dim, unrolled=variant == "naive_unrolled")


def time_variant(variant, features, tokens, dtype):
  decoder = make_decoder(variant, dtype)
  inputs, targets = model_lib.teacher_forcing_tokens(tokens)
  key = jax.random.key(0)
  params = jax.jit(functools.partial(decoder.init, deterministic=True))(key, features, inputs)["params"]
  optimizer = optax.adam(4e-4)
  opt_state = optimizer.init(params)

  def train_step(params, opt_state, dropout_key):
    def loss_fn(params):
      logits, attention = decoder.apply({"params": params}, features, inputs, deterministic=False,
                                        rngs={"dropout": dropout_key})
      return model_lib.caption_loss(logits, targets, attention, alpha_c=1.0)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, key).compile()
  compile_s = time.perf_counter() - start
  params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, 0))  # warm-up
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, i + 1))
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - start) / _STEPS.value
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return {"variant": variant, "compile_s": compile_s, "step_s": step_s,
          "captions_per_s": _BATCH.value / step_s, "loss": float(loss), "num_params": int(num_params)}


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(_BATCH.value, _GRID.value, _GRID.value, _CHANNELS.value)),
                         jnp.float32)
  lengths = rng.integers(8, _MAX_LEN.value - 1, size=_BATCH.value)  # words; + <bos>, <eos>
  tokens = np.zeros((_BATCH.value, _MAX_LEN.value), np.int32)
  for i, length in enumerate(lengths):
    tokens[i, :length + 2] = [1, *rng.integers(4, _VOCAB.value, size=length), 2]
  tokens = jnp.asarray(tokens)

  results = [time_variant(variant, features, tokens, dtype) for variant in _VARIANTS.value]
  baseline = next((r for r in results if r["variant"] != "flaxcap"), None)
  print(f"\ndecoder train step (fwd+bwd+adam), batch {_BATCH.value}, features {_GRID.value}x{_GRID.value}x"
        f"{_CHANNELS.value}, T={_MAX_LEN.value - 1}, V={_VOCAB.value}, dim {_DIM.value}, {_DTYPE.value}, "
        f"{jax.devices()[0].device_kind}, {_STEPS.value} timed steps\n")
  reference = baseline["variant"] if baseline else "-"
  print(f"{'variant':<16}{'compile s':>10}{'step ms':>10}{'captions/s':>12}  speed-up vs {reference}")
  for r in results:
    speedup = baseline["step_s"] / r["step_s"] if baseline else float("nan")
    r["speedup_vs_baseline"] = speedup
    print(f"{r['variant']:<16}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>10.0f}"
          f"{r['captions_per_s']:>12.1f}{speedup:>9.2f}x")

  report = {
      "benchmark": "decoder_step",
      "config": {"batch": _BATCH.value, "grid": _GRID.value, "channels": _CHANNELS.value,
                 "max_len": _MAX_LEN.value, "vocab": _VOCAB.value, "dim": _DIM.value,
                 "dtype": _DTYPE.value, "steps": _STEPS.value},
      "baseline": reference, "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
      "results": results,
  }
  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(report, indent=2))
  print(f"\nwrote {output}")


if __name__ == "__main__":
  app.run(main)
