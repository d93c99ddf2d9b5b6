"""Why the fused attention's captions differed from main's in call 2 (70% of images): rounding.

The probe's beam workload is a random decoder whose next-word distributions are nearly flat, so a
change in the last bits of a step's log-probabilities reorders near-tied hypotheses. This compares
main's search on the CPU with two changes documented as "the same up to rounding" and with the fused
kernel (interpreted), at the probe's sizes (lite0 grid, beam 5, max_len 20), 32 images:

    python3 docs/benchmarks/h100/round5/rounding_check.py
"""
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import probe_gpu9  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoding  # noqa: E402

sizes, batch = workloads.SIZES["lite0"], 32
plain = probe_gpu9.make_decoder(sizes, "bfloat16", dropout=0.0)
fused = probe_gpu9.make_decoder(sizes, "bfloat16", dropout=0.0, fused_attention=True)
params = workloads.end_captions_near(workloads.init_decoder_params(plain, sizes), length=12)
features = workloads.random_features(batch, sizes)
table = jax.jit(lambda p: plain.apply({"params": p}, method="word_gate_table"))(params)


def search(decoder, **options):
  run = jax.jit(lambda p, f: decoding.search(decoder, p, f, beam_size=5, max_len=20, **options))
  return jax.device_get(run(params, features))


main = search(plain, word_gate_table=table)
for name, result in [("project_context=False", search(plain, word_gate_table=table,
                                                      project_context=False)),
                     ("no word gate table", search(plain)),
                     ("fused attention (interpreted)", search(fused, word_gate_table=table))]:
  print(f"{name}: {probe_gpu9.agreement(result, main)['check']}")
