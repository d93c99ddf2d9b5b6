"""Encoder forward speed on this machine's CPU: Flax (jitted, after compile) vs the torch reference.

Both sides start from the same uint8 images [batch, H, W, 3] in host memory, normalize them and
return the feature grid of the last conv stage (Flax: `encoder.apply`; torch: the reference
`efficientnet_lite_pytorch.EfficientNet.extract_features` under `torch.inference_mode()`), at each
model's native image size, with the packaged ImageNet weights. Prints a table and writes JSON.

    python bench/encoders.py [--batch_size=32] [--repeats=5] [--output=bench/results/encoders.json]
"""

import json
import os
import pathlib
import platform
import statistics
import sys
import time

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import torch  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

from flaxcap import encoders  # noqa: E402
from flaxcap import pretrained  # noqa: E402

_NAMES = flags.DEFINE_list("names", ["efficientnet_lite0", "efficientnet_lite2"], "Encoders.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes per encoder and framework.")
_OUTPUT = flags.DEFINE_string("output", str(REPO_ROOT / "bench" / "results" / "encoders.json"),
                              "Where the JSON results go.")


def _seconds_per_batch(forward, repeats: int) -> tuple[float, float]:
  """(first call's seconds, median seconds of `repeats` further calls)."""
  start = time.perf_counter()
  forward()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _flax_forward(name: str, images: np.ndarray):
  encoder = encoders.create_encoder(name)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), images)
  variables = pretrained.load_pretrained(name, shapes)
  apply = jax.jit(encoder.apply)
  return lambda: apply(variables, images).block_until_ready()


def _torch_forward(name: str, images: np.ndarray):
  model = EfficientNet.from_pretrained(name.replace("_", "-"),
                                       weights_path=pretrained.packaged_weights_path(name)).eval()
  mean = torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)

  def forward():
    with torch.inference_mode():
      pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
      return model.extract_features((pixels - mean) / std)

  return forward


def main(argv):
  del argv
  rows = []
  for name in _NAMES.value:
    size = encoders.native_image_size(name)
    images = np.random.default_rng(0).integers(0, 256, (_BATCH_SIZE.value, size, size, 3),
                                               dtype=np.uint8)
    for framework, build in (("flax", _flax_forward), ("torch", _torch_forward)):
      first, per_batch = _seconds_per_batch(build(name, images), _REPEATS.value)
      rows.append(dict(encoder=name, framework=framework, image_size=size,
                       batch_size=_BATCH_SIZE.value, images_per_s=_BATCH_SIZE.value / per_batch,
                       seconds_per_batch=per_batch, first_call_s=first))
  flax_by_name = {r["encoder"]: r["images_per_s"] for r in rows if r["framework"] == "flax"}
  print(f"{'encoder':<20} {'framework':<9} {'size':>4} {'batch':>5} {'images/s':>9} "
        f"{'s/batch':>8} {'1st call s':>10} {'flax/torch':>10}")
  for r in rows:
    ratio = flax_by_name[r["encoder"]] / r["images_per_s"] if r["framework"] == "torch" else None
    print(f"{r['encoder']:<20} {r['framework']:<9} {r['image_size']:>4} {r['batch_size']:>5} "
          f"{r['images_per_s']:>9.1f} {r['seconds_per_batch']:>8.3f} {r['first_call_s']:>10.2f} "
          f"{'' if ratio is None else f'{ratio:.2f}x':>10}")
  results = dict(
      benchmark="encoder forward (features of the last conv stage), CPU",
      rows=rows,
      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   load_average_1_5_15=os.getloadavg(), torch_threads=torch.get_num_threads(),
                   jax_devices=[str(d) for d in jax.devices()]),
      versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
      repeats=_REPEATS.value,
      note="median of the timed calls after one untimed call (Flax: the compile)",
  )
  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(results, indent=2))
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
