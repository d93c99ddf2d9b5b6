"""Issue 8 GPU probe (not part of the project): where a bf16 beam-5 step's time goes, and variants.

On bench/beam_search.py's workload (the lite0 decoder: 7x7x1280, 512, vocab 2,600, max_len 20, random
weights edited to end captions near 12 tokens), in one process:
  * whole searches for variants, switched at trace time:
      cast     the decoder's matrices cast to bf16 once outside the loop (decoder.cast_matrices)
      score    attention score as multiply + sum (decoder._AttentionScore) instead of a [.., A]x[A, 1] dot
      topk     how the 2K best of the K * V candidates are taken (beam_search.CANDIDATE_TOP_K)
      rank     beam search's top-k over 2K entries by counting (beam_search._top_k_by_rank) vs lax.top_k
      project  Decoder.encode(project_context=...)
      aux      attention kept as the search's aux (or not)
  * ablations over 20-step scans: the decoder step alone, the top-k alone, the bookkeeping alone
  * jax.profiler traces of chosen searches, summed per GPU kernel name
Writes $OUT/probe.json, $OUT/profile_*.txt and the compiled HLO of the profiled searches.
"""
import collections
import functools
import glob
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import einops  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from flaxcap import beam_search as bs  # noqa: E402
from flaxcap import decoder as decoder_lib  # noqa: E402
from flaxcap import vocab as vocab_lib  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/probe_out")
os.makedirs(OUT, exist_ok=True)
SIZES = workloads.SIZES["lite0"]
MAX_LEN = 20
REPEATS = int(os.environ.get("PROBE_REPEATS", "10"))
RESULTS = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
NEW_SCORE = decoder_lib._AttentionScore  # pylint: disable=protected-access
MAX_RANKED = bs._MAX_RANKED  # pylint: disable=protected-access


