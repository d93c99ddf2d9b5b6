"""Compiles flaxcap's Pallas kernels for an H100 without a GPU: registers, spills and waves per shape.

Pallas lowers `top_k_kernel.row_top_k`, `attention_kernel.attend` and
`attention_kernel.attention_scores` to Triton modules when jax
exports for a "cuda" target, on any machine. With the `triton` package (`pip install triton`: a development tool here, not a
requirement) this script compiles that module to PTX for sm_90a and runs the `ptxas` bundled with
triton on it, which reports what the kernel costs the GPU before one is lent:

  * registers per thread and spilled bytes (spills would make every round reload the row);
  * programs per SM (registers, threads) and the waves the grid takes on 132 SMs (H100 and H200);
  * for the score kernel, the machine code's instructions (SASS, from the bundled `cuobjdump`) per
    activation it computes: the whole kernel's static count over the elements one pass of its loop
    takes (a thread's share of [SCORE_BLOCK_P, SCORE_TILE] x K), with the exact tanh and with
    `tanh.approx.f32`. A kernel bound by issuing instructions runs in proportion to that count.

It does not time anything: the GPU probe (bench/probe_gpu9.py, variants `kernel`, `stop_while+kseg`,
`stop_while+kseg+fused`) does. The jaxlib on a GPU compiles the module with its own Triton, which may allocate differently.

    pip install triton   # once; ~290 MB
    python3 bench/triton_compile.py --output=docs/benchmarks/cpu/triton_compile.json
"""

import collections
import functools
import json
import pathlib
import re
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax  # noqa: E402
from jax import export  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from flaxcap import attention_kernel  # noqa: E402
from flaxcap import top_k_kernel  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["256x13000:10", "1x13000:10", "256x52000:10"],
                            "rows x row length : k (beam 5 x vocab 2,600 at batch 256 and 1; vocab "
                            "10,400 at batch 256, read in tiles)")
_WARPS = flags.DEFINE_list("num_warps", ["4", "8", "16"], "Triton warps per program")
_ATTENTION = flags.DEFINE_list("attention", ["256:bfloat16", "1:bfloat16", "256:float32"],
                               "attention_kernel.attend at beam search's sizes (7x7 grid, A 512, beam "
                               "5, context projections 2,560): batch : dtype")
_ATTENTION_WARPS = flags.DEFINE_list("attention_warps", ["4", "8"], "its Triton warps per program")
_SCORES = flags.DEFINE_list("scores", ["256:bfloat16", "256:float32"],
                            "attention_kernel.attention_scores at beam search's sizes (7x7 grid, A "
                            "512, beam 5): batch : dtype, each with the exact and the approximate tanh")
_SCORE_WARPS = flags.DEFINE_list("score_warps", ["2", "4", "8"], "its Triton warps per program")
_ARCH = flags.DEFINE_integer("arch", 90, "compute capability (90: H100, H200)")
_SMS = flags.DEFINE_integer("sms", 132, "streaming multiprocessors (132: H100 SXM, H200)")
_OUTPUT = flags.DEFINE_string("output", "triton_compile.json", "JSON path (bench/results/ if bare)")

_TRITON_CALL = "__gpu$xla.gpu.triton"
_REGISTERS_PER_SM, _THREADS_PER_SM, _PROGRAMS_PER_SM = 65536, 2048, 32

COLUMNS = [common.Column("rows", "rows"), common.Column("length", "row"), common.Column("k", "k"),
           common.Column("tile", "tile"), common.Column("num_warps", "warps"),
           common.Column("registers", "regs"), common.Column("spill_bytes", "spill B"),
           common.Column("programs_per_sm", "per SM"), common.Column("waves", "waves")]
