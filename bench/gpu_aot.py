"""Issue 8 without a GPU: flaxcap's GPU programs compiled for an H100 here, and their kernels counted.

XLA compiles for a GPU it is not running on ("deviceless" ahead-of-time compilation: a PJRT topology
built from a target description, `H100_TARGET` below). The compiled HLO says what a beam-search step or
a train step launches on the card: its fusions, GEMMs and Pallas kernels, each one kernel, in the
order they run, and the step's temporary memory. It cannot say how long any takes (no autotuning, no
timing: the GEMMs' tilings are the heuristic's, and where the device's autotuner picks cuBLAS, a
profile names an `nvjet` kernel for a `gemm_fusion` here). Kernel names are XLA's, as a profile on
the device names them, with `.` for `_` and numbering that may differ.

    pip install "jax-cuda12-plugin[with-cuda]==$(python3 -c 'import jax; print(jax.__version__)')"
    python3 bench/gpu_aot.py                                    # the probe's default variants
    python3 bench/gpu_aot.py --parts=beam256 --beam256_variants=main,scorek_approx --list_kernels

The plugin (CUDA 12 libraries, ~3 GB) is for this script only: nothing else needs it, and it is not in
requirements. The variants are bench/probe_gpu9.py's (the same names and options), so a variant
prepared here can be timed there when a GPU is lent. A row: kernels per loop iteration (the search's
step; the train step's forward and backward scans), kernels outside loops, the compiled program's
temporary memory, and the HLO file (--hlo_dir, bench/results/gpu_aot/hlo_<part>_<variant>.txt).
"""

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import pathlib
import re
import sys
import time
import types

if __name__ == "__main__":  # before jax is imported (tests import the module for its parsers)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing on a GPU: it compiles for one
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin's check needs a driver

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
try:
  import ml_collections  # noqa: F401  pylint: disable=unused-import
except ImportError:  # as bench/probe_gpu9.py: train_lib imports it, nothing here uses it
  sys.modules["ml_collections"] = types.ModuleType("ml_collections")

import jax  # noqa: E402
from jax import export  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench import hlo_kernels  # noqa: E402
from bench import probe_gpu9  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoding  # noqa: E402
from flaxcap import model as model_lib  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
# The card issue 8's targets name, as XLA's GPU compiler describes a device (its public spec: 132
# SMs, 50 MB of L2, 3.35 TB/s, sm_90).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
PARTS = {"beam256": 256, "beam1": 1, "train_bf16": ("bfloat16", 512), "train_fp32": ("float32", 128)}
COLUMNS = [common.Column("part", "part"), common.Column("variant", "variant"),
           common.Column("loop_kernels", "kernels a loop iteration"),
           common.Column("loop_mb", "MB an iteration"),
           common.Column("entry_kernels", "outside loops", ","),
           common.Column("pallas_kernels", "Pallas", ","),
           common.Column("temp_mib", "temp MiB", ",.0f"), common.Column("compile_s", "compile s", ".1f")]


