"""Captions per second: batched on-device beam search vs a per-image Python-loop beam search.

The model is a synthetic "Show, Attend and Tell" step written here with jnp (random weights):
additive attention over a 7x7x1280 feature grid, a gated context, an LSTM cell with 512 units and a
3000-word output layer. An <eos> bias that grows with the step makes captions end after ~10 words,
as real ones do. Both searches run the same weights on the same features in this process:

  * batched: `flaxcap.beam_search.beam_search` (and `greedy_search`) under `jax.jit`, the whole
    batch in one `lax.scan`;
  * baseline: the popular PyTorch tutorial's loop, in numpy: one image at a time, the features
    copied per beam, a Python loop over steps, the beam shrinking as hypotheses finish. It is
    batch-size independent, so it is timed once per beam size on --baseline_images images.

    python bench/beam_search.py                        # CPU default: batch 1,32 (about a minute)
    python bench/beam_search.py --batch_sizes=1,32,256  # the full grid (the default on GPU)

Prints a table and writes JSON to bench/results/beam_search.json.
"""

import functools
import json
import os
import pathlib
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flaxcap import beam_search as bs  # noqa: E402

BOS, EOS = 1, 2
GRID, CHANNELS, EMBED, HIDDEN, ATTENTION, VOCAB = 49, 1280, 512, 512, 512, 3000

_BATCH_SIZES = flags.DEFINE_string(
    "batch_sizes", None, "Comma-separated batch sizes (default: 1,32 on CPU, 1,32,256 otherwise).")
_BEAM_SIZES = flags.DEFINE_string("beam_sizes", "1,3,5", "Comma-separated beam sizes.")
_MAX_LEN = flags.DEFINE_integer("max_len", 20, "Decoding steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration (the median counts).")
_BASELINE_IMAGES = flags.DEFINE_integer("baseline_images", 8,
                                        "Images the per-image loop is timed on (0: skip it).")
_OUTPUT = flags.DEFINE_string(
    "output", str(pathlib.Path(__file__).resolve().parent / "results" / "beam_search.json"),
    "Where the JSON goes.")


def eos_bias(step):
  """Added to the <eos> logit at `step`: unlikely early, near certain after ~12 steps."""
  return step - 8.5


def init_params(seed=0):
  rng = np.random.default_rng(seed)

  def dense(fan_in, fan_out):
    return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)

  return {
      "embed": (rng.standard_normal((VOCAB, EMBED)) * 0.1).astype(np.float32),
      "init_h": dense(CHANNELS, HIDDEN), "init_c": dense(CHANNELS, HIDDEN),
      "enc_att": dense(CHANNELS, ATTENTION), "dec_att": dense(HIDDEN, ATTENTION),
      "att_v": dense(ATTENTION, 1)[:, 0], "gate": dense(HIDDEN, CHANNELS),
      "lstm_x": dense(EMBED + CHANNELS, 4 * HIDDEN), "lstm_h": dense(HIDDEN, 4 * HIDDEN),
      "lstm_b": np.zeros(4 * HIDDEN, np.float32),
      "out": dense(HIDDEN, VOCAB) * 3.0, "out_b": np.zeros(VOCAB, np.float32),
  }


# --- the batched search (jnp) ------------------------------------------------------------------


