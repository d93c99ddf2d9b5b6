"""bench/: the pieces bench/run_all.py relies on (the scripts themselves are run by run_all, not here)."""

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_torch_reference_agrees_with_flaxcap():
  pytest.importorskip("torch")
  done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "torch_reference.py")],
                        capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "torch reference agrees with flaxcap" in done.stdout


def test_run_all_preload_starts_no_jax_backend():
  pytest.importorskip("torch")
  code = ("from bench import run_all; run_all._preload(); "
          "from jax._src import xla_bridge; assert not xla_bridge._backends; print('ok')")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                        cwd=REPO_ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")


def test_default_image_needs_neither_jax_nor_torch(tmp_path, monkeypatch):
  from bench import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(common, "FLICKR8K_IMAGES", tmp_path / "absent")
  path = common.default_image()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    assert image.size == (500, 375)
  assert common.default_image() == path  # written once