SCORE_COLUMNS = [common.Column("rows", "batch"), common.Column("dtype", "dtype"),
                 common.Column("tanh", "tanh"), common.Column("num_warps", "warps"),
                 common.Column("registers", "regs"), common.Column("spill_bytes", "spill B"),
                 common.Column("programs_per_sm", "per SM"), common.Column("waves", "waves"),
                 common.Column("instructions_per_element", "instr/elem", ".1f"),
                 common.Column("mufu_per_element", "MUFU/elem", ".2f")]
ATTENTION_COLUMNS = [common.Column("rows", "batch"), common.Column("dtype", "dtype"),
                     common.Column("num_warps", "warps"), common.Column("registers", "regs"),
                     common.Column("spill_bytes", "spill B"), common.Column("shared_bytes", "shared B"),
                     common.Column("programs_per_sm", "per SM"), common.Column("waves", "waves")]


def triton_module(function, *shapes) -> str:
  """The Triton module Pallas lowers `function` (one kernel) to for a GPU, as MLIR text (no debug
  locations)."""
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  modules = []
  lower = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    export.export(jax.jit(function), platforms=["cuda"],
                  disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
                  )(*shapes)
  finally:
    lowering.lower_jaxpr_to_triton_module = lower
  if len(modules) != 1:
    raise RuntimeError(f"expected one Triton module, lowered {len(modules)}")
  return modules[0]


