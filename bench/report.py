"""Renders the JSON results under bench/results/ as the markdown tables of BENCHMARKS.md.

    python bench/report.py [--results bench/results] > /tmp/tables.md

Each section names the machine, the versions and the command behind its numbers (from the JSON), then
the table with the columns its script prints. Results that are absent are listed as not measured.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top

SECTIONS = [("training", "Training throughput"), ("beam_search", "Beam search"),
            ("latency", "Single-image latency"), ("memory", "Memory")]


def describe(machine: dict) -> str:
  versions = f"jax {machine['jax']}, flax {machine['flax']}"
  if "torch" in machine:
    versions += f", torch {machine['torch']} ({machine['torch_device']}"
    versions += f", {machine['torch_threads']} threads)" if machine["torch_device"] == "cpu" else ")"
  load = machine["load_average_1_5_15"]
  return (f"{machine['device']} ({machine['jax_backend']}); {machine['cpu_count']} CPUs, {machine['cpu']}, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); "
          f"Python {machine['python']}, {versions}; {machine['time']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=str(common.RESULTS_DIR))
  args = parser.parse_args()
  import importlib  # pylint: disable=g-import-not-at-top
  for name, title in SECTIONS:
    path = pathlib.Path(args.results) / f"{name}.json"
    print(f"### {title}\n")
    if not path.exists():
      print(f"Not measured ({path} is absent).\n")
      continue
    result = json.loads(path.read_text())
    module = importlib.import_module(f"bench.{name}")
    print(f"Machine: {describe(result['machine'])}.  ")
    print(f"Command: `python {result['machine']['command']}`\n")
    print(common.markdown_table(result["rows"], module.COLUMNS) + "\n")


if __name__ == "__main__":
  main()
