"""Captions per second from encoder features to token ids: flaxcap's batched search vs torch, one run.

The model is flaxcap's `Decoder` at lite0 sizes (EfficientNet-Lite0's 7x7x1280 grid, LSTM/attention/
embedding 512, vocabulary 2,600) with random weights edited by `workloads.end_captions_near` so that
captions end after --caption_length tokens as a trained model's do (0: leave them running to max_len).
The torch reference gets the same weights (`torch_reference.load_flaxcap_decoder_params`), so the searches
can be compared caption for caption. Methods:

  flaxcap        `flaxcap.decoding.search` under `jax.jit`: the encoded features once per image, the K
                 beams attending the image's single copy, the whole batch in one `lax.scan` of
                 max_len steps, which by default on the CPU skips the steps after no live hypothesis
                 can win (--early_stop: off, cond or while, several in one run); greedy_search
                 at beam 1; the word gate table (`Decoder.word_gate_table`) computed once outside the
                 timing, as the Captioner does
  torch_batched  `torch_reference.beam_search_batched`: the same algorithm in eager torch, stopping as
                 soon as no live hypothesis can win
  torch_loop     `torch_reference.beam_search_per_image`: the tutorial's per-image Python loop; it is
                 batch-size independent, so it is timed once per beam on --loop_images images

--project_context, --candidate_top_k and --early_stop override three of flaxcap's choices
(`decoding.search`, `top_k.CANDIDATE_TOP_K`); each flaxcap row records them (candidate_top_k as the
method used, early_stop as off, cond or while).

Warm-up: flaxcap's first call compiles (its time is "1st call s"); torch_batched gets one untimed call.
On a GPU flaxcap gets one more untimed call and the loop one untimed pass over its images; on the CPU
the loop is warmed up on one image (its "1st call s" is then "-").

"agrees" is the share of images whose best caption equals flaxcap's (its first --early_stop row's).
On a GPU the flaxcap rows also show achieved TFLOP/s and GB/s against the matmul and copy peaks
measured at the start of the run, from the FLOPs and the least bytes of a decode step (bench/roofline.py) times the steps the search took (its
"steps": max_len, or fewer with the early stop).

    python bench/beam_search.py                                   # CPU default: batch 1, float32 (~20 s)
    python bench/beam_search.py --batch_sizes=1,32,256 --dtypes=bfloat16,float32  # the full grid (GPU default)

Prints a table and writes JSON (default bench/results/beam_search.json).
"""

import dataclasses
import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench import decoder_flags  # noqa: E402
from bench import roofline  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoding  # noqa: E402
from flaxcap import inference  # noqa: E402
from flaxcap import step_loop  # noqa: E402
from flaxcap import top_k as top_k_lib  # noqa: E402

_BATCH_SIZES = flags.DEFINE_string("batch_sizes", None,
                                   "Comma-separated batch sizes (default: 1 on the CPU, 1,32,256 on a GPU; "
                                   "run_all.py --full: 1,32,256).")
_BEAM_SIZES = flags.DEFINE_string("beam_sizes", "1,3,5", "Comma-separated beam sizes.")
_MAX_LEN = flags.DEFINE_integer("max_len", 20, "Decoding steps (the longest caption, <eos> included).")
_DTYPES = flags.DEFINE_list("dtypes", None, "Compute dtypes (default: float32 on the CPU, "
                            "bfloat16,float32 on a GPU).")
_CAPTION_LENGTH = flags.DEFINE_integer("caption_length", 12,
                                       "Tokens per caption the edited weights produce (0: unedited).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls per row (default: 3 on the CPU, 20 on a GPU).")
_LOOP_IMAGES = flags.DEFINE_integer("loop_images", None,
                                    "Images the per-image loop is timed on (default: 8 on the CPU, 32 on a GPU).")
_UNROLL = flags.DEFINE_integer("unroll", 1, "Decoding steps per scan iteration in flaxcap's search "
                               "(>= max_len: no loop at all).")
_DUMP_HLO = flags.DEFINE_bool("dump_hlo", False, "Write the compiled HLO of each flaxcap search to "
                               "bench/results/beam_search_hlo_<dtype>_b<batch>_k<beam>_u<unroll>.txt "
                               "(to count the kernels of a decoding step).")