def ptxas_report(module_text: str, num_warps: int, arch: int, num_stages: int = 1) -> dict:
  """Compiles a Triton module to sm_<arch>a PTX and assembles it: registers, spills, shared memory,
  and the machine code's instructions by opcode (`sass_ops`)."""
  try:
    import triton  # pylint: disable=g-import-not-at-top
    from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("bench/triton_compile.py: needs the triton package (pip install triton)")
  with tempfile.TemporaryDirectory() as folder:
    source = pathlib.Path(folder) / "kernel.ttir"
    source.write_text(module_text)
    kernel = triton.compile(str(source), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = pathlib.Path(folder) / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # The newest bundled ptxas: triton's PTX may be a version the plain one does not read.
    ptxas = max(bin_dir.glob("ptxas*"), key=lambda p: len(p.name))
    cubin = pathlib.Path(folder) / "kernel.cubin"
    log = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
  registers = int(re.search(r"Used (\d+) registers", log).group(1))
  spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
  # Lines such as "/*0310*/  @!P0 MUFU.TANH R40, R0 ;": the opcode's first part.
  opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
  return {"registers": registers, "spill_bytes": spills, "shared_bytes": kernel.metadata.shared,
          "ptxas": ptxas.name, "sass_ops": dict(collections.Counter(opcodes).most_common())}


def _brief(row: dict) -> str:
  """A row as one JSON line, without its opcode counts (they are in the JSON file)."""
  return json.dumps({key: value for key, value in row.items() if key != "sass_ops"})


def occupancy(registers: int, num_warps: int) -> int:
  """Programs an SM holds at once, by registers (allocated per warp in units of 256) and threads."""
  per_warp = -(-registers * 32 // 256) * 256
  return min(_REGISTERS_PER_SM // (per_warp * num_warps), _THREADS_PER_SM // (32 * num_warps),
             _PROGRAMS_PER_SM)


def score_kernel_rows(batch: str, dtype: str) -> list[dict]:
  """`attention_kernel.attention_scores` at beam search's sizes, for each --score_warps and tanh."""
  batch, dtype, beams = int(batch), jnp.dtype(dtype), 5
  shapes = [jax.ShapeDtypeStruct(shape, d) for shape, d in [
      ((batch, 49, 512), dtype), ((batch, beams, 512), dtype), ((512,), jnp.float32)]]
  programs = batch * -(-49 // attention_kernel.SCORE_BLOCK_P)
  rows = []
  for approx in (False, True):
    activation = attention_kernel.kernel_activation("tanh", approx_tanh=approx)
    for num_warps in (int(n) for n in _SCORE_WARPS.value):
      module_text = triton_module(functools.partial(attention_kernel.attention_scores,
                                                    activation=activation, num_warps=num_warps),
                                  *shapes)
      report = ptxas_report(module_text, num_warps, _ARCH.value)
      per_sm = occupancy(report["registers"], num_warps)
      elements = attention_kernel.SCORE_BLOCK_P * attention_kernel.SCORE_TILE * beams / (32 * num_warps)
      row = {"rows": batch, "dtype": dtype.name, "tanh": "tanh.approx.f32" if approx else "exact",
             "num_warps": num_warps, **report, "programs_per_sm": per_sm,
             "waves": -(-programs // (per_sm * _SMS.value)) if per_sm else None,
             "elements_per_pass": elements,
             "instructions_per_element": sum(report["sass_ops"].values()) / elements,
             "mufu_per_element": report["sass_ops"].get("MUFU", 0) / elements}
      rows.append(row)
      print(_brief(row))
  return rows


def main(argv):
  del argv
  rows_out = []
  for shape in _SHAPES.value:
    size, k = shape.split(":")
    rows, length = (int(n) for n in size.split("x"))
    module_text = triton_module(lambda keys, k=int(k): top_k_kernel.row_top_k(keys, k),
                                jax.ShapeDtypeStruct((rows, length), jnp.int32))
    tile = min(1 << (length - 1).bit_length(), top_k_kernel.MAX_TILE)
    for num_warps in (int(n) for n in _WARPS.value):
      report = ptxas_report(module_text, num_warps, _ARCH.value)
      per_sm = occupancy(report["registers"], num_warps)
      row = {"rows": rows, "length": length, "k": int(k), "tile": tile, "num_warps": num_warps,
             **report, "programs_per_sm": per_sm,
             "waves": -(-rows // (per_sm * _SMS.value)) if per_sm else None}
      rows_out.append(row)
      print(_brief(row))
  common.print_table(rows_out, COLUMNS, title=(
      f"top_k_kernel.row_top_k compiled for sm_{_ARCH.value}a without a GPU ({_SMS.value} SMs)"))
  attention_rows = []
  for item in _ATTENTION.value:
    batch, dtype = item.split(":")
    batch, dtype = int(batch), jnp.dtype(dtype)
    shapes = [jax.ShapeDtypeStruct(shape, d) for shape, d in [
        ((batch, 49, 512), dtype), ((batch, 5, 512), dtype), ((512,), jnp.float32),
        ((batch, 49, 2560), dtype)]]
    for num_warps in (int(n) for n in _ATTENTION_WARPS.value):
      module_text = triton_module(functools.partial(attention_kernel.attend, num_warps=num_warps),
                                  *shapes)
      report = ptxas_report(module_text, num_warps, _ARCH.value, num_stages=2)
      per_sm = occupancy(report["registers"], num_warps)
      row = {"rows": batch, "dtype": dtype.name, "num_warps": num_warps, **report,
             "programs_per_sm": per_sm,
             "waves": -(-batch // (per_sm * _SMS.value)) if per_sm else None}
      attention_rows.append(row)
      print(_brief(row))
  common.print_table(attention_rows, ATTENTION_COLUMNS, title=(
      f"attention_kernel.attend (7x7 grid, A 512, beam 5, C 2,560) compiled for sm_{_ARCH.value}a"))
  score_rows = [row for item in _SCORES.value for row in score_kernel_rows(*item.split(":"))]
  common.print_table(score_rows, SCORE_COLUMNS, title=(
      "attention_kernel.attention_scores (7x7 grid, A 512, beam 5) compiled for "
      f"sm_{_ARCH.value}a; instructions per activation: the static count over one loop pass"))
  common.write_json(_OUTPUT.value, {
      "bench": "triton_compile", "machine": common.machine(torch_too=False),
      "triton": __import__("triton").__version__, "arch": _ARCH.value, "sms": _SMS.value,
      "rows": rows_out, "attention_rows": attention_rows, "score_rows": score_rows})


if __name__ == "__main__":
  app.run(main)
