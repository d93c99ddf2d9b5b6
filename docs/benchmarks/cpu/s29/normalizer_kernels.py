"""Session 29: does a beam row's log-softmax normalizer alone compile to fewer kernels than the
log-softmax plus the beam scores? Compiled for an H100 without one (bench/gpu_aot.py's deviceless
compilation; needs jax's CUDA plugin). Prints the kernels of each program's entry computation.

    python3 docs/benchmarks/cpu/s29/normalizer_kernels.py > docs/benchmarks/cpu/s29/normalizer_kernels.txt
"""
import os
import pathlib
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import gpu_aot  # noqa: E402

logits = jax.ShapeDtypeStruct((1280, 2600), jnp.float32)  # beam 5 x batch 256 rows, vocabulary 2,600
live_scores = jax.ShapeDtypeStruct((1280, 1), jnp.float32)


def normalizer_terms(logits, live_scores):
  """What a top-k kernel reading the logits would need per row: the beam score, max, log-sum-exp."""
  row_max = jnp.max(logits, -1, keepdims=True)
  log_sum = jnp.log(jnp.sum(jnp.exp(logits - row_max), -1, keepdims=True))
  return jnp.concatenate([live_scores, row_max, log_sum], -1)


def candidates(logits, live_scores):
  """Today's beam step: the candidates written out for the top-k kernel."""
  return live_scores + jax.nn.log_softmax(logits)


target = gpu_aot.Target()
for function in (normalizer_terms, candidates):
  text = target.compile(jax.jit(function), logits, live_scores).as_text()
  entry = text[text.index("ENTRY"):]
  kernels = [line.split("=")[0].strip() for line in entry.splitlines()
             if re.search(r"= \S+ (fusion|custom-call)\(", line)]
  print(f"{function.__name__}: {len(kernels)} kernels: {', '.join(kernels)}")
