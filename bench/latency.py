"""Single-image latency, file on disk to caption text, beam 3: flaxcap's Captioner vs the torch pipeline.

Both pipelines start from the path of a JPEG and end with the caption string, one image at a time, after
warm-up calls (flaxcap: compilation):

  flaxcap  `flaxcap.inference.Captioner.caption([path], beam_size=3, consensus_neighbours=0)`: Pillow
           decode (JPEG draft mode) + resize to 224, then one jitted function: EfficientNet-Lite0 +
           `decoding.search`, then the text: the beam's best.
  flaxcap_consensus (with --pipelines=...,flaxcap_consensus) the same, then the beam reranked by
           consensus over --consensus neighbours (`flaxcap.consensus`): what `Captioner.caption` and
           `infer.py` do by default for a model with a consensus index, the shipped one included.
  torch    Pillow decode + resize to 224, `efficientnet_lite_pytorch` Lite0 `extract_features`, the
           tutorial's per-image beam search (`torch_reference.beam_search_per_image`), the text; eager,
           under `torch.inference_mode()`.

The model: by default (`--model=random`) EfficientNet-Lite0 with its ImageNet weights and a decoder with
random weights built here (`workloads.end_captions_near` makes its captions 12 tokens long, as a trained
model's are; the words are "w<id>"), the same weights in both pipelines. `--model=shipped` loads the
model shipped in models/flickr8k (`Captioner.load()`, the issue-8 target: <= 50 ms file -> caption),
`--checkpoint DIR` another trained flaxcap model; the torch pipeline then gets its decoder weights and
the packaged ImageNet encoder (a fine-tuned encoder changes the captions, not the speed). A trained
model's beam search stops once no live hypothesis can win (on the CPU), so its time depends on where
its captions end; the random decoder's always end at 12 tokens.

The image: --image, or by default a 500x375 JPEG (quality 90, Flickr8k's usual size) written to
bench/results/ from the first Flickr8k photo, or from noise when the data set is absent.

With --stages (the default on a GPU; run_all.py --full passes it on the CPU) the script also times each
stage on its own (decode + resize, encoder, search; flaxcap's stages as separately jitted functions,
compiled with the Captioner's XLA options), which is the profile BENCHMARKS.md discusses. flaxcap's
encoder stage compiles while its pipeline is built, so it is part of "load + 1st call s" then.

    python bench/latency.py [--model=shipped | --checkpoint DIR] [--image PHOTO.jpg] [--repeats 20]
        [--torch_repeats 10] [--stages]

Prints a table and writes JSON (default bench/results/latency.json).
"""

import dataclasses
import functools
import os
import pathlib
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoding  # noqa: E402
from flaxcap import encoders  # noqa: E402
from flaxcap import images as images_lib  # noqa: E402
from flaxcap import inference  # noqa: E402
from flaxcap import model as model_lib  # noqa: E402

FLICKR8K_IMAGES = common.FLICKR8K_IMAGES

