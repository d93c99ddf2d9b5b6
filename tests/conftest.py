"""Shared test set-up: quiet TF, four host CPU devices for pmap tests, XLA compiling fast and one
compilation cache for the session, and the shared data and checkpoint fixtures."""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import filelock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# Most of the suite's time is XLA compiling many small programs. The tests compile with LLVM's
# optimizations off and with XLA:CPU's older elemental emitters instead of its MLIR fusion emitters:
# code that runs slower but compiles in about half the time, the same computations (XLA's HLO passes
# run as before; the fusions differ a little between the two emitters), results that differ from the
# default build's at round-off only (checked: the suite passes either way). On a 2-core machine:
# 291-345 s, against 483-547 s without the emitter flag and 531 s with none of the three. A flag
# already in XLA_FLAGS is kept, so
#   XLA_FLAGS="--xla_backend_optimization_level=3 --xla_llvm_disable_expensive_passes=false
#              --xla_cpu_use_fusion_emitters=true"
# runs the suite on the code users run. XLA aborts the process on a flag it does not know (jax 0.11,
# on Python 3.12, no longer has the emitter flag), so the flags are tried once, in a child process,
# and the ones this jaxlib rejects are left out; pytest-xdist's workers inherit the result.
_TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "4",
                   "--xla_backend_optimization_level": "0",
                   "--xla_llvm_disable_expensive_passes": "true",
                   "--xla_cpu_use_fusion_emitters": "false"}
_UNKNOWN_FLAGS_VARIABLE = "FLAXCAP_TESTS_UNKNOWN_XLA_FLAGS"  # set by the first process that tried


def _xla_accepts(flags: list[str]) -> bool:
  """Whether this jaxlib starts its CPU backend with XLA_FLAGS = `flags`."""
  code = "import jax; jax.numpy.zeros(1).block_until_ready()"
  environment = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                        timeout=300, check=False).returncode == 0


def _add_test_xla_flags() -> None:
  """Adds `_TEST_XLA_FLAGS` not already set, and known to this XLA, to XLA_FLAGS."""
  wanted = [f"{flag}={value}" for flag, value in _TEST_XLA_FLAGS.items()
            if flag not in os.environ.get("XLA_FLAGS", "")
            and flag not in os.environ.get(_UNKNOWN_FLAGS_VARIABLE, "").split()]
  if not wanted:
    return
  if _UNKNOWN_FLAGS_VARIABLE not in os.environ and not _xla_accepts(wanted):
    rejected = [flag for flag in wanted if not _xla_accepts([flag])]
    wanted = [flag for flag in wanted if flag not in rejected]
    os.environ[_UNKNOWN_FLAGS_VARIABLE] = " ".join(flag.split("=")[0] for flag in rejected)
  os.environ.setdefault(_UNKNOWN_FLAGS_VARIABLE, "")
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *wanted]).strip()


_add_test_xla_flags()
# Every training run builds a new optimizer, so its pmapped step is traced and compiled anew, though
# the program is the same (as are the encoder and search that Captioner.load, infer.py and app.py
# compile). JAX's persistent cache, keyed by the compiled program, lets this process and the CLIs it
# starts (they inherit the variable) compile each program once. A new empty folder per session,
# removed at exit; JAX_COMPILATION_CACHE_DIR set beforehand is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="flaxcap-tests-xla-cache-")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
# JAX caches only programs that took a second or more to compile; the tests' programs are small and
# many, so every one is cached (the CLIs and the second pytest-xdist worker then load, not compile).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

FLICKR8K_ROOT = pathlib.Path(
    os.environ.get("FLAXCAP_FLICKR8K", REPO_ROOT.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(scope="session")
def flickr8k_root():
  """The real Flickr8k folder; the test is skipped when it is absent."""
  if not (FLICKR8K_ROOT / "Flickr8k_text" / "Flickr8k.token.txt").exists():
    pytest.skip(f"real Flickr8k not found at {FLICKR8K_ROOT}")
  return FLICKR8K_ROOT


def _built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The folder `name` that `build(folder)` fills once per test session, shared by the pytest-xdist
  workers (one builds it, the others wait for it). Tests read it and never change it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  folder = root / name
  with filelock.FileLock(f"{folder}.lock"):
    done = root / f"{name}.done"
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
  """A tiny synthetic Flickr8k-layout dataset of coloured shapes (see tests/shapes_data.py)."""
  import shapes_data  # pylint: disable=g-import-not-at-top
  return _built_once(tmp_path_factory, "shapes", shapes_data.write_flickr8k_layout)


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_root, tmp_path_factory):
  """A training workdir of configs/tiny.py trained briefly on `shapes_root` (random encoder)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from flaxcap import train_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.root = str(shapes_root)
  config.num_epochs = 2
  return _built_once(tmp_path_factory, "tiny_run",
                     lambda workdir: train_lib.train_and_evaluate(config, str(workdir)))


@pytest.fixture
def shared_features_workdir(tiny_checkpoint, tmp_path):
  """`make(name)`: a new workdir under tmp_path whose `features/` links to the tiny run's cache.

  A run there with configs/tiny.py's encoder on `shapes_root` finds its features cached and skips
  encoding (and compiling the encoder); use it only with that encoder, image size and data.
  """
  def make(name: str = "run") -> str:
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "features").symlink_to(tiny_checkpoint / "features")
    return str(workdir)
  return make