class Target:
  """An H100 to compile for: `sharded` turns shape structs into inputs placed on it, and `compile`
  traces a function as on that GPU (the library's GPU choices, Pallas' Triton lowering) and compiles
  it for the card."""

  def __init__(self):
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                              topology="1x1x1")
    except Exception as e:  # pylint: disable=broad-except
      sys.exit(f"gpu_aot.py: XLA's GPU compiler is not available ({e!r:.200}); {_missing_compiler_hint()}")
    self.mesh = topologies.make_mesh(topology, (1,), ("gpu",))
    device = jax.sharding.AbstractDevice(device_kind=H100, num_cores=None, platform="gpu")
    self.abstract_mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Auto,),
                                                   abstract_device=device)

  def sharded(self, tree):
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), tree)

  def compile(self, function, *shapes):
    """`function` (jitted) traced as on a GPU and compiled for the H100: a `jax.stages.Compiled`.

    Tracing under an abstract H100 lowers the Pallas kernels for it (Triton custom calls); the
    exported module is then compiled as one program on the topology's device.
    """
    with as_gpu(), jax.sharding.use_abstract_mesh(self.abstract_mesh):
      exported = export.export(
          function, platforms=["cuda"],
          disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    return jax.jit(exported.call).lower(*self.sharded(shapes)).compile()


def _missing_compiler_hint() -> str:
  """What to do where the topology is not there: install the plugin, or let it start without a GPU."""
  if importlib.util.find_spec("jax_plugins") is None or not any(
      importlib.util.find_spec(f"jax_plugins.xla_cuda{version}") for version in (12, 13)):
    return "install jax's CUDA plugin as this script's docstring says"
  return ("jax's CUDA plugin is installed but did not start: on a machine without a GPU, set "
          "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts (its check needs a driver)")


@contextlib.contextmanager
def as_gpu():
  """flaxcap picks its GPU paths where `jax.default_backend()` says "gpu" (read while tracing)."""
  original = jax.default_backend
  jax.default_backend = lambda: "gpu"
  try:
    yield
  finally:
    jax.default_backend = original


def beam_program(target: Target, batch: int, variant: str, *, beam: int = 5, max_len: int = 20):
  """bench/probe_gpu9.py's `beam_part` search of `variant` (lite0 sizes, bf16), compiled."""
  sizes = workloads.SIZES["lite0"]
  _, unroll, early_stop = probe_gpu9.BEAM_VARIANTS[variant]
  decoder = probe_gpu9.make_decoder(sizes, "bfloat16", dropout=0.0,
                                    **probe_gpu9.BEAM_DECODER_OPTIONS.get(variant, {}))
  search_options = probe_gpu9.BEAM_SEARCH_OPTIONS.get(variant, {})
  params = jax.eval_shape(lambda: decoder.init(
      jax.random.key(0), jnp.zeros((1, sizes.locations, sizes.channels)),
      jnp.zeros((1, sizes.steps), jnp.int32), deterministic=True))["params"]
  table = jax.eval_shape(lambda p: decoder.apply({"params": p}, method="word_gate_table"), params)
  features = jax.ShapeDtypeStruct((batch, sizes.grid, sizes.grid, sizes.channels), jnp.float32)

  def search(params, table, features):
    return decoding.search(decoder, params, features, beam_size=beam, max_len=max_len,
                           unroll=unroll, word_gate_table=table, early_stop=early_stop,
                           **search_options)

  with probe_gpu9.top_k_settings(variant):
    return target.compile(jax.jit(search), params, table, features)


def train_program(target: Target, dtype: str, batch: int, variant: str):
  """bench/probe_gpu9.py's train step of `variant` (tutorial sizes), as `jax.pmap` runs it on one
  device (here `jax.vmap` over a device axis of 1, which names the same axis), compiled."""
  from flaxcap import train_lib  # pylint: disable=g-import-not-at-top  (ml_collections stand-in)
  sizes = workloads.SIZES["tutorial"]
  decoder = probe_gpu9.make_decoder(sizes, dtype, dropout=0.5, **probe_gpu9.TRAIN_VARIANTS[variant])
  model = model_lib.Captioner(encoder=None, decoder=decoder)

  def initial_state():
    variables = model.init(jax.random.key(0), jnp.zeros((1, sizes.locations, sizes.channels)),
                           jnp.zeros((1, sizes.steps), jnp.int32), deterministic=True,
                           method=model_lib.Captioner.decode_features)
    return workloads.flaxcap_train_state(probe_gpu9.optimizer_config(), model,
                                         {"params": variables["params"]})

  state = jax.eval_shape(initial_state)
  on_device_axis = lambda tree: jax.tree.map(  # noqa: E731
      lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype), tree)
  batch_shapes = {"image_index": jax.ShapeDtypeStruct((batch,), jnp.int32),
                  "tokens": jax.ShapeDtypeStruct((batch, sizes.max_len), jnp.int32)}
  table = jax.ShapeDtypeStruct((batch, sizes.locations, sizes.channels), jnp.float32)
  step = jax.vmap(functools.partial(train_lib.train_step, model=model, alpha_c=1.0,
                                    label_smoothing=0.0), axis_name=train_lib.AXIS)
  with probe_gpu9.attention_tanh(variant):
    return target.compile(jax.jit(step, donate_argnums=(0,)), on_device_axis(state),
                          on_device_axis(batch_shapes), on_device_axis(table))