_PROJECT_CONTEXT = flags.DEFINE_enum("project_context", "auto", ["auto", "on", "off"],
                                      "flaxcap: `decoding.search(project_context=...)`; auto: "
                                      "the library's choice.")
_CANDIDATE_TOP_K = flags.DEFINE_enum("candidate_top_k", "auto",
                                     ["auto", *top_k_lib.CANDIDATE_METHODS],
                                     "flaxcap: how beam search takes its 2K best candidates "
                                     "(`top_k.CANDIDATE_TOP_K`); auto: the library's choice.")
_EARLY_STOP = flags.DEFINE_list("early_stop", ["auto"],
                                 "flaxcap: `decoding.search(early_stop=...)`, one row each: auto (the "
                                 "library's choice: cond on the CPU, while on a GPU), off, cond, while; "
                                 "e.g. off,cond,while.")
_FUSED_ATTENTION = flags.DEFINE_bool("fused_attention", False, "flaxcap: each step's attention in "
                                     "one Pallas kernel (config.decoder.fused_attention).")
_METHODS = flags.DEFINE_list("methods", ["flaxcap", "torch_batched", "torch_loop"], "What to time.")
_OUTPUT = flags.DEFINE_string("output", "beam_search", "JSON path, or a name under bench/results/.")


# The printed table (also rendered by bench/report.py).
COLUMNS = [common.Column("method", "method"), common.Column("dtype", "dtype"),
           common.Column("beam", "beam"), common.Column("batch", "batch"),
           common.Column("early_stop", "stop"), common.Column("steps", "steps"),
           common.Column("ms_per_batch", "ms/batch", ".2f"),
           common.Column("captions_per_s", "captions/s", ",.1f"),
           common.Column("vs_loop", "vs loop", ".1f"),
           common.Column("vs_torch_batched", "vs torch batched", ".2f"),
           common.Column("first_s", "1st call s", ".1f"), common.Column("mean_length", "mean len", ".1f"),
           common.Column("agrees", "agrees", ".0%"), common.Column("tflops", "TFLOP/s", ".3f"),
           common.Column("pct_matmul_peak", "% matmul", ".1f"), common.Column("gbps", "GB/s", ".1f"),
           common.Column("pct_copy_peak", "% copy", ".1f")]


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_reference  # pylint: disable=g-import-not-at-top
  common.configure_torch()
  gpu = common.on_gpu()
  # On the CPU batch 1 only: each (batch, beam) compiles for 2-7 s, and batch 32's three searches with
  # their torch counterparts took ~26 of the suite's seconds (BENCHMARKS.md keeps their last figures).
  batch_sizes = common.int_list(_BATCH_SIZES.value or ("1,32,256" if gpu else "1"))
  beam_sizes = common.int_list(_BEAM_SIZES.value)
  dtypes = _DTYPES.value or (["bfloat16", "float32"] if gpu else ["float32"])
  repeats = _REPEATS.value or (20 if gpu else 3)
  loop_images = _LOOP_IMAGES.value or (32 if gpu else 8)
  max_len, methods = _MAX_LEN.value, _METHODS.value
  sizes = workloads.SIZES["lite0"]
  info = common.machine()
  print(common.machine_line(info), flush=True)
  peaks = roofline.measure_peaks() if gpu else None
  device = common.torch_device()
  all_features = workloads.random_features(max(batch_sizes + [loop_images]), sizes)

  choice = {"auto": None, "on": True, "off": False}
  project_context = choice[_PROJECT_CONTEXT.value]
  stop_choice = {"auto": None, "off": False, **{loop: loop for loop in step_loop.STOP_LOOPS}}
  if unknown := set(_EARLY_STOP.value) - set(stop_choice):
    raise app.UsageError(f"--early_stop takes {', '.join(stop_choice)}; got {sorted(unknown)}.")
  early_stops = [stop_choice[value] for value in _EARLY_STOP.value]
  top_k_lib.CANDIDATE_TOP_K = None if _CANDIDATE_TOP_K.value == "auto" else _CANDIDATE_TOP_K.value
  rows = []
  for dtype in dtypes:
    decoder = workloads.decoder_for(sizes, dtype, fused_attention=_FUSED_ATTENTION.value,
                                    **decoder_flags.options())
    params = workloads.init_decoder_params(decoder, sizes)
    if _CAPTION_LENGTH.value:
      params = workloads.end_captions_near(params, length=_CAPTION_LENGTH.value)
    torch_decoder = torch_reference.SoftAttentionDecoder(sizes.vocab, sizes.channels, dropout=0.0)
    torch_reference.load_flaxcap_decoder_params(torch_decoder, params)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    torch_decoder = torch_decoder.to(device=device, dtype=torch_dtype).eval()
    params = jax.device_put(params)
    # As the Captioner does at load: each word's share of the LSTM gates, looked up per step.
    table = jax.jit(lambda p: decoder.apply({"params": p}, method="word_gate_table"))(params)
    best_tokens = {}  # (batch, beam) -> flaxcap's best tokens [batch, max_len]
    searches = {}  # (batch, beam) -> the jitted search
    for batch in batch_sizes:
      features = all_features[:batch]
      features_jax = jax.device_put(features)
      features_torch = torch.from_numpy(features.reshape(batch, sizes.locations, -1)).to(device, torch_dtype)
      for beam in beam_sizes:
        row_key = {"dtype": dtype, "batch": batch, "beam": beam}
        for n, early_stop in enumerate(early_stops):
          search = jax.jit(lambda p, f, beam=beam, early_stop=early_stop: decoding.search(
              decoder, p, f, beam_size=beam, max_len=max_len, unroll=_UNROLL.value,
              word_gate_table=table, project_context=project_context, early_stop=early_stop),
                           compiler_options=inference.compiler_options())  # as the Captioner's
          stop = step_loop.loop_for(early_stop) or "off"
          if _DUMP_HLO.value:
            hlo = search.lower(params, features_jax).compile().as_text()
            name = (f"beam_search_hlo_{dtype}_b{batch}_k{beam}_u{_UNROLL.value}"
                    f"{'' if stop == 'off' else '_' + stop}.txt")
            common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (common.RESULTS_DIR / name).write_text(hlo)
          start = time.perf_counter()
          result = jax.block_until_ready(search(params, features_jax))
          compile_s = time.perf_counter() - start  # compilation + one call
          if n == 0:
            best_tokens[batch, beam] = np.asarray(result.tokens)[:, 0]
            searches[batch, beam] = search
          if "flaxcap" not in methods:
            continue
          # The compiling call above warmed it up; on a GPU one more call.
          timing = common.time_calls(lambda: search(params, features_jax).tokens.block_until_ready(),
                                     repeats=repeats, warmup=1 if gpu else 0,
                                     warmup_s=common.GPU_WARMUP_S if gpu else 0.0)
          timing.first_s = compile_s
          lengths = np.asarray(result.lengths)
          steps = int(result.steps)
          row = dict(row_key, method="flaxcap", unroll=_UNROLL.value,
                     project_context=_PROJECT_CONTEXT.value, fused_attention=_FUSED_ATTENTION.value,
                     **decoder_flags.options(),
                     candidate_top_k=(top_k_lib.candidate_top_k_method(batch) if beam > 1
                                      else None),
                     early_stop=stop, steps=steps, timing=timing.as_dict(),
                     mean_length=float(np.mean(lengths[:, 0])),
                     agrees=float(np.mean(np.all(np.asarray(result.tokens)[:, 0]
                                                 == best_tokens[batch, beam], axis=1))) if n else None)
          flops = roofline.decode_step_flops(sizes, batch, beam) * steps
          moved = roofline.decode_step_bytes(sizes, batch, beam, dtype)["total"] * steps
          row.update(seconds=timing.median_s, tflops=flops / timing.median_s / 1e12,
                     gbps=moved / timing.median_s / 1e9)
          if peaks:
            row["pct_matmul_peak"] = 100 * row["tflops"] / peaks["matmul_tflops"][dtype]
            row["pct_copy_peak"] = 100 * row["gbps"] / peaks["copy_gbps"]
          rows.append(row)
        if "torch_batched" in methods:
          outputs = {}

          def run_torch(beam=beam):
            outputs["result"] = torch_reference.beam_search_batched(
                torch_decoder, features_torch, beam_size=beam, max_len=max_len)
            common.torch_sync(device)

          timing = common.time_calls(run_torch, repeats=repeats, warmup=1,
                                     warmup_s=common.GPU_WARMUP_S if gpu else 0.0)
          tokens, _, lengths = outputs["result"]
          tokens = tokens[:, 0].cpu().numpy()
          rows.append(dict(row_key, method="torch_batched", timing=timing.as_dict(),
                           seconds=timing.median_s, mean_length=float(lengths[:, 0].float().mean()),
                           agrees=float(np.mean(np.all(tokens == best_tokens[batch, beam], axis=1)))))
    if "torch_loop" in methods:
      features_torch = torch.from_numpy(
          all_features[:loop_images].reshape(loop_images, sizes.locations, -1)).to(device, torch_dtype)
      for beam in beam_sizes:
        covering = [b for b in batch_sizes if b >= loop_images]  # same images: a prefix of the batch
        if covering:
          reference = best_tokens[min(covering), beam][:loop_images]
        elif (1, beam) in searches:  # the compiled batch-1 search, image by image
          reference = np.concatenate([
              np.asarray(searches[1, beam](params, all_features[i:i + 1]).tokens)[:, 0]
              for i in range(loop_images)])
        else:
          reference = np.asarray(jax.jit(
              lambda p, f, beam=beam: decoding.search(decoder, p, f, beam_size=beam, max_len=max_len,
                                                      word_gate_table=table))(
                  params, all_features[:loop_images]).tokens)[:, 0]
        captions = []

        def run_loop(beam=beam):
          captions[:] = [torch_reference.beam_search_per_image(torch_decoder, features_torch[i],
                                                               beam_size=beam, max_len=max_len)[0]
                         for i in range(loop_images)]
          common.torch_sync(device)

        if gpu:
          timing = common.time_calls(run_loop, repeats=1, warmup=1)
        else:  # eager torch on the CPU compiles nothing: one image warms it up, not a whole loop
          torch_reference.beam_search_per_image(torch_decoder, features_torch[0], beam_size=beam,
                                                max_len=max_len)
          timing = common.time_calls(run_loop, repeats=1, warmup=0)  # no first_s: "-"
        rows.append({"dtype": dtype, "batch": 1, "beam": beam, "method": "torch_loop",
                     "images": loop_images, "timing": timing.as_dict(),
                     "seconds": timing.median_s / loop_images,
                     "mean_length": float(np.mean([len(c) for c in captions])),
                     "agrees": float(np.mean([list(reference[i, :len(c)]) == c and len(c) <= max_len
                                              for i, c in enumerate(captions)]))})

  for row in rows:
    row["captions_per_s"] = row["batch"] / row["seconds"]
    row["ms_per_batch"] = row["seconds"] * 1e3
  for row in rows:
    loop = next((r for r in rows if r["method"] == "torch_loop" and r["dtype"] == row["dtype"]
                 and r["beam"] == row["beam"]), None)
    batched = next((r for r in rows if r["method"] == "torch_batched" and
                    all(r[k] == row[k] for k in ("dtype", "batch", "beam"))), None)
    row["vs_loop"] = row["captions_per_s"] / loop["captions_per_s"] if loop else None
    row["vs_torch_batched"] = row["captions_per_s"] / batched["captions_per_s"] if batched else None
    row["first_s"] = row["timing"]["first_s"]
  rows.sort(key=lambda r: (r["dtype"], r["beam"], r["batch"], r["method"]))
  print()
  common.print_table(rows, COLUMNS, title=(
      f"beam search from features {sizes.grid}x{sizes.grid}x{sizes.channels} to token ids, vocab "
      f"{sizes.vocab}, max_len {max_len}, median of {repeats}; torch_loop: ms per image; "
      f"{common.machine_line(info)}"))
  common.write_json(_OUTPUT.value, {
      "benchmark": "beam_search", "machine": info, "peaks": peaks, "max_len": max_len,
      "caption_length": _CAPTION_LENGTH.value, "repeats": repeats, "loop_images": loop_images,
      "sizes": dataclasses.asdict(sizes),
      "notes": "captions/s = batch / median call; flaxcap's first call includes compilation; tflops and "
               "gbps from bench/roofline.py's decode-step FLOPs and least bytes x max_len",
      "rows": rows})


if __name__ == "__main__":
  app.run(main)
