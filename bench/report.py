"""Renders the JSON results under bench/results/ as the markdown tables of BENCHMARKS.md.

    python bench/report.py [--results bench/results] > /tmp/tables.md

A section renders `<script>.json` and every `<script>_*.json` beside it (runs with other flags, e.g.
`--output=beam_search_unroll20`). Each section names the machine, the versions and the command behind its numbers (from the JSON), then
the table with the columns its script prints. Results that are absent are listed as not measured.
"""

import argparse
import json
import pathlib
import sys

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top

SECTIONS = [("training", "Training throughput"), ("beam_search", "Beam search"),
            ("early_stop", "The early stop on real photos"), ("latency", "Single-image latency"),
            ("memory", "Memory")]


def describe(machine: dict) -> str:
  versions = f"jax {machine['jax']}, flax {machine['flax']}"
  if "torch" in machine:
    versions += f", torch {machine['torch']} ({machine['torch_device']}"
    versions += f", {machine['torch_threads']} threads)" if machine["torch_device"] == "cpu" else ")"
  load = machine["load_average_1_5_15"]
  return (f"{machine['device']} ({machine['jax_backend']}); {machine['cpu_count']} CPUs, {machine['cpu']}, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); "
          f"Python {machine['python']}, {versions}; {machine['time']}")


def columns_of(name: str) -> list:
  """The COLUMNS of bench/<name>.py. The scripts define flags of the same names (--output, --batch_sizes),
  so each one's flags are dropped again after its import."""
  import importlib  # pylint: disable=g-import-not-at-top
  defined_before = set(flags.FLAGS)
  module = importlib.import_module(f"bench.{name}")
  for flag_name in set(flags.FLAGS) - defined_before:
    delattr(flags.FLAGS, flag_name)
  return module.COLUMNS


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=str(common.RESULTS_DIR))
  args = parser.parse_args()
  for name, title in SECTIONS:
    results = pathlib.Path(args.results)
    paths = sorted(results.glob(f"{name}.json")) + sorted(results.glob(f"{name}_*.json"))
    print(f"### {title}\n")
    if not paths:
      print(f"Not measured (no {results / name}*.json).\n")
      continue
    columns = columns_of(name)
    for path in paths:
      result = json.loads(path.read_text())
      print(f"Machine: {describe(result['machine'])}.  ")
      print(f"Command: `python {result['machine']['command']}`\n")
      if result.get("note"):  # added to a result file after its run
        print(f"Note: {result['note']}\n")
      print(common.markdown_table(result["rows"], columns) + "\n")


if __name__ == "__main__":
  main()