def kernel_row(part: str, variant: str, text: str) -> dict:
  """Kernel counts of a compiled program's HLO text (bench/hlo_kernels.py's rules)."""
  counts, bodies, entry = hlo_kernels.parse(text)
  loops = [sum(counts[body].values()) for body in bodies if sum(counts[body].values())]
  pallas = sum(n for c in counts.values() for op, n in c.items() if "triton" in op)
  loop_megabytes = [b / 1e6 for b in loop_bytes(text)]
  return {"part": part, "variant": variant, "loop_kernels": " + ".join(map(str, loops)) or "0",
          "loop_mb": " + ".join(f"{b:,.0f}" for b in loop_megabytes) or "0",
          "loop_megabytes": loop_megabytes,
          "loop_kernel_counts": loops, "entry_kernels": sum(counts[entry].values()),
          "pallas_kernels": pallas,
          "loop_kernels_by_op": {body: dict(counts[body]) for body in bodies if counts[body]}}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_LINE = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([a-z\-]+)\((.*)$")


def _array_bytes(type_text: str) -> int:
  """Bytes of the arrays a result type names (a tuple's summed)."""
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(type_text))


def _computations(text: str) -> dict[str, list[tuple[str, str, str, str, bool]]]:
  """{computation: [(name, result type, opcode, operands and attributes, is_root)]}."""
  computations, current = {}, None
  for line in text.splitlines():
    line = hlo_kernels._COMMENT.sub("", line)  # pylint: disable=protected-access
    match = hlo_kernels._COMPUTATION.match(line)  # pylint: disable=protected-access
    if match:
      current = computations.setdefault(match.group(1), [])
      continue
    match = _LINE.match(line)
    if match and current is not None:
      current.append((*match.groups(), line.lstrip().startswith("ROOT")))
  return computations


def _fusion_bytes(instructions) -> int:
  """The bytes a fusion must move: each parameter read once (only the slices dynamic-slices read
  of it, through bitcasts; nothing of a buffer updated in place), each output written once (only
  the update of a dynamic-update-slice)."""
  by_name = {name: (result, opcode, rest) for name, result, opcode, rest, _ in instructions}

  def read(name, result):
    users = [(user, user_result, user_opcode, user_rest) for user, user_result, user_opcode,
             user_rest, _ in instructions if re.search(re.escape(name) + r"(?![\w.\-])", user_rest)]
    if not users or not all(u[2] in ("bitcast", "dynamic-slice", "dynamic-update-slice")
                            for u in users):
      return _array_bytes(result)
    total = 0
    for user, user_result, user_opcode, user_rest in users:
      if user_opcode == "bitcast":
        total += read(user, user_result)
      elif user_opcode == "dynamic-slice":
        total += _array_bytes(user_result)
      elif not user_rest.startswith(name):  # the update itself, not the buffer
        total += _array_bytes(result)
    return min(total, _array_bytes(result))

  total = sum(read(name, result) for name, result, opcode, _, _ in instructions
              if opcode == "parameter")
  roots = [entry for entry in instructions if entry[4]]
  outputs = re.findall(r"%[\w.\-]+", roots[0][3].split(")")[0]) if roots and roots[0][2] == "tuple" \
      else [roots[0][0]] if roots else []
  for output in outputs:
    while output in by_name and by_name[output][1] == "bitcast":
      output = re.findall(r"%[\w.\-]+", by_name[output][2])[0]
    result, opcode, rest = by_name.get(output, ("", "", ""))
    if opcode == "dynamic-update-slice":
      update = re.findall(r"%[\w.\-]+", rest)[1]
      total += _array_bytes(by_name.get(update, ("",))[0])
    else:
      total += _array_bytes(result)
  return total


def loop_kernel_bytes(text: str) -> dict[str, list[tuple[str, str, int]]]:
  """{while body: [(kernel, result type, bytes)]} for the while bodies that launch kernels, in
  order. Bytes: what the kernel must move by its operand and result shapes (`_fusion_bytes`; custom
  calls and copies: operands and results), a lower bound of its memory traffic, exact where every
  element is read once."""
  computations = _computations(text)
  counts, bodies, _ = hlo_kernels.parse(text)
  kernels = {}
  for body in (b for b in bodies if counts[b]):
    shapes = {name: result for name, result, *_ in computations[body]}
    rows = kernels[body] = []
    for name, result, opcode, rest, _ in computations[body]:
      if opcode == "fusion":
        moved = _fusion_bytes(computations[re.search(r"calls=%?([\w.\-]+)", rest).group(1)])
      elif opcode in hlo_kernels._KERNEL_OPCODES:  # pylint: disable=protected-access
        operands = re.findall(r"%[\w.\-]+", rest.split("), ")[0])
        moved = _array_bytes(result) + sum(_array_bytes(shapes.get(o, "")) for o in operands)
      else:
        continue
      rows.append((name, result, moved))
  return kernels


