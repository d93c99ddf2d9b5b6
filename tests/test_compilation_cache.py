"""The command lines' persistent compilation cache (`flaxcap.compilation_cache`).

The test session sets JAX_COMPILATION_CACHE_DIR for every process it starts (conftest.py), so the
processes here run without it, as a user's would.
"""

import pathlib
import subprocess
import sys

import cli_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  """A command line's environment (`cli_env`) without this session's JAX_ settings, plus `extra`."""
  return {key: value for key, value in cli_env.cli_env(**extra).items()
          if not key.startswith("JAX_") or key in extra}


def _python(code: str, **env):
  return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(**env),
                        capture_output=True, text=True, timeout=120)


def test_enable_points_jax_at_the_folder_and_keeps_what_it_compiles(tmp_path):
  code = f"""
import jax, jax.numpy as jnp
from flaxcap import compilation_cache
folder = compilation_cache.enable({str(tmp_path / "cache")!r})
print(folder, jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
      jax.config.jax_compilation_cache_max_size)
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((3, 5))).block_until_ready()
"""
  done = _python(code, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  assert done.returncode == 0, done.stderr[-2000:]
  folder, configured, min_seconds, max_bytes = done.stdout.split()
  assert folder == configured == str(tmp_path / "cache")
  assert float(min_seconds) == 0  # JAX's own variable wins over MIN_COMPILE_S
  assert int(max_bytes) > 0  # bounded: least recently used programs go
  assert any(path.name.endswith("-cache") for path in (tmp_path / "cache").iterdir())


def test_default_folder_off_and_an_unusable_folder(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  code = f"""
import jax
from flaxcap import compilation_cache
print(compilation_cache.enable(), compilation_cache.enable("none"))
print(compilation_cache.enable({str(blocker / "cache")!r}), jax.config.jax_compilation_cache_dir)
"""
  done = _python(code, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert done.returncode == 0, done.stderr[-2000:]
  default, off, blocked, configured = done.stdout.split()
  assert default == str(tmp_path / "xdg" / "flaxcap" / "xla") and off == "None"
  assert blocked == "None" and configured == default  # the usable folder stays in use
  assert f"compilation cache off: cannot create {blocker / 'cache'}" in done.stderr
  set_outside = _python("from flaxcap import compilation_cache; print(compilation_cache.enable())",
                        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs"))
  assert set_outside.stdout.split() == [str(tmp_path / "theirs")]


def test_a_jax_without_the_cache_options_runs_without_a_cache(tmp_path):
  code = f"""
import jax
from flaxcap import compilation_cache
update = jax.config.update
def without_max_size(name, value):
  if name == "jax_compilation_cache_max_size":
    raise AttributeError(f"Unrecognized config option: {{name}}")
  update(name, value)
jax.config.update = without_max_size
print(compilation_cache.enable({str(tmp_path / "cache")!r}), jax.config.jax_compilation_cache_dir)
"""
  done = _python(code)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["None", "None"]  # no unbounded cache
  assert "compilation cache off: this JAX does not take its options" in done.stderr


def test_without_filelock_there_is_no_cache_and_one_warning(tmp_path):
  code = f"""
import sys
sys.modules["filelock"] = None  # as if it were not installed: importing it fails
import importlib.util
importlib.util.find_spec = lambda name, *a, _find=importlib.util.find_spec: (
    None if name == "filelock" else _find(name, *a))
import jax
from flaxcap import compilation_cache
print(compilation_cache.enable({str(tmp_path / "cache")!r}), jax.config.jax_compilation_cache_dir)
"""
  done = _python(code)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["None", "None"]
  assert "compilation cache off: JAX needs the filelock package" in done.stderr
  assert not (tmp_path / "cache").exists()


def test_infer_cli_compiles_once_then_loads(tiny_checkpoint, shapes_root, tmp_path):
  photo = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[0]
  cache = tmp_path / "cache"
  command = [sys.executable, str(REPO_ROOT / "infer.py"), f"--checkpoint={tiny_checkpoint}",
             f"--image={photo}", f"--xla_cache={cache}"]
  runs = [subprocess.run(command, cwd=REPO_ROOT, env=_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"),
                         capture_output=True, text=True, timeout=300) for _ in range(2)]
  assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
  assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith(str(photo))
  programs = {path.name for path in cache.iterdir() if path.name.endswith("-cache")}
  assert any(name.startswith("jit_caption_batch") for name in programs)
  off = subprocess.run(command[:-1] + ["--xla_cache=none"], cwd=REPO_ROOT,
                       env=_env(XDG_CACHE_HOME=str(tmp_path / "xdg")), capture_output=True,
                       text=True, timeout=300)
  assert off.returncode == 0 and off.stdout == runs[0].stdout
  assert not (tmp_path / "xdg").exists()  # off means nothing written
