"""Images/s of decode + resize + batch on real Flickr8k JPEGs: flaxcap's tf.data pipelines vs Pillow.

    python bench/input_pipeline.py --root ../shared/data/flickr8k [--num_images 2000] [--image_sizes 224,160]

Rows (all in this process, files already in the page cache after a warm-up read):
  pillow_loop     baseline: images.load_image (Pillow decode + resize) one by one in Python
  image_dataset   input_pipeline.image_dataset: decode + resize + batch (the feature-cache path)
  train_dataset   input_pipeline.train_dataset: the same plus caption tokens, [devices, batch, ...]
CPU ms/image counts every thread of this process; "if CPUs free" = threads / (CPU s per image), the
rate the pipeline would reach with the machine to itself (the CPUs are often shared); the baseline
loop has one thread. Writes
bench/results/input_pipeline.json with the table and the machine's load at the time.
"""

import argparse
import os
import pathlib
import platform
import resource
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import logging  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from flaxcap import datasets  # noqa: E402
from flaxcap import images  # noqa: E402
from flaxcap import input_pipeline  # noqa: E402
from flaxcap import vocab as vocab_lib  # noqa: E402


def _cpu_seconds():
  """User + system CPU time of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _measure(make_iterator, count_of, warmup_batches=2):
  """(images/s wall clock, CPU ms per image, images) over a pass, after `warmup_batches` batches."""
  iterator = make_iterator()
  for _ in range(warmup_batches):
    next(iterator)
  start, cpu_start, images_done = time.perf_counter(), _cpu_seconds(), 0
  for batch in iterator:
    images_done += count_of(batch)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  return images_done / wall, 1000 * cpu / images_done, images_done


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=str(REPO_ROOT.parent / "shared" / "data" / "flickr8k"))
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--image_sizes", type=lambda text: [int(v) for v in text.split(",")],
                      default=[224, 160], help="comma-separated; 224 = the files' own size (no resize)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--baseline_images", type=int, default=500, help="images for the Pillow loop")
  parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "input_pipeline.json"))
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)

  config = default.get_config()
  config.data.layout, config.data.root = "flickr8k", args.root
  config.batch_size = args.batch_size
  records = datasets.load_records(config.data, "train")[:args.num_images]
  for record in records:  # warm the page cache so every row reads from memory
    pathlib.Path(record.image_path).read_bytes()
  vocab = vocab_lib.Vocabulary.build((c for r in records for c in r.captions), min_count=5)

  cpus = os.cpu_count()
  rows = []
  for image_size in args.image_sizes:
    config.image_size = image_size
    baseline = records[:args.baseline_images]
    rows.append((image_size, "pillow_loop (baseline)", 1) + _measure(
        lambda: (images.load_image(r.image_path, image_size, exif_transpose=False) for r in baseline),
        lambda image: 1, warmup_batches=1))
    for _ in input_pipeline.image_dataset(records[:256], config, batch_size=args.batch_size):
      pass  # TF start-up (thread pools, graph optimization) outside the measurement
    rows.append((image_size, "image_dataset", cpus) + _measure(
        lambda: input_pipeline.image_dataset(records, config, batch_size=args.batch_size),
        lambda batch: int(batch["mask"].sum())))
    rows.append((image_size, "train_dataset", cpus) + _measure(
        lambda: input_pipeline.train_dataset(records, vocab, config, seed=0, num_devices=1,
                                             process_index=0, process_count=1),
        lambda batch: batch["tokens"].shape[0] * batch["tokens"].shape[1]))

  load_average = os.getloadavg()
  print(f"decode + resize + batch {args.batch_size}, {len(records)} Flickr8k JPEGs (224x224 on disk), "
        f"{cpus} CPUs, load average {load_average[0]:.1f} (other processes share the CPUs: the "
        "wall-clock rate is a lower bound)")
  print(f"{'size':>5}  {'pipeline':<24}{'images/s':>10}{'vs baseline':>13}{'CPU ms/image':>14}"
        f"{'images/s if CPUs free':>23}")
  table = []
  for image_size, name, threads, rate, cpu_ms, count in rows:
    baseline_rate = next(r[3] for r in rows if r[0] == image_size)
    free_rate = threads * 1000 / cpu_ms
    print(f"{image_size:>5}  {name:<24}{rate:>10.0f}{rate / baseline_rate:>12.1f}x{cpu_ms:>14.2f}"
          f"{free_rate:>23.0f}")
    table.append({"image_size": image_size, "pipeline": name, "images_per_s": round(rate, 1),
                  "cpu_ms_per_image": round(cpu_ms, 3), "images_per_s_if_cpus_free": round(free_rate, 1),
                  "images": count})
  result = {
      "benchmark": "input_pipeline", "batch_size": args.batch_size, "num_images": len(records),
      "cpus": cpus, "load_average_1_5_15min": load_average, "python": platform.python_version(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": table,
  }
  result["machine"] = common.machine(torch_too=False)
  common.write_json(args.out, result)


if __name__ == "__main__":
  main()