_IMAGE = flags.DEFINE_string("image", None, "The image file (default: see the module docstring).")
_MODEL = flags.DEFINE_enum("model", "random", ["random", "shipped"],
                           "random: random decoder weights (see above); shipped: models/flickr8k.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A trained flaxcap model (overrides --model).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 3, "Beam width.")
_MAX_LEN = flags.DEFINE_integer("max_len", 20, "Longest caption in tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed captions per pipeline (the median counts), and "
                                "timed calls per stage.")
# In BENCHMARKS.md's 30-repeat CPU runs the median of 10 consecutive torch captions (~170 ms each) was
# within 1% (1 thread) and 8% (2 threads) of the median of all 30; flaxcap's (~45 ms) moved up to 14%,
# so it keeps --repeats.
_TORCH_REPEATS = flags.DEFINE_integer("torch_repeats", None, "The same for the torch pipeline (default: "
                                      "--repeats when given or on a GPU, else 10).")
_PIPELINES = flags.DEFINE_list("pipelines", ["flaxcap", "torch"], "flaxcap, torch and/or "
                               "flaxcap_consensus (flaxcap with --consensus reranking).")
_CONSENSUS = flags.DEFINE_integer("consensus", 15, "Neighbours of the flaxcap_consensus pipeline "
                                  "(`infer.py --consensus`; the model needs a consensus index).")
_STAGES = flags.DEFINE_bool("stages", None, "Also time each stage on its own (default: on a GPU; on the "
                            "CPU only when asked, as run_all.py --full does: flaxcap's stage functions "
                            "compile for ~10 s there).")
_OUTPUT = flags.DEFINE_string("output", "latency", "JSON path, or a name under bench/results/.")


default_image = common.default_image  # a 500x375 JPEG under bench/results/ (see bench/common.py)


@dataclasses.dataclass
class Pipeline:
  """A file-to-text function and its stages, each runnable on its own for the profile."""
  name: str
  caption: Callable[[str], str]  # path -> caption text
  stages: dict[str, Callable[[], object]]  # stage name -> a call that runs it (and waits)
  description: str


def flaxcap_model(checkpoint: str | None, caption_length: int = 12, *, shipped: bool = False):
  """(Captioner, decoder params as numpy, description); see the module docstring."""
  if shipped and not checkpoint:
    checkpoint = str(inference.default_checkpoint())
  if checkpoint:
    captioner = inference.Captioner.load(checkpoint)
    return captioner, jax.tree.map(np.asarray, captioner.decoder_params), f"checkpoint {checkpoint}"
  sizes = workloads.SIZES["lite0"]
  config = workloads.config_for(sizes, dropout=0.0)
  config.encoder.weights = "imagenet"
  config.eval.max_len, config.eval.length_penalty = 20, 0.0
  decoder = model_lib.create_decoder(config, sizes.vocab)
  params = workloads.end_captions_near(workloads.init_decoder_params(decoder, sizes), length=caption_length)
  encoder, encoder_variables = model_lib.pretrained_encoder(config)
  captioner = inference.Captioner(config, workloads.synthetic_vocab(sizes.vocab), params, encoder,
                                  encoder_variables)
  return captioner, params, ("EfficientNet-Lite0 ImageNet weights + random decoder weights (captions of "
                             f"{caption_length} tokens), vocabulary {sizes.vocab}")


def flaxcap_pipeline(captioner, *, path: str, beam_size: int, max_len: int,
                     stages: bool = True, consensus_neighbours: int = 0) -> Pipeline:
  """`Captioner.caption`; with `stages`, its stages as separately jitted functions (the encoder's
  compiled here). `consensus_neighbours` > 0: the beam reranked by consensus (no stages)."""
  size = captioner.config.image_size

  def caption(image_path):
    result = next(iter(captioner.caption([image_path], beam_size=beam_size, max_len=max_len,
                                         consensus_neighbours=consensus_neighbours)))
    if isinstance(result, inference.Failure):
      raise RuntimeError(result.message)
    return result.text

  description = "Captioner.caption([path]) (one jitted encoder + search)"
  if consensus_neighbours:
    return Pipeline("flaxcap_consensus", caption, {},
                    description + f", consensus reranking of the beam, {consensus_neighbours} "
                    "neighbours (the index's first use, ~0.5 s, is in setup_s)")
  if not stages:
    return Pipeline("flaxcap", caption, {}, description)
  image = images_lib.load_image(path, size)[None]
  options = inference.compiler_options()  # as the Captioner's own function
  encode = jax.jit(captioner.encoder.apply, compiler_options=options)
  features = encode(captioner.encoder_variables, image)
  search = jax.jit(functools.partial(decoding.search, captioner.decoder, beam_size=beam_size,
                                     max_len=max_len,
                                     length_penalty=captioner.config.eval.length_penalty),
                   compiler_options=options)
  stages = {
      "decode + resize": lambda: images_lib.load_image(path, size),
      "encoder": lambda: encode(captioner.encoder_variables, image).block_until_ready(),
      "search": lambda: search(captioner.decoder_params, features,
                               word_gate_table=captioner.word_gate_table).tokens.block_until_ready(),
  }
  return Pipeline("flaxcap", caption, stages, description)


def torch_pipeline(captioner, decoder_params, *, path: str, beam_size: int, max_len: int,
                   stages: bool = True) -> Pipeline:
  """`torch_reference.CaptionPipeline` with the flaxcap model's decoder weights and vocabulary."""
  from bench import torch_reference  # pylint: disable=g-import-not-at-top
  config, vocab = captioner.config, captioner.vocab
  channels = encoders.feature_shape(config.encoder.name, config.image_size,
                                    config.encoder.feature_stage)[-1]
  device = common.torch_device()
  dec = config.decoder
  decoder = torch_reference.SoftAttentionDecoder(len(vocab), channels, embed_dim=dec.embed_dim,
                                                 hidden_dim=dec.hidden_dim,
                                                 attention_dim=dec.attention_dim, dropout=0.0)
  torch_reference.load_flaxcap_decoder_params(decoder, decoder_params)
  encoder = torch_reference.efficientnet_lite(config.encoder.name, pretrained=True)
  pipeline = torch_reference.CaptionPipeline(encoder.to(device), decoder.to(device), list(vocab.words),
                                             image_size=config.image_size, beam_size=beam_size,
                                             max_len=max_len)
  description = "Pillow + efficientnet_lite_pytorch + per-image beam search, eager"
  if not stages:
    return Pipeline("torch", pipeline, {}, description)
  pixels = pipeline.load(path)
  features = pipeline.encode(pixels)
  stages = {"decode + resize": lambda: pipeline.load(path),
            "encoder": lambda: (pipeline.encode(pixels), common.torch_sync(device)),
            "search": lambda: pipeline.search(features)}
  return Pipeline("torch", pipeline, stages, description)


# The printed table (also rendered by bench/report.py).
COLUMNS = [common.Column("pipeline", "pipeline"), common.Column("stage", "stage"),
           common.Column("ms", "median ms", ".1f"), common.Column("min_ms", "min ms", ".1f"),
           common.Column("vs_torch", "speed-up vs torch", ".2f"),
           common.Column("setup_s", "load + 1st call s", ".1f")]


def main(argv):
  del argv
  common.configure_torch()
  path = str(_IMAGE.value or default_image())
  beam_size, max_len, repeats = _BEAM_SIZE.value, _MAX_LEN.value, _REPEATS.value
  info = common.machine()
  print(common.machine_line(info), flush=True)
  captioner, decoder_params, model_description = flaxcap_model(_CHECKPOINT.value,
                                                               shipped=_MODEL.value == "shipped")
  gpu = common.on_gpu()
  stages = gpu if _STAGES.value is None else _STAGES.value
  builders = {
      "flaxcap": lambda: flaxcap_pipeline(captioner, path=path, beam_size=beam_size, max_len=max_len,
                                          stages=stages),
      "flaxcap_consensus": lambda: flaxcap_pipeline(
          captioner, path=path, beam_size=beam_size, max_len=max_len, stages=False,
          consensus_neighbours=_CONSENSUS.value),
      "torch": lambda: torch_pipeline(captioner, decoder_params, path=path, beam_size=beam_size,
                                      max_len=max_len, stages=stages),
  }
  torch_repeats = _TORCH_REPEATS.value or (repeats if gpu or flags.FLAGS["repeats"].present else 10)
  all_repeats = {"flaxcap": repeats, "flaxcap_consensus": repeats, "torch": torch_repeats}
  # Stage warm-ups: the first call compiles flaxcap's stage functions; on a GPU one more.
  stage_warmup = 2 if gpu else 1
  rows, texts = [], {}
  for name in _PIPELINES.value:
    start = time.perf_counter()
    pipeline = builders[name]()
    texts[name] = pipeline.caption(path)  # warm-up: compiles flaxcap's function for this shape
    setup_s = time.perf_counter() - start
    timing = common.time_calls(lambda: pipeline.caption(path), repeats=all_repeats[name], warmup=1)
    rows.append({"pipeline": name, "stage": "file -> caption text", "ms": timing.median_s * 1e3,
                 "min_ms": timing.min_s * 1e3, "setup_s": setup_s, "timing": timing.as_dict(),
                 "repeats": all_repeats[name], "description": pipeline.description})
    for stage, run in pipeline.stages.items():
      stage_timing = common.time_calls(run, repeats=all_repeats[name], warmup=stage_warmup)
      rows.append({"pipeline": name, "stage": f"  {stage}", "ms": stage_timing.median_s * 1e3,
                   "min_ms": stage_timing.min_s * 1e3, "timing": stage_timing.as_dict()})
  for row in rows:
    other = next((r for r in rows if r["stage"] == row["stage"] and r["pipeline"] == "torch"), None)
    row["vs_torch"] = other["ms"] / row["ms"] if other and row["pipeline"] != "torch" else None
  print()
  image_size = Image.open(path).size
  common.print_table(rows, COLUMNS, title=(
      f"one image file ({pathlib.Path(path).name}, {image_size[0]}x{image_size[1]}) -> caption, beam "
      f"{beam_size}, max_len {max_len}, median of {repeats} (torch: {all_repeats['torch']}) after "
      f"warm-up; model: {model_description}; "
      f"{common.machine_line(info)}"))
  for name, text in texts.items():
    print(f"{name} caption: {text}")
  common.write_json(_OUTPUT.value, {
      "benchmark": "latency", "machine": info, "image": path, "image_size": image_size,
      "file_bytes": os.path.getsize(path), "beam_size": beam_size, "max_len": max_len,
      "repeats": repeats, "torch_repeats": all_repeats["torch"], "stages": stages,
      "model": model_description, "captions": texts, "target_ms": 50.0, "rows": rows})


if __name__ == "__main__":
  app.run(main)
