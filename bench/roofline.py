"""What the device can do and what the work needs: measured peaks, FLOPs and bytes per step.

    python bench/roofline.py            # measure this device's peaks, print the counts at the target sizes

Peaks are measured, not taken from a data sheet, in the same run as the benchmark that divides by them:
  * matmul TFLOP/s: one jitted [n, n] x [n, n] product per dtype (2 n^3 FLOPs; n = 8192 on a GPU, 1024
    on the CPU), jax's default matmul precision (what the models use; on an H100 float32 runs as TF32);
  * copy GB/s: x = x + 1 in place (the input donated) over a large float32 array (1 GiB on a GPU,
    64 MiB on the CPU), counted as the bytes read plus the bytes written.

Counts (multiply-adds count 2 FLOPs; elementwise work, softmax and the optimizer are left out, they are
a few percent):

  decoder forward FLOPs per caption = 2 P C A                                  (features -> attention)
      + 2 T [E 4H + H (4H + A + 1) + C 4H + P A + P C + H E + C E + E V]      (per step)
  where P grid locations, C channels, A attention, H hidden, E embedding, V vocabulary, T steps; the
  bracket is: word -> LSTM gates, h -> (gates | attention query | gate), context -> gates, attention
  scores, context, deep output (h and context), vocabulary layer. A train step is 3x the forward
  (the backward pass costs two matmuls per forward matmul). flaxcap runs all T steps for every
  caption; the torch reference's shrinking batch skips steps after a caption's end, so it does fewer.

  XLA's own `cost_analysis()` counts the body of a `lax.scan` once, not T times, so it undercounts
  these models; `xla_flops` reports it for comparison only.

  decode step bytes (the least a beam-search step must move; `decode_step_bytes`):
      weights in the compute dtype (every matrix above except the feature projection), the features
      and projected features [B, P, C + A] in the compute dtype, the LSTM state (c, h float32, read and
      written) and the float32 logits [B K, V] (written, then read by log-softmax/top-k).

  decoder train step bytes (the attention's share, which dominates at the tutorial's sizes;
  `decoder_train_bytes`): each of the T steps reads the features [B, P, C] twice (the context in the
  forward pass, the weights' gradient in the backward) and the projected features [B, P, A] twice
  (the scores; their activation recomputed or read back), and reads and writes the running sum of
  the projected features' gradient [B, P, A] that autodiff of the recurrence keeps. Weights,
  logits and the LSTM state are left out (a few percent at batch 128 and up).
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench import workloads  # noqa: E402

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _median_seconds(fn, *args, repeats: int, warm_s: float = 0.0) -> float:
  jax.block_until_ready(fn(*args))  # compile
  end = time.perf_counter() + warm_s  # a GPU starts at idle clocks: run it up before timing
  while time.perf_counter() < end:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_peaks(*, dtypes=("bfloat16", "float32"), matmul_size: int | None = None,
                  copy_bytes: int | None = None, repeats: int = 10) -> dict[str, Any]:
  """Measured matmul TFLOP/s per dtype and copy GB/s of jax's default device."""
  gpu = common.on_gpu()
  n = matmul_size or (8192 if gpu else 1024)
  copy_bytes = copy_bytes or (2**30 if gpu else 2**26)
  matmul = jax.jit(lambda a, b: a @ b)
  peaks = {"matmul_size": n, "matmul_tflops": {}, "copy_bytes": copy_bytes}
  key = jax.random.key(0)
  for dtype in dtypes:
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    seconds = _median_seconds(matmul, a, a, repeats=repeats, warm_s=1.0 if gpu else 0.0)
    peaks["matmul_tflops"][dtype] = 2 * n**3 / seconds / 1e12
    del a
  # Donating the input lets the output reuse its buffer: no fresh allocation (on the CPU: page faults
  # on first touch) inside the timed calls.
  add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = add_one(jnp.zeros((copy_bytes // 4,), jnp.float32))
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    x = add_one(x).block_until_ready()
    times.append(time.perf_counter() - start)
  peaks["copy_gbps"] = 2 * copy_bytes / float(np.median(times[1:])) / 1e9
  return peaks


def _step_macs(sizes: workloads.Sizes) -> int:
  """Multiply-adds of one decoder step for one caption (the bracket in the module docstring)."""
  c, a, h, e, v, p = sizes.channels, sizes.dim, sizes.dim, sizes.dim, sizes.vocab, sizes.locations
  return e * 4 * h + h * (4 * h + a + 1) + c * 4 * h + p * a + p * c + h * e + c * e + e * v


def decoder_forward_flops(sizes: workloads.Sizes, batch: int) -> int:
  """Teacher-forced decoder forward FLOPs for `batch` captions of `sizes.steps` steps."""
  per_caption = 2 * sizes.locations * sizes.channels * sizes.dim + 2 * sizes.steps * _step_macs(sizes)
  return batch * per_caption


def decoder_train_flops(sizes: workloads.Sizes, batch: int) -> int:
  """Forward + backward: 3x the forward."""
  return 3 * decoder_forward_flops(sizes, batch)


def decode_step_flops(sizes: workloads.Sizes, batch: int, beam: int) -> int:
  """FLOPs of one beam-search step for batch x beam hypotheses (features already projected)."""
  return 2 * batch * beam * _step_macs(sizes)


def decode_step_bytes(sizes: workloads.Sizes, batch: int, beam: int, dtype: str) -> dict[str, int]:
  """The bytes one beam-search step must read or write at the least (see the module docstring)."""
  width = _DTYPE_BYTES[dtype]
  c, a, h, e, v = sizes.channels, sizes.dim, sizes.dim, sizes.dim, sizes.vocab
  weights = (e * 4 * h + h * (4 * h + a + 1) + c * 4 * h + a + h * e + c * e + e * v) * width
  features = batch * sizes.locations * (c + a) * width
  state = batch * beam * h * 4 * 2 * 2  # c and h, float32, read and written
  logits = batch * beam * v * 4 * 2  # float32, written and read once
  return {"weights": weights, "features": features, "state": state, "logits": logits,
          "total": weights + features + state + logits}


def decoder_train_bytes(sizes: workloads.Sizes, batch: int, dtype: str,
                        feature_dtype: str | None = None) -> dict[str, int]:
  """The bytes a teacher-forced train step's attention moves (see the module docstring); the
  projected features and their gradient in the compute `dtype`, the features in `feature_dtype`
  (default: `dtype`)."""
  features = batch * sizes.locations * sizes.channels * _DTYPE_BYTES[feature_dtype or dtype]
  projected = batch * sizes.locations * sizes.dim * _DTYPE_BYTES[dtype]
  counts = {"features": 2 * features * sizes.steps, "projected_features": 2 * projected * sizes.steps,
            "projected_gradient_sum": 2 * projected * sizes.steps}
  counts["total"] = sum(counts.values())
  return counts


def xla_flops(compiled) -> float | None:
  """FLOPs by XLA's cost analysis of a compiled computation (a scan's body is counted once)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", 0.0)) or None


def utilization(value: float | None, peak: float | None) -> float | None:
  """value / peak, or None when either is unknown."""
  if not value or not peak:
    return None
  return value / peak


def main():
  info = common.machine(torch_too=False)
  print(common.machine_line(info))
  peaks = measure_peaks()
  print(f"matmul {peaks['matmul_size']}^3: " + ", ".join(
      f"{dtype} {tflops:.2f} TFLOP/s" for dtype, tflops in peaks["matmul_tflops"].items())
        + f"; copy {peaks['copy_bytes'] / 2**20:.0f} MiB: {peaks['copy_gbps']:.1f} GB/s")
  tutorial, lite0 = workloads.SIZES["tutorial"], workloads.SIZES["lite0"]
  rows = [
      {"what": "decoder train step, tutorial sizes, per caption", "count": decoder_train_flops(tutorial, 1)},
      {"what": "decoder train step, lite0 sizes, per caption", "count": decoder_train_flops(lite0, 1)},
      {"what": "beam step FLOPs, lite0, batch 256 x beam 5", "count": decode_step_flops(lite0, 256, 5)},
  ]
  for dtype in ("bfloat16", "float32"):
    for batch in (1, 256):
      counts = decode_step_bytes(lite0, batch, 5, dtype)
      rows.append({"what": f"beam step bytes, lite0, batch {batch} x beam 5, {dtype}",
                   "count": counts["total"]})
  common.print_table(rows, [common.Column("what", "count"), common.Column("count", "value", ",.0f")])
  common.write_json("roofline", {"machine": info, "peaks": peaks, "counts": rows})


if __name__ == "__main__":
  main()