def lstm_attention_step(params, features, projected, state, flat_tokens):
  """One decoder step for [batch * beam] rows against per-image features [batch, P, C]."""
  batch = features.shape[0]
  beams = flat_tokens.shape[0] // batch
  h, c = state["h"], state["c"]  # [batch * beam, H]
  att_h = (h @ params["dec_att"]).reshape(batch, beams, 1, ATTENTION)
  att_scores = jnp.tanh(projected[:, None] + att_h) @ params["att_v"]  # [batch, beam, P]
  attention = jax.nn.softmax(att_scores, axis=-1)
  context = jnp.einsum("bkp,bpc->bkc", attention, features).reshape(batch * beams, CHANNELS)
  context = jax.nn.sigmoid(h @ params["gate"]) * context
  x = jnp.concatenate([params["embed"][flat_tokens], context], axis=-1)
  gates = x @ params["lstm_x"] + h @ params["lstm_h"] + params["lstm_b"]
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  logits = h @ params["out"] + params["out_b"]
  logits = logits.at[:, EOS].add(eos_bias(state["step"].astype(jnp.float32)))
  new_state = {"h": h, "c": c, "step": state["step"] + 1}  # "step" is a scalar: not per beam
  return jax.nn.log_softmax(logits), new_state, attention.reshape(batch * beams, GRID)


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len"))
def batched_search(params, features, *, beam_size, max_len):
  """features [batch, P, C] -> BeamSearchResult; beam_size 0 means greedy_search."""
  projected = features @ params["enc_att"]  # once per image, never per beam
  mean = features.mean(axis=1)
  init_state = {"h": jnp.tanh(mean @ params["init_h"]), "c": jnp.tanh(mean @ params["init_c"]),
                "step": jnp.int32(0)}
  step_fn = functools.partial(lstm_attention_step, params, features, projected)
  if beam_size == 0:
    return bs.greedy_search(step_fn, init_state, max_len=max_len, bos_id=BOS, eos_id=EOS)
  return bs.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_len, bos_id=BOS,
                        eos_id=EOS)


# --- the baseline: one image at a time, a Python loop over steps (numpy) ------------------------


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_step(p, features, projected, h, c, tokens, step):
  """The same step for k rows of one image; features [k, P, C], copied per beam as in the tutorial.
  """
  att_scores = np.tanh(projected + (h @ p["dec_att"])[:, None]) @ p["att_v"]  # [k, P]
  attention = np.exp(att_scores - att_scores.max(-1, keepdims=True))
  attention /= attention.sum(-1, keepdims=True)
  context = np.einsum("kp,kpc->kc", attention, features) * _sigmoid(h @ p["gate"])
  gates = np.concatenate([p["embed"][tokens], context], -1) @ p["lstm_x"] + h @ p["lstm_h"]
  i, f, g, o = np.split(gates + p["lstm_b"], 4, axis=-1)
  c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  h = _sigmoid(o) * np.tanh(c)
  logits = h @ p["out"] + p["out_b"]
  logits[:, EOS] += eos_bias(step)
  return _log_softmax(logits), h, c


def tutorial_beam_search(p, image_features, *, beam_size, max_len):
  """Per-image beam search in the style of the popular tutorial: returns the best token list."""
  k = beam_size
  features = np.repeat(image_features[None], k, axis=0)  # [k, P, C]
  projected = features @ p["enc_att"]
  mean = image_features.mean(0, keepdims=True)
  h = np.repeat(np.tanh(mean @ p["init_h"]), k, 0)
  c = np.repeat(np.tanh(mean @ p["init_c"]), k, 0)
  tokens = np.full(k, BOS)
  seqs = np.zeros((k, 0), np.int64)
  live_scores = np.zeros(k, np.float32)
  complete, complete_scores = [], []
  for step in range(max_len):
    log_probs, h, c = numpy_step(p, features, projected, h, c, tokens, step)
    scores = live_scores[:, None] + log_probs
    flat = scores[0] if step == 0 else scores.reshape(-1)  # all beams are equal at the start
    best = np.argpartition(-flat, k - 1)[:k]
    best = best[np.argsort(-flat[best])]
    parents, tokens = best // VOCAB, best % VOCAB
    seqs = np.concatenate([seqs[parents], tokens[:, None]], axis=1)
    ended = tokens == EOS
    complete += list(seqs[ended])
    complete_scores += list(flat[best][ended])
    k -= int(ended.sum())
    if k == 0:
      break
    keep = parents[~ended]
    seqs, tokens, live_scores = seqs[~ended], tokens[~ended], flat[best][~ended]
    h, c, features, projected = h[keep], c[keep], features[keep], projected[keep]
  if not complete:  # the tutorial crashes here; take the live beams instead
    complete, complete_scores = list(seqs), list(live_scores)
  return complete[int(np.argmax(complete_scores))].tolist()


# --- measurement -------------------------------------------------------------------------------


def time_batched(params, features, *, beam_size, max_len, repeats):
  start = time.perf_counter()
  result = jax.block_until_ready(batched_search(params, features, beam_size=beam_size,
                                                max_len=max_len))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(batched_search(params, features, beam_size=beam_size,
                                                  max_len=max_len))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s, result


