"""Encoder forward speed: Flax (jitted, after compile) vs the torch reference, in one run.

Both sides start from the same uint8 images [batch, H, W, 3] in host memory, normalize them and
return the feature grid of the last conv stage (Flax: `encoder.apply`; torch: the reference
`efficientnet_lite_pytorch.EfficientNet.extract_features` under `torch.inference_mode()`, through
bench/torch_reference.py), at each model's native image size, with the packaged ImageNet weights.
Prints a table and writes JSON.

    python bench/encoders.py [--batch_size=32] [--repeats=5] [--output=bench/results/encoders.json]
"""

import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench import torch_reference  # noqa: E402
from flaxcap import encoders  # noqa: E402
from flaxcap import pretrained  # noqa: E402

_NAMES = flags.DEFINE_list("names", ["efficientnet_lite0", "efficientnet_lite2"], "Encoders.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes per encoder and framework.")
_OUTPUT = flags.DEFINE_string("output", "encoders", "JSON path, or a name under bench/results/.")


def _flax_forward(name: str, images: np.ndarray):
  encoder = encoders.create_encoder(name)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), images)
  variables = pretrained.load_pretrained(name, shapes)
  apply = jax.jit(encoder.apply)
  return lambda: apply(variables, images).block_until_ready()


def _torch_forward(name: str, images: np.ndarray):
  model = torch_reference.efficientnet_lite(name, pretrained=True).eval()

  def forward():
    with torch.inference_mode():
      return model.extract_features(torch_reference.normalize_images(torch.from_numpy(images)))

  return forward


def main(argv):
  del argv
  common.configure_torch()
  rows = []
  for name in _NAMES.value:
    size = encoders.native_image_size(name)
    images = np.random.default_rng(0).integers(0, 256, (_BATCH_SIZE.value, size, size, 3),
                                               dtype=np.uint8)
    for framework, build in (("flax", _flax_forward), ("torch", _torch_forward)):
      timing = common.time_calls(build(name, images), repeats=_REPEATS.value, warmup=1)
      rows.append(dict(encoder=name, framework=framework, image_size=size,
                       batch_size=_BATCH_SIZE.value, images_per_s=_BATCH_SIZE.value / timing.median_s,
                       seconds_per_batch=timing.median_s, first_call_s=timing.first_s))
  flax_by_name = {r["encoder"]: r["images_per_s"] for r in rows if r["framework"] == "flax"}
  for r in rows:
    r["flax_vs_torch"] = flax_by_name[r["encoder"]] / r["images_per_s"] if r["framework"] == "torch" else None
  info = common.machine()
  common.print_table(rows, [
      common.Column("encoder", "encoder"), common.Column("framework", "framework"),
      common.Column("image_size", "size"), common.Column("batch_size", "batch"),
      common.Column("images_per_s", "images/s", ".1f"), common.Column("seconds_per_batch", "s/batch", ".3f"),
      common.Column("first_call_s", "1st call s", ".2f"), common.Column("flax_vs_torch", "flax/torch", ".2f")],
      title=f"encoder forward, {common.machine_line(info)}")
  common.write_json(_OUTPUT.value, dict(
      benchmark="encoder forward (features of the last conv stage)", rows=rows, machine=info,
      repeats=_REPEATS.value,
      note="median of the timed calls after one untimed call (Flax: the compile)"))


if __name__ == "__main__":
  app.run(main)
