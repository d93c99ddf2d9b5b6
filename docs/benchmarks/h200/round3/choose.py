"""Prints the bench/beam_search.py flags of the fastest NEW-family variant at a batch in probe.json."""
import json
import re
import sys

path, batch = sys.argv[1], int(sys.argv[2])
best = None
for row in json.load(open(path))["rows"]:
  m = re.fullmatch(rf"search b{batch} k5 cast=1 score=1 stage2=(\d) rank=1 project=(\d) aux=1", row["name"])
  if m and (best is None or row["ms"] < best[0]):
    best = (row["ms"], m.group(1), m.group(2))
if best is None:
  print("")
else:
  onoff = {"0": "off", "1": "on"}
  print(f"--two_stage_top_k={onoff[best[1]]} --project_context={onoff[best[2]]}")
