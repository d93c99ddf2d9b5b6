"""Runs the benchmark suite with one command; each script in its own process, JSON under bench/results/.

    python bench/run_all.py            # on the CPU: small grids, a few minutes; on a GPU: the full grids
    python bench/run_all.py --full     # the full grids on the CPU too (long: tens of minutes)
    python bench/run_all.py --only=beam_search,latency

Steps, in order (each prints its table; see the scripts' docstrings):
  torch_reference  the torch reference computes what flaxcap computes (logits, loss, gradients, captions)
  roofline         the device's measured matmul and copy peaks, FLOP and byte counts
  training         train-step images/s and tokens/s, flaxcap vs torch
  beam_search      captions/s, flaxcap batched vs torch batched vs the per-image loop
  latency          one image file -> caption text, beam 3
  memory           peak RSS of inference; peak device memory of a train step (GPU)

The defaults of each script depend on the device (small CPU grids, the issue's grids on a GPU); --full
passes the GPU grids explicitly. A summary of exit codes and wall times goes to bench/results/run_all.json.
"""

import argparse
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top

BENCH = pathlib.Path(__file__).resolve().parent

# Flags that turn a CPU run into the full grid (on a GPU the scripts' defaults are these already).
FULL_GRID = {
    "training": ["--parts=decoder,full", "--batch_sizes=32,128", "--full_batch_sizes=32,128",
                 "--dtypes=float32,bfloat16"],
    "beam_search": ["--batch_sizes=1,32,256", "--dtypes=float32,bfloat16"],
}
STEPS = ["torch_reference", "roofline", "training", "beam_search", "latency", "memory"]
# Flags every run passes: the latency figure is the shipped model's (real captions, which end early).
ALWAYS = {"latency": ["--model=shipped"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true", help="the full grids on the CPU too")
  parser.add_argument("--only", default=",".join(STEPS), help="comma-separated steps to run")
  parser.add_argument("--torch_threads", type=int, default=None, help="passed to the torch scripts")
  args = parser.parse_args()
  summary = []
  for step in [s for s in STEPS if s in args.only.split(",")]:
    command = [sys.executable, str(BENCH / f"{step}.py")] + ALWAYS.get(step, [])
    if args.full:
      command += FULL_GRID.get(step, [])
    if args.torch_threads and step in ("training", "beam_search", "latency", "memory"):
      command.append(f"--torch_threads={args.torch_threads}")
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    returncode = subprocess.run(command, check=False).returncode
    summary.append({"step": step, "command": " ".join(command[1:]), "returncode": returncode,
                    "seconds": time.perf_counter() - start})
  print()
  common.print_table(summary, [common.Column("step", "step"), common.Column("returncode", "exit code"),
                               common.Column("seconds", "seconds", ".0f")], title="bench/run_all.py")
  common.write_json("run_all", {"full": args.full, "steps": summary})
  sys.exit(max((s["returncode"] for s in summary), default=0) != 0)


if __name__ == "__main__":
  main()
