"""JAX's persistent compilation cache for the command lines: compile a program once per machine.

`python infer.py --image PHOTO.jpg` spends most of its first caption compiling the encoder and the
search (about 6 of 12 s on the 2-core CPU). With the cache, the next run of the same model loads the
compiled programs from disk instead. `enable()` turns it on for this process:

* the folder is `cache_dir`, else `$JAX_COMPILATION_CACHE_DIR` where set (then JAX's own settings are
  left alone: the tests use this), else `$XDG_CACHE_HOME/flaxcap/xla` (`~/.cache/flaxcap/xla`);
* programs that took `MIN_COMPILE_S` or more to compile are kept (or as
  `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says), up to `MAX_BYTES` in all (JAX drops the least
  recently used beyond that);
* a folder that cannot be created, a JAX without these options, or no `filelock` package (JAX needs it
  to bound the cache; `requirements.txt` has it) cost a warning and no cache, not the run.

Compiled programs are keyed by the program, the jaxlib version and the device, so a cache is never
used for anything but the program it was made for.
"""

import importlib.util
import os
import pathlib

from absl import logging
import jax

MIN_COMPILE_S = 0
MAX_BYTES = 2 << 30  # 2 GiB
OFF = "none"  # cache_dir value that turns the cache off


def default_dir() -> pathlib.Path:
  """$XDG_CACHE_HOME/flaxcap/xla, or ~/.cache/flaxcap/xla."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache_home) / "flaxcap" / "xla"


def enable(cache_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on (see the module docstring); returns its folder.

  None when `cache_dir` is `OFF` or the folder cannot be created. Call before the first compilation.
  """
  if cache_dir is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  if str(cache_dir) == OFF:
    return None
  folder = pathlib.Path(cache_dir) if cache_dir else default_dir()
  if importlib.util.find_spec("filelock") is None:  # without it JAX reads and writes no entry
    logging.warning("compilation cache off: JAX needs the filelock package to bound its size "
                    "(pip install -r requirements.txt)")
    return None
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache off: cannot create %s (%s)", folder, e.strerror or e)
    return None
  try:  # the limits first: a JAX without one of these options gets no cache, not an unbounded one
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  except (AttributeError, ValueError) as e:
    logging.warning("compilation cache off: this JAX does not take its options (%s)", e)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  return folder
