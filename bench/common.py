"""Plumbing shared by the bench scripts: timing, devices, the machine's description, tables, JSON.

Every script in bench/ starts with

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench import common

and then uses, rather than its own copies:
  * `time_calls(fn, repeats=..., warmup=...)`: wall-clock seconds of calls to a function that waits for
    its own results (`jax.block_until_ready`, `torch_sync`), first call and median of the rest;
  * `on_gpu()`, `jax_device()`, `torch_device()`, `torch_sync(device)`: which accelerator each framework
    runs on (a GPU when there is one, else the CPU) and how to wait for it;
  * `peak_device_memory_bytes()` / `torch_peak_memory_bytes()`: peak device memory (GPU only; None on
    the CPU), and `peak_rss_bytes()` for the process's peak resident set;
  * `machine()`: device, CPU count, load average and library versions, stored in every JSON file;
  * `print_table(rows, columns)` and `write_json(path, payload)` (default folder bench/results/,
    which git ignores);
  * the `--torch_threads` flag (absl) and `configure_torch()`, which applies it.

torch threads: on the CPU torch's OpenMP threads spin at every barrier. On this shared 2-core machine
(load average 3-5 from other jobs) the torch decoder's train step took 12.3 s with 2 threads and 1.2 s
with 1, so the CPU default is 1 thread: the baseline at its best, not at its worst. jax's CPU thread pool
does not behave this way; it keeps its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# -- timing --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  """Seconds per call: the first (compilation, warm-up) and the timed ones after `warmup` calls."""
  first_s: float
  times_s: list[float]
  result: Any = dataclasses.field(default=None, repr=False)  # what the last call returned

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  def as_dict(self) -> dict[str, Any]:
    return {"first_s": self.first_s, "median_s": self.median_s, "min_s": self.min_s,
            "times_s": self.times_s}


# Untimed seconds of calls before a GPU timing (`time_calls(warmup_s=)`).
GPU_WARMUP_S = 0.5


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
               warmup_s: float = 0.0) -> Timing:
  """Times `fn()` (which must wait for its own results): `warmup` untimed calls, then `repeats`.

  The first warm-up call's time is kept as `first_s` (for jitted code: compile + one run; NaN without
  warm-up); `result` holds what the last timed call returned. `warmup_s`: after the first warm-up
  call, more untimed calls until that many seconds have passed (a GPU idle while a program compiled
  runs its first milliseconds of work at low clocks: a 3 ms search timed right after compiling ran
  up to 20% slower than the same search timed later).
  """
  first_s = float("nan")
  for i in range(warmup):
    start = time.perf_counter()
    fn()
    if i == 0:
      first_s = time.perf_counter() - start
      warm_until = time.perf_counter() + warmup_s
  if warmup and warmup_s > 0:
    while time.perf_counter() < warm_until:
      fn()
  times, result = [], None
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return Timing(first_s=first_s, times_s=times, result=result)


# -- devices -------------------------------------------------------------------------------------------


def on_gpu() -> bool:
  """Whether jax's default backend is a GPU."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() == "gpu"


def jax_device():
  """The device jax computes on (the first GPU when there is one, else the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0]


def torch_device():
  """The torch device of the reference: "cuda" when torch sees a GPU, else "cpu"."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device) -> None:
  """Waits for the torch work queued on `device` (a no-op on the CPU, where torch is synchronous)."""
  import torch  # pylint: disable=g-import-not-at-top
  if torch.device(device).type == "cuda":
    torch.cuda.synchronize(device)


TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", None,
    "torch CPU threads (default: 1 on the CPU, see bench/common.py); ignored on a GPU.")


def configure_torch() -> None:
  """Applies --torch_threads (default 1 on the CPU) before any torch work."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = TORCH_THREADS.value if flags.FLAGS.is_parsed() else None
  if torch_device().type == "cpu":
    torch.set_num_threads(threads or 1)
  else:  # XLA runs float32 matmuls as TF32 on the GPU (jax's default precision): the same for torch
    torch.backends.cuda.matmul.allow_tf32 = True


def peak_device_memory_bytes() -> int | None:
  """jax's peak bytes in use on its device since the process started; None where not reported (CPU).

  The peak never resets: measure one workload per process (bench/memory.py runs each in its own).
  """
  stats = jax_device().memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def torch_peak_memory_bytes(device) -> int | None:
  """torch's peak allocated bytes on a CUDA device since the last reset; None on the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  if torch.device(device).type != "cuda":
    return None
  return int(torch.cuda.max_memory_allocated(device))