def loop_bytes(text: str) -> list[int]:
  """The bytes each while body's kernels must move an iteration (`loop_kernel_bytes`)."""
  return [sum(moved for *_, moved in rows) for rows in loop_kernel_bytes(text).values()]


def loop_kernels(text: str) -> list[str]:
  """One line per kernel launched in each while body: its name, output type and bytes."""
  lines = []
  for body, rows in loop_kernel_bytes(text).items():
    lines.append(f"while body {body}:")
    lines += [f"  {name[:48]:48s} {result[:60]:60s} {moved / 1e6:9.1f} MB"
              for name, result, moved in rows]
  return lines


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="beam256,beam1,train_bf16,train_fp32")
  for part, default in (("beam256", "main,xla_select,kseg_padded,scorek_approx,pad8,"
                                    "scorek_approx+pad8,noproj"),
                        ("beam1", "main,stop_while+kseg,scorek_approx"),
                        ("train_bf16", "main,late_grad,score_vjp,score_vjp+late_grad,"
                                       "score_vjp+late_grad+scorek_approx,score_vjp+late_grads,"
                                       "score_vjp+late_grads+scorek_approx,"
                                       "score_vjp+late_grads+scorek_approx+pad64"),
                        ("train_fp32", "main,late_grad,score_vjp+late_grad,"
                                       "score_vjp+late_grad+scorek_approx,score_vjp+late_grads,"
                                       "score_vjp+late_grads+scorek_approx,"
                                       "score_vjp+late_grads+scorek_approx+pad64,"
                                       "score_vjp+late_grads+scorek_approx+bf16_features")):
    known = probe_gpu9.BEAM_VARIANTS if part.startswith("beam") else probe_gpu9.TRAIN_VARIANTS
    parser.add_argument(f"--{part}_variants", default=default,
                        help=f"bench/probe_gpu9.py's names: {', '.join(known)}")
  parser.add_argument("--list_kernels", action="store_true",
                      help="print each loop iteration's kernels (name, output shape)")
  parser.add_argument("--output", default="gpu_aot",
                      help="JSON path, or a bare name: bench/results/<name>.json")
  parser.add_argument("--hlo_dir", default=str(common.RESULTS_DIR / "gpu_aot"),
                      help="where each program's HLO text goes (hlo_<part>_<variant>.txt)")
  args = parser.parse_args()
  for part in args.parts.split(","):
    if part not in PARTS:
      parser.error(f"--parts: unknown {part}; known: {', '.join(PARTS)}")
    known = probe_gpu9.BEAM_VARIANTS if part.startswith("beam") else probe_gpu9.TRAIN_VARIANTS
    unknown = [v for v in getattr(args, f"{part}_variants").split(",") if v not in known]
    if unknown:
      parser.error(f"--{part}_variants: unknown {', '.join(unknown)}")
  return args


def main():
  args = parse_args()
  target = Target()
  hlo_dir = pathlib.Path(args.hlo_dir)
  hlo_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for part in args.parts.split(","):
    for variant in getattr(args, f"{part}_variants").split(","):
      start = time.perf_counter()
      try:
        if part.startswith("beam"):
          compiled = beam_program(target, PARTS[part], variant)
        else:
          compiled = train_program(target, *PARTS[part], variant)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{part} {variant}: failed: {e!r:.300}", flush=True)
        rows.append({"part": part, "variant": variant, "error": repr(e)[:300]})
        continue
      text = compiled.as_text()
      path = hlo_dir / f"hlo_{part}_{variant}.txt"
      path.write_text(text)
      memory = compiled.memory_analysis()
      row = kernel_row(part, variant, text)
      row.update(compile_s=time.perf_counter() - start, hlo=str(path),
                 temp_mib=memory.temp_size_in_bytes / 2**20 if memory else None)
      rows.append(row)
      print(f"{part} {variant}: {row['loop_kernels']} kernels a loop iteration, "
            f"{row['entry_kernels']} outside, temp {row['temp_mib']:,.0f} MiB", flush=True)
      if args.list_kernels:
        print("\n".join(loop_kernels(text)), flush=True)
  common.print_table([r for r in rows if "error" not in r], COLUMNS,
                     title=f"compiled for an {H100} without one (jax {jax.__version__})")
  common.write_json(args.output, {"machine": common.machine(torch_too=False), "target": H100,
                                  "jax": jax.__version__, "rows": rows})


if __name__ == "__main__":
  main()
