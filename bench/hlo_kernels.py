"""Counts the kernel-launching instructions of compiled HLO, per while-loop body and outside loops.

    python bench/hlo_kernels.py bench/results/beam_search_hlo_bfloat16_b256_k5_u1.txt

On a GPU each top-level fusion, custom call (cuBLAS GEMMs, top-k, cuDNN), copy, sort and scatter/gather
of a computation is one kernel launch; a decode step whose arithmetic takes microseconds is bound by
how many of those it runs in sequence. Prints, for every while body and for the entry computation,
the count by opcode (for custom calls, by target).
"""

import collections
import re
import sys

_KERNEL_OPCODES = ("fusion", "custom-call", "copy", "sort", "scatter", "gather", "reduce", "dot",
                   "convolution", "dynamic-slice", "dynamic-update-slice", "transpose", "concatenate",
                   "all-reduce", "select-and-scatter")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = [^=]*? ([a-z\-]+)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_WHILE = re.compile(r"body=%?([\w.\-]+)")
_COMMENT = re.compile(r"/\*.*?\*/")


def trace_kernel_summary(trace_dir: str, calls: int) -> tuple[list[str], dict]:
  """The GPU events of the newest `jax.profiler` trace under `trace_dir`, summed per kernel name and
  divided by `calls` (the traced calls): text lines, and {plane/line: {kernel: [us/call, x/call]}}.

  What a trace says that the HLO counts below do not: each kernel's measured time (used by
  bench/probe_gpu9.py; a CPU trace has no GPU plane).
  """
  import glob  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    return ["no trace written"], {}
  data = jax.profiler.ProfileData.from_file(paths[-1])
  lines, summary = [], {}
  for plane in data.planes:
    if "gpu" not in plane.name.lower():
      continue
    for line in plane.lines:
      total, count = collections.Counter(), collections.Counter()
      for event in line.events:
        total[event.name] += event.duration_ns
        count[event.name] += 1
      if not total:
        continue
      lines.append(f"== {plane.name} / {line.name}: {len(total)} names, "
                   f"{sum(total.values()) / 1e3 / calls:.1f} us per call, "
                   f"{sum(count.values()) / calls:.0f} kernels per call")
      for event_name, ns in total.most_common(80):
        lines.append(f"  {ns / 1e3 / calls:9.1f} us/call {count[event_name] / calls:7.1f} x/call "
                     f"{ns / max(count[event_name], 1) / 1e3:8.2f} us each  {event_name[:150]}")
      summary[f"{plane.name}/{line.name}"] = {k: [ns / 1e3 / calls, count[k] / calls]
                                              for k, ns in total.most_common(80)}
  return lines or ["no GPU events in the trace (a CPU run)"], summary


def parse(text: str) -> tuple[dict[str, collections.Counter], list[str], str]:
  """Returns ({computation: Counter of kernel opcodes}, while body names, entry name)."""
  counts, bodies, entry, current = {}, [], None, None
  for line in text.splitlines():
    line = _COMMENT.sub("", line)
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      counts[current] = collections.Counter()
      if line.startswith("ENTRY"):
        entry = current
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    opcode = match.group(1)
    if opcode == "while":
      bodies += _WHILE.findall(line)
    if opcode in _KERNEL_OPCODES:
      target = _TARGET.search(line)
      counts[current][f"custom-call {target.group(1)}" if target else opcode] += 1
  return counts, bodies, entry


def main():
  for path in sys.argv[1:]:
    counts, bodies, entry = parse(open(path).read())
    print(path)
    for name in bodies + [entry]:
      label = "while body" if name in bodies else "entry"
      total = sum(counts[name].values())
      detail = ", ".join(f"{op} {n}" for op, n in counts[name].most_common())
      print(f"  {label} {name}: {total} kernels ({detail})")


if __name__ == "__main__":
  main()
