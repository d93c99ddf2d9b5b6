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