def main(argv):
  del argv
  backend = jax.default_backend()
  batch_sizes = [int(b) for b in (_BATCH_SIZES.value or
                                  ("1,32" if backend == "cpu" else "1,32,256")).split(",")]
  beam_sizes = [int(k) for k in _BEAM_SIZES.value.split(",")]
  max_len, repeats = _MAX_LEN.value, _REPEATS.value
  params_np = init_params()
  params = jax.device_put(params_np)
  rng = np.random.default_rng(1)
  all_features = np.abs(rng.standard_normal((max(batch_sizes), GRID, CHANNELS))).astype(np.float32)

  rows = []
  for batch in batch_sizes:
    features = jax.device_put(all_features[:batch])
    for beam in [0] + beam_sizes:
      seconds, compile_s, result = time_batched(params, features, beam_size=beam, max_len=max_len,
                                                repeats=repeats)
      rows.append({"method": "greedy_search" if beam == 0 else "beam_search", "batch": batch,
                   "beam": max(beam, 1), "seconds": seconds, "compile_seconds": compile_s,
                   "captions_per_s": batch / seconds,
                   "mean_length": float(np.mean(np.asarray(result.lengths)[:, 0]))})

  baseline = []
  n_images = min(_BASELINE_IMAGES.value, len(all_features))
  for beam in beam_sizes if n_images else []:
    start = time.perf_counter()
    captions = [tutorial_beam_search(params_np, all_features[i], beam_size=beam, max_len=max_len)
                for i in range(n_images)]
    seconds = time.perf_counter() - start
    entry = {"method": "numpy per-image loop", "beam": beam, "images": n_images,
             "seconds": seconds, "captions_per_s": n_images / seconds,
             "mean_length": float(np.mean([len(c) for c in captions]))}
    if beam == 1:  # both are greedy here: the captions should agree (up to float near-ties)
      greedy = np.asarray(batched_search(params, jax.device_put(all_features[:n_images]),
                                         beam_size=0, max_len=max_len).tokens)[:, 0]
      entry["agrees_with_greedy_search"] = float(np.mean(
          [list(greedy[i, :len(c)]) == c for i, c in enumerate(captions)]))
    baseline.append(entry)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}), {os.cpu_count()} CPUs; max_len {max_len}; "
        f"vocab {VOCAB}, hidden {HIDDEN}, features {GRID}x{CHANNELS}")
  print(f"{'method':<22}{'batch':>6}{'beam':>5}{'ms/batch':>11}{'captions/s':>12}"
        f"{'vs loop':>9}{'compile s':>11}{'mean len':>9}")
  loop_rate = {entry["beam"]: entry["captions_per_s"] for entry in baseline}
  for row in rows:
    speedup = row["captions_per_s"] / loop_rate[row["beam"]] if row["beam"] in loop_rate else None
    row["speedup_vs_loop"] = speedup
    print(f"{row['method']:<22}{row['batch']:>6}{row['beam']:>5}{row['seconds'] * 1e3:>11.1f}"
          f"{row['captions_per_s']:>12.1f}{(f'{speedup:.1f}x' if speedup else '-'):>9}"
          f"{row['compile_seconds']:>11.1f}{row['mean_length']:>9.1f}")
  for entry in baseline:
    print(f"{entry['method']:<22}{'1':>6}{entry['beam']:>5}"
          f"{entry['seconds'] / entry['images'] * 1e3:>11.1f}{entry['captions_per_s']:>12.1f}"
          f"{'1.0x':>9}{'-':>11}{entry['mean_length']:>9.1f}"
          + (f"   agrees with greedy_search on {entry['agrees_with_greedy_search']:.0%}"
             if "agrees_with_greedy_search" in entry else ""))

  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps({
      "device": device.device_kind, "backend": backend, "cpus": os.cpu_count(),
      "python": platform.python_version(), "jax": jax.__version__, "max_len": max_len,
      "model": {"vocab": VOCAB, "hidden": HIDDEN, "embed": EMBED, "attention": ATTENTION,
                "features": [GRID, CHANNELS]},
      "batched": rows, "baseline": baseline}, indent=2))
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