class DotScore(NEW_SCORE):
  """The score as main computes it: nn.Dense(1, use_bias=False) with float32 results."""

  @nn.compact
  def __call__(self, hidden, by_sum=False):
    del by_sum
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (hidden.shape[-1], 1), jnp.float32)
    return lax.dot_general(hidden, kernel.astype(self.dtype), (((hidden.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)[..., 0]


MAIN = dict(cast=False, score=False, topk="flat", rank=False, project=True, aux=True)
NEW = dict(cast=True, score=True, topk="chunks", rank=True, project=True, aux=True)


def configure(v):
  """Sets the library switches for tracing variant v."""
  decoder_lib._AttentionScore = NEW_SCORE if v["score"] else DotScore
  bs.CANDIDATE_TOP_K = v["topk"]
  bs._MAX_RANKED = MAX_RANKED if v["rank"] else 0


def label(v):
  return " ".join(f"{k}={x if isinstance(x, str) else int(x)}" for k, x in v.items())


def log(*args):
  print(*args, flush=True)


def timed(name, fn, *args, **extra):
  """Median of REPEATS calls after one compile call and one warm-up."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  row = dict(name=name, ms=median * 1e3, min_ms=min(times) * 1e3, first_s=first, **extra)
  RESULTS["rows"].append(row)
  log(f"{name:72s} {median * 1e3:8.3f} ms (min {min(times) * 1e3:.3f}, first {first:.1f} s)")
  return out, median


def make_search(decoder, table, v, *, beam):
  """decoding.search with variant v's choices."""

  def search(params, features):
    configure(v)
    if v["cast"]:
      params = decoder_lib.cast_matrices(params, decoder.dtype)
    variables = {"params": params}
    encoded = decoder.apply(variables, features, v["project"], method=decoder_lib.Decoder.encode)
    carry = decoder.apply(variables, encoded, method=decoder_lib.Decoder.initial_carry)
    batch = carry.c.shape[0]

    def step_fn(flat_carry, flat_tokens):
      unflatten = functools.partial(einops.rearrange, pattern="(b k) ... -> b k ...", b=batch,
                                    k=flat_tokens.shape[0] // batch)
      logits, new_carry, att = decoder.apply(
          variables, encoded, jax.tree.map(unflatten, flat_carry), unflatten(flat_tokens),
          word_gates=table, method=decoder_lib.Decoder.step)
      flatten = functools.partial(einops.rearrange, pattern="b k ... -> (b k) ...")
      return (flatten(jax.nn.log_softmax(logits.astype(jnp.float32))),
              jax.tree.map(flatten, new_carry), flatten(att) if v["aux"] else ())

    if beam == 1:
      return bs.greedy_search(step_fn, carry, max_len=MAX_LEN, bos_id=vocab_lib.BOS,
                              eos_id=vocab_lib.EOS)
    return bs.beam_search(step_fn, carry, beam_size=beam, max_len=MAX_LEN, bos_id=vocab_lib.BOS,
                          eos_id=vocab_lib.EOS)

  return jax.jit(search)


def make_step_scan(decoder, table, v, *, beam, log_softmax=True):
  """Only the decoder step, 20 times in a scan (tokens cycle without looking at the output)."""

  def run(params, features):
    configure(v)
    if v["cast"]:
      params = decoder_lib.cast_matrices(params, decoder.dtype)
    variables = {"params": params}
    encoded = decoder.apply(variables, features, v["project"], method=decoder_lib.Decoder.encode)
    carry = decoder.apply(variables, encoded, beam, method=decoder_lib.Decoder.initial_carry)
    batch = carry.c.shape[0]
    tokens = jnp.full((batch, beam), vocab_lib.BOS, jnp.int32)

    def body(state, _):
      carry, tokens = state
      logits, carry, att = decoder.apply(variables, encoded, carry, tokens, word_gates=table,
                                         method=decoder_lib.Decoder.step)
      lp = jax.nn.log_softmax(logits.astype(jnp.float32)) if log_softmax else logits
      tokens = (tokens * 31 + 7) % SIZES.vocab
      return (carry, tokens), (jnp.max(lp, axis=-1), att)

    return lax.scan(body, (carry, tokens), None, length=MAX_LEN)[1]

  return jax.jit(run)


def make_topk_scan(batch, beam, method):
  def run(log_probs):  # [batch * beam, V]
    def body(live, _):
      candidates = live[:, :, None] + log_probs.reshape(batch, beam, -1)
      scores, index = bs._top_k_of_candidates(candidates, 2 * beam, method)
      return scores[:, :beam] * 0.5, index
    bs._MAX_RANKED = MAX_RANKED
    return lax.scan(body, jnp.zeros((batch, beam), jnp.float32), None, length=MAX_LEN)[1]
  return jax.jit(run)


def make_bookkeeping_search(batch, beam, v):
  """beam_search over a step that returns fixed log-probabilities (+ a carried shift)."""
  def run(log_probs):
    configure(v)

    def step_fn(state, tokens):
      shift, = state
      aux = jnp.zeros((tokens.shape[0], SIZES.locations), jnp.float32) + shift if v["aux"] else ()
      return log_probs + shift, (shift + 1e-3,), aux

    return bs.beam_search(step_fn, (jnp.zeros((batch, 1), jnp.float32),), beam_size=beam,
                          max_len=MAX_LEN, bos_id=vocab_lib.BOS, eos_id=vocab_lib.EOS)
  return jax.jit(run)


def profile(name, fn, *args, calls=3):
  """Runs fn under jax.profiler and sums device events per name; writes $OUT/profile_<name>.txt."""
  jax.block_until_ready(fn(*args))
  trace_dir = f"/tmp/trace_{name}"
  jax.profiler.start_trace(trace_dir)
  for _ in range(calls):
    jax.block_until_ready(fn(*args))
  jax.profiler.stop_trace()
  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    log("no trace for", name)
    return
  data = jax.profiler.ProfileData.from_file(paths[-1])
  lines_out, summary = [], {}
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
      lines_out.append(f"== {plane.name} / {line.name}: {len(total)} names, "
                       f"{sum(total.values()) / 1e3 / calls:.1f} us per call")
      for event_name, ns in total.most_common(60):
        lines_out.append(f"  {ns / 1e3 / calls:9.1f} us/call {count[event_name] / calls:7.1f} x/call "
                         f"{ns / max(count[event_name], 1) / 1e3:8.2f} us each  {event_name[:150]}")
      summary[f"{plane.name}/{line.name}"] = {k: [ns / calls, count[k] / calls]
                                              for k, ns in total.most_common(80)}
  with open(f"{OUT}/profile_{name}.txt", "w") as f:
    f.write("\n".join(lines_out))
  RESULTS.setdefault("profiles", {})[name] = summary
  log(f"--- profile {name} (first 40 lines)")
  log("\n".join(lines_out[:40]))


def save():
  with open(f"{OUT}/probe.json", "w") as f:
    json.dump(RESULTS, f, indent=1, default=str)


def main():
  decoder = workloads.decoder_for(SIZES, "bfloat16")
  params = workloads.end_captions_near(workloads.init_decoder_params(decoder, SIZES), length=12)
  params = jax.device_put(params)
  table = jax.jit(lambda p: decoder.apply({"params": p}, method="word_gate_table"))(params)
  all_features = workloads.random_features(256, SIZES)  # the largest batch
  beam = 5
  parts = os.environ.get("PROBE_PARTS", "search,ablate,profile").split(",")
  for batch in [int(b) for b in os.environ.get("PROBE_BATCHES", "256,1").split(",")]:
    features = jax.device_put(all_features[:batch])
    big = batch > 1
    if "search" in parts:
      variants = [MAIN, dict(NEW, topk="flat"), NEW, dict(NEW, project=False)]
      if not big:
        variants.insert(2, dict(NEW, topk="two_stage"))
      tokens_of = {}
      for v in variants:
        result, _ = timed(f"search b{batch} k{beam} {label(v)}", make_search(decoder, table, v, beam=beam),
                          params, features, batch=batch, variant=v)
        tokens = tokens_of[label(v)] = np.asarray(result.tokens)
        row = RESULTS["rows"][-1]
        row["mean_len"] = float(np.mean(np.asarray(result.lengths)[:, 0]))
        # Same arithmetic, another top-k: must be identical. Another cast or score: rounding.
        for name, other in (("main", MAIN), ("flat_topk", dict(v, topk="flat"))):
          if label(other) in tokens_of:
            row[f"same_tokens_as_{name}"] = float(np.mean(np.all(tokens == tokens_of[label(other)],
                                                                 axis=(1, 2))))
        log("    mean length %.1f; " % row["mean_len"] + ", ".join(
            f"{k} {x:.3f}" for k, x in row.items() if k.startswith("same_")))
      save()
    if "ablate" in parts and big:
      log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (batch * beam, SIZES.vocab)))
      for method in ("flat", "chunks"):
        timed(f"top-k only b{batch} k{beam} {method}", make_topk_scan(batch, beam, method),
              log_probs, batch=batch)
      save()
    if "profile" in parts:
      fn = make_search(decoder, table, NEW, beam=beam)
      try:
        profile(f"new_b{batch}", fn, params, features)
      except Exception as e:  # pylint: disable=broad-except
        log("profile failed:", repr(e)[:300])
      save()


if __name__ == "__main__":
  main()