def peak_rss_bytes() -> int:
  """Peak resident set size of this process: VmHWM from /proc/self/status where there is one.

  Not `ru_maxrss`: Linux keeps it across fork + exec, so a child started by a big parent (memory.py's
  rows) would report the parent's peak.
  """
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


# -- inputs --------------------------------------------------------------------------------------------


FLICKR8K_IMAGES = REPO_ROOT.parent / "shared" / "data" / "flickr8k" / "Flicker8k_Dataset"


def default_image() -> pathlib.Path:
  """A 500x375 JPEG made from the first Flickr8k photo (or noise), written once under bench/results/
  (bench/latency.py's and bench/memory.py's image; numpy and Pillow only, no jax or torch)."""
  path = RESULTS_DIR / "latency_image.jpg"
  if not path.exists():
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    photos = sorted(FLICKR8K_IMAGES.glob("*.jpg")) if FLICKR8K_IMAGES.is_dir() else []
    if photos:
      image = Image.open(photos[0]).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
    else:  # the noise of workloads.random_images(1, 500), cropped
      noise = np.random.default_rng(2).integers(0, 256, (1, 500, 500, 3), dtype=np.uint8)
      image = Image.fromarray(noise[0, :375])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
  return path


# -- the record of where a number came from ------------------------------------------------------------


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine(*, torch_too: bool = True) -> dict[str, Any]:
  """The device, the CPU and its load, the command line and the versions, for the JSON files."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  device = jax_device()
  info = {
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
      "jax_backend": jax.default_backend(),
      "device": device.device_kind,
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_average_1_5_15": os.getloadavg(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
  }
  if torch_too:
    import torch  # pylint: disable=g-import-not-at-top
    info.update(torch=torch.__version__, torch_device=str(torch_device()),
                torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
      info["torch_cuda_device"] = torch.cuda.get_device_name(0)
  return info


def machine_line(info: dict[str, Any]) -> str:
  """One line for the top of a printed table."""
  load = info["load_average_1_5_15"][0]
  line = (f"{info['device']} ({info['jax_backend']}), {info['cpu_count']} CPUs ({info['cpu']}), "
          f"load average {load:.1f}; jax {info['jax']}, flax {info['flax']}")
  if "torch" in info:
    line += f", torch {info['torch']} on {info['torch_device']}"
    if info["torch_device"] == "cpu":
      line += f" ({info['torch_threads']} threads)"
  return line


# -- output --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: `row[key]` printed with `fmt` (a format spec) under `header`."""
  key: str
  header: str
  fmt: str = ""


def format_cell(value: Any, fmt: str) -> str:
  if value is None or (isinstance(value, float) and value != value):  # None or NaN
    return "-"
  try:
    return format(value, fmt)
  except (TypeError, ValueError):
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, title: str = "") -> str:
  """Prints rows as an aligned table (also returned as text); missing or None cells print as "-"."""
  cells = [[column.header for column in columns]]
  cells += [[format_cell(row.get(column.key), column.fmt) for column in columns] for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  lines = [title] if title else []
  for n, line in enumerate(cells):
    lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
  """The same table as `print_table`, as GitHub markdown (for BENCHMARKS.md, via bench/report.py)."""
  lines = ["| " + " | ".join(column.header for column in columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(format_cell(row.get(column.key), column.fmt).strip()
                                   for column in columns) + " |")
  return "\n".join(lines)


def output_path(path_or_name: str | os.PathLike) -> pathlib.Path:
  """A bare name ("beam_search") means bench/results/<name>.json; anything else is a path."""
  path = pathlib.Path(path_or_name)
  if path.parent == pathlib.Path(".") and not path.suffix:
    path = RESULTS_DIR / f"{path}.json"
  return path


def write_json(path_or_name: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
  """Writes `payload` as indented JSON (creating folders) and says where."""
  path = output_path(path_or_name)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  print(f"wrote {path}", flush=True)
  return path


def _json_default(value):
  if hasattr(value, "item"):  # numpy / jax scalars
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def int_list(text: str) -> list[int]:
  """"1,32,256" -> [1, 32, 256]."""
  return [int(part) for part in str(text).split(",") if part.strip()]
