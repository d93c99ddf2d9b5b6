"""Runs the benchmark suite with one command; each script in its own process, JSON under bench/results/.

    python bench/run_all.py            # on the CPU: small grids, about 2 minutes; on a GPU: the full grids
    python bench/run_all.py --full     # the full grids on the CPU too (long: tens of minutes)
    python bench/run_all.py --only=beam_search,latency

Steps, in order (each prints its table; see the scripts' docstrings):
  torch_reference  the torch reference computes what flaxcap computes (logits, loss, gradients; with
                   --full or on a GPU also the searches' captions, which beam_search compares at full size)
  roofline         the device's measured matmul and copy peaks, FLOP and byte counts
  training         train-step images/s and tokens/s, flaxcap vs torch
  beam_search      captions/s, flaxcap batched vs torch batched vs the per-image loop
  latency          one image file -> caption text, beam 3
  memory           peak RSS of inference; peak device memory of a train step (GPU)

The defaults of each script depend on the device (small CPU grids, the issue's grids on a GPU); --full
passes the GPU grids explicitly. A summary of exit codes and wall times goes to bench/results/run_all.json.

Process start-up: this process imports the libraries every step needs (jax, flax, torch, flaxcap; no
device is touched), then forks each step from itself, so each step runs in a fresh process of its own
without importing them again (~4 s a step on the 2-core CPU). The steps' seconds exclude those imports;
the "imports" row shows them, once. --no-fork starts each step as `python bench/<step>.py` instead.
"""

import argparse
import multiprocessing
import os
import pathlib
import resource
import runpy
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top

BENCH = pathlib.Path(__file__).resolve().parent

# Flags that turn a CPU run into the full grid (on a GPU the scripts' defaults are these already), with
# the warm-ups and repeats the CPU defaults had before they were trimmed for time.
FULL_GRID = {
    "torch_reference": ["--searches"],
    "training": ["--parts=decoder,full", "--batch_sizes=32,128", "--full_batch_sizes=32,128",
                 "--dtypes=float32,bfloat16", "--warmup=2"],
    "beam_search": ["--batch_sizes=1,32,256", "--dtypes=float32,bfloat16"],
    "latency": ["--stages", "--torch_repeats=20"],
}
STEPS = ["torch_reference", "roofline", "training", "beam_search", "latency", "memory"]
# Flags every run passes: the latency figure is the shipped model's (real captions, which end early).
ALWAYS = {"latency": ["--model=shipped"]}
# What the steps import, loaded once before forking. Modules that define absl flags (the step scripts
# themselves) stay out: each step defines its own flags in its own process.
PRELOAD = ["numpy", "PIL.Image", "jax", "jax.numpy", "flax.linen", "optax", "torch", "torch.nn",
           "bench.workloads", "bench.roofline", "bench.torch_reference", "flaxcap.decoding",
           "flaxcap.encoders", "flaxcap.images", "flaxcap.inference", "flaxcap.model",
           "flaxcap.top_k", "flaxcap.train_lib"]


def _preload() -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  for name in PRELOAD:
    try:
      importlib.import_module(name)
    except ImportError as e:  # the step that needs it reports it
      print(f"preload: {name} not imported ({e})", flush=True)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge._backends:  # pylint: disable=protected-access
    raise RuntimeError("a preloaded module started a jax backend: forking it would be unsafe")


def _cpu_seconds(who) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def _run_step(script: str, argv: list[str]) -> None:
  """In the forked child: runs `script` as __main__ with `argv`, as `python script argv` would."""
  sys.argv = [script] + argv
  runpy.run_path(script, run_name="__main__")
  sys.stdout.flush()
  sys.stderr.flush()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true", help="the full grids on the CPU too")
  parser.add_argument("--only", default=",".join(STEPS), help="comma-separated steps to run")
  parser.add_argument("--torch_threads", type=int, default=None, help="passed to the torch scripts")
  parser.add_argument("--fork", action=argparse.BooleanOptionalAction, default=True,
                      help="fork each step from this process after importing the libraries once "
                      "(default); --no-fork: `python bench/<step>.py` for each")
  args = parser.parse_args()
  summary = []
  if args.fork:
    start, cpu_start = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
    _preload()
    summary.append({"step": "imports", "command": "preload: " + ",".join(PRELOAD), "returncode": 0,
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": _cpu_seconds(resource.RUSAGE_SELF) - cpu_start})
    fork = multiprocessing.get_context("fork")
  for step in [s for s in STEPS if s in args.only.split(",")]:
    script = str(BENCH / f"{step}.py")
    flags = list(ALWAYS.get(step, []))
    if args.full:
      flags += FULL_GRID.get(step, [])
    if args.torch_threads and step in ("training", "beam_search", "latency", "memory"):
      flags.append(f"--torch_threads={args.torch_threads}")
    print(f"\n=== {' '.join([script] + flags)}", flush=True)
    start, cpu_start = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    if args.fork:
      process = fork.Process(target=_run_step, args=(script, flags), name=step)
      process.start()
      process.join()
      returncode = process.exitcode
    else:
      returncode = subprocess.run([sys.executable, script] + flags, check=False).returncode
    summary.append({"step": step, "command": " ".join([script] + flags), "returncode": returncode,
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start})
  total = {"step": "total", "seconds": sum(s["seconds"] for s in summary),
           "cpu_seconds": sum(s["cpu_seconds"] for s in summary)}
  print()
  common.print_table(summary + [total], [
      common.Column("step", "step"), common.Column("returncode", "exit code"),
      common.Column("seconds", "seconds", ".0f"), common.Column("cpu_seconds", "CPU seconds", ".0f")],
      title=f"bench/run_all.py; CPU seconds: user + system of the step's processes (on a shared "
      f"machine the wall seconds grow with the load more than these); load average {os.getloadavg()[0]:.1f}")
  common.write_json("run_all", {"full": args.full, "fork": args.fork, "steps": summary,
                                "seconds": total["seconds"], "cpu_seconds": total["cpu_seconds"],
                                "load_average_1_5_15": os.getloadavg()})
  sys.exit(max((s["returncode"] for s in summary), default=0) != 0)


if __name__ == "__main__":
  main()
