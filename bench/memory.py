"""Memory: peak device memory of a train step (GPU) and peak resident memory of inference (CPU and GPU).

Every measurement runs in a fresh child process (`python bench/memory.py --child=NAME`), because a
process's peaks only ever grow:

  infer_flaxcap, infer_torch   one image file captioned (beam 3) three times; peak RSS (VmHWM) after the
                               imports and at the end. flaxcap: `Captioner.load()` of the shipped model
                               (models/flickr8k, as run_all's latency figure; --infer_model=random:
                               bench/latency.py's random decoder) and `Captioner.caption`, compiling
                               its programs. infer_flaxcap_cached: the same with JAX's persistent
                               compilation cache, which a first run has filled: what `infer.py`
                               (whose cache is on) peaks at from its second run on. torch:
                               bench/latency.py's torch pipeline; the child imports neither jax nor
                               flaxcap's model, and its decoder keeps torch's own random weights
                               (captions run to max_len 20). The two start together and run side by
                               side: a process's peak RSS does not depend on the others.
  train_<part>_<framework>_<dtype>
                               (GPU only) bench/training.py's train step at --train_batch (128) run for
                               3 steps: jax's `peak_bytes_in_use` of the device / torch's
                               `max_memory_allocated`; parts: decoder (tutorial sizes 14x14x2048) and
                               full (EfficientNet-Lite0 fine-tuned at 224 px)

On the CPU the train-step rows are skipped (no device memory to speak of: the host's RSS includes
everything else in the process).

    python bench/memory.py [--train_batch 128] [--infer_model shipped] [--memory_output memory]

Prints a table and writes JSON (default bench/results/memory.json).
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

_CHILD = flags.DEFINE_string("child", None, "Internal: run one measurement and print it as JSON.")
_ROWS = flags.DEFINE_list("rows", None, "Measurements to run, e.g. infer_flaxcap,train_decoder_flaxcap_float32 "
                          "(default: the inference rows, and on a GPU all eight train rows).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 128, "Batch of the train-step rows (GPU).")
_INFER_MODEL = flags.DEFINE_enum("infer_model", "shipped", ["shipped", "random"],
                                 "infer_flaxcap's model: models/flickr8k (when shipped; else random), or "
                                 "bench/latency.py's random decoder.")
# Not "output": the infer_flaxcap child imports bench/latency.py, which defines that flag.
_OUTPUT = flags.DEFINE_string("memory_output", "memory", "JSON path, or a name under bench/results/.")

_CACHE_DIR = flags.DEFINE_string("xla_cache_dir", None, "Internal: the infer_flaxcap_cached child's "
                                  "compilation cache.")

_MARK = "MEMORY_RESULT "
INFERENCE_ROWS = ["infer_flaxcap", "infer_flaxcap_cached", "infer_torch"]


def _start(name: str, cache_dir: str | None = None) -> subprocess.Popen:
  """Starts `python bench/memory.py --child=NAME` (its JSON line comes back on stdout).

  `cache_dir`: the compilation cache of an infer_flaxcap_cached child; this call first runs the same
  child to fill it, and waits for that run.
  """
  command = [sys.executable, __file__, f"--child={name}", f"--train_batch={_TRAIN_BATCH.value}",
             f"--infer_model={_INFER_MODEL.value}"]
  if common.TORCH_THREADS.value:
    command.append(f"--torch_threads={common.TORCH_THREADS.value}")
  if cache_dir:
    command.append(f"--xla_cache_dir={cache_dir}")
    filled = subprocess.run(command, capture_output=True, text=True, check=False)
    if filled.returncode:
      print(filled.stderr[-3000:], file=sys.stderr)
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child(name: str) -> dict:
  """Runs one measurement in this (fresh) process."""
  if name in ("infer_flaxcap", "infer_flaxcap_cached"):  # jax only: torch is not imported
    from bench import latency  # pylint: disable=g-import-not-at-top
    from flaxcap import inference  # pylint: disable=g-import-not-at-top
    after_imports = common.peak_rss_bytes()
    if name == "infer_flaxcap_cached":
      from flaxcap import compilation_cache  # pylint: disable=g-import-not-at-top
      compilation_cache.enable(_CACHE_DIR.value)
    path = str(common.default_image())
    shipped = _INFER_MODEL.value == "shipped" and inference.default_checkpoint().exists()
    captioner, _, _ = latency.flaxcap_model(None, shipped=shipped)

    def caption(image_path):  # what latency.py's flaxcap pipeline times, without its stage functions
      return next(iter(captioner.caption([image_path], beam_size=3, max_len=20))).text
  elif name == "infer_torch":  # torch only: neither jax nor flaxcap's model is imported here
    from bench import torch_reference  # pylint: disable=g-import-not-at-top
    common.configure_torch()
    after_imports = common.peak_rss_bytes()
    path = str(common.default_image())
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, 2600)]
    caption = torch_reference.CaptionPipeline(
        torch_reference.efficientnet_lite("efficientnet_lite0", pretrained=True),
        torch_reference.SoftAttentionDecoder(len(words), 1280, dropout=0.0), words,
        beam_size=3, max_len=20)
  if name.startswith("infer_"):
    for _ in range(3):
      caption(path)
    return {"peak_rss_after_imports": after_imports, "peak_rss": common.peak_rss_bytes()}
  _, part, framework, dtype = name.split("_", 3)
  from bench import training  # pylint: disable=g-import-not-at-top
  from bench import workloads  # pylint: disable=g-import-not-at-top
  common.configure_torch()
  sizes = workloads.SIZES["tutorial" if part == "decoder" else "lite0"]
  batch = _TRAIN_BATCH.value
  if framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    device = common.torch_device()
    torch.cuda.reset_peak_memory_stats(device)
    training.time_torch_step(part, sizes, dtype, batch, 1)
    device_peak = common.torch_peak_memory_bytes(device)
  else:
    training.time_flaxcap_step(part, framework, sizes, dtype, batch, 1)
    device_peak = common.peak_device_memory_bytes()
  return {"peak_device_bytes": device_peak, "peak_rss": common.peak_rss_bytes(), "batch": batch,
          "grid": f"{sizes.grid}x{sizes.grid}x{sizes.channels}"}


# The printed table (also rendered by bench/report.py).
COLUMNS = [common.Column("measurement", "measurement"),
           common.Column("peak_rss_after_imports_mib", "RSS after imports MiB", ",.0f"),
           common.Column("peak_rss_mib", "peak RSS MiB", ",.0f"),
           common.Column("peak_device_bytes_mib", "peak device MiB", ",.0f"),
           common.Column("error", "error")]


def main(argv):
  del argv
  if _CHILD.value:
    print(_MARK + json.dumps(_child(_CHILD.value)), flush=True)
    return
  # The inference children only read their own peak RSS, which other processes do not change: they
  # start at once and run side by side (and beside this process's imports). Train rows (device
  # memory) run one at a time.
  common.default_image()
  cache_dir = tempfile.mkdtemp(prefix="flaxcap-bench-xla-cache-")  # empty: the cached row fills it
  children = list(INFERENCE_ROWS)
  started = {name: _start(name, cache_dir if name == "infer_flaxcap_cached" else None)
             for name in (_ROWS.value or children) if name.startswith("infer_")}
  gpu = common.on_gpu()
  info = common.machine()
  print(common.machine_line(info), flush=True)
  if gpu:
    children += [f"train_{part}_{framework}_{dtype}" for part in ("decoder", "full")
                 for dtype in ("float32", "bfloat16") for framework in ("flaxcap", "torch")]
  if _ROWS.value:
    children = _ROWS.value
  rows = []
  for name in children:
    if name not in started:
      print(f"{name} ...", flush=True)
      started[name] = _start(name)
    done = started[name]
    stdout, stderr = done.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode or not lines:
      print(stderr[-3000:], file=sys.stderr)
      rows.append({"measurement": name, "error": f"exit code {done.returncode}"})
      continue
    result = json.loads(lines[-1][len(_MARK):])
    rows.append({"measurement": name, **result,
                 **{f"{key}_mib": value / 2**20 for key, value in result.items()
                    if isinstance(value, int) and key.startswith("peak")}})
  shutil.rmtree(cache_dir, ignore_errors=True)
  print()
  common.print_table(rows, COLUMNS, title=(
      f"peak memory, each row a fresh process; inference: one image file -> caption, beam 3 (flaxcap: "
      f"the {_INFER_MODEL.value} model, compiling, or _cached: loading its compiled programs from "
      f"JAX's persistent cache; torch: bench/latency.py's pipeline); train rows (GPU only): "
      f"batch {_TRAIN_BATCH.value}; "
      f"{common.machine_line(info)}"))
  common.write_json(_OUTPUT.value, {"benchmark": "memory", "machine": info, "rows": rows,
                                    "infer_model": _INFER_MODEL.value,
                                    "train_batch": _TRAIN_BATCH.value})


if __name__ == "__main__":
  app.run(main)
