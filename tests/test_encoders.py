"""Tests of flaxcap.encoders: shapes, the stage table, normalization, fine-tuning, parity with torch.

Parity references: the `efficientnet-lite-pytorch` package with its packaged ImageNet weights on real
photos, and torch modules written here with torchvision's VGG16/ResNet layout and key names on random
weights (torchvision itself is not installable here).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data
from flax import linen as nn
from PIL import Image

from flaxcap import encoders
from flaxcap import errors
from flaxcap import pretrained

LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PHOTOS = ("chelsea", "coffee", "astronaut")  # Egyptian cat (285), espresso (967), a person.


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the short side to `size` (bicubic) and crops the centre: uint8 [size, size, 3]."""
  picture = Image.fromarray(image)
  scale = size / min(picture.size)
  picture = picture.resize((max(size, round(picture.width * scale)),
                            max(size, round(picture.height * scale))), Image.BICUBIC)
  left, top = (picture.width - size) // 2, (picture.height - size) // 2
  return np.asarray(picture.crop((left, top, left + size, top + size)))


@functools.lru_cache(maxsize=None)
def _photos(size: int) -> np.ndarray:
  return np.stack([_center_crop(getattr(skimage.data, name)(), size) for name in PHOTOS])


@functools.lru_cache(maxsize=None)
def _lite_outputs(name: str):
  """(images uint8 [3, s, s, 3], features, logits [3, 1000]) of the pretrained Flax encoder."""
  images = _photos(encoders.native_image_size(name))
  encoder = encoders.create_encoder(name)
  shapes = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images)
  variables = pretrained.load_pretrained(name, shapes)
  with jax.default_matmul_precision("float32"):  # No TF32 shortcuts where a GPU runs the tests.
    features, logits = jax.jit(functools.partial(encoder.apply, return_logits=True))(
        variables, images)
  return images, np.asarray(features), np.asarray(logits)


def _random_variables(encoder, images, **init_kwargs):
  """Variables shaped by `encoder.init`, drawn with numpy (init itself is slow op by op on CPU)."""
  shapes = jax.eval_shape(functools.partial(encoder.init, **init_kwargs), jax.random.key(0), images)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
                      if leaf.ndim == 1 else jnp.asarray(
                          rng.normal(0.0, (2.0 / np.prod(leaf.shape[:-1]))**0.5, leaf.shape),
                          leaf.dtype), shapes)


def _torch_input(images: np.ndarray):
  """The reference's preprocessing: ToTensor (/255) and Normalize(mean, std), NCHW."""
  import torch  # pylint: disable=g-import-not-at-top
  pixels = images.astype(np.float32) / 255.0
  pixels = (pixels - np.float32(encoders.IMAGENET_MEAN)) / np.float32(encoders.IMAGENET_STD)
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- shapes and the stage table


def test_docstring_table_is_current():
  table = re.search(r"\|---.*?\n(.*?)\n<!-- end stage table -->", encoders.__doc__, re.S).group(1)
  assert table == encoders.stage_table()


@pytest.mark.parametrize("name, image_size, stage, expected", [
    ("efficientnet_lite0", 224, -1, (7, 7, 1280)),
    ("efficientnet_lite0", 224, 5, (14, 14, 112)),
    ("efficientnet_lite1", 240, -1, (8, 8, 1280)),
    ("efficientnet_lite2", 260, -1, (9, 9, 1280)),
    ("efficientnet_lite2", 224, 5, (14, 14, 120)),
    ("vgg16", 224, -1, (14, 14, 512)),
    ("resnet50", 224, -1, (7, 7, 2048)),
    ("resnet101", 224, 3, (14, 14, 1024)),
    ("resnet101", (300, 200), -2, (19, 13, 1024)),
])
def test_feature_shape_known_values(name, image_size, stage, expected):
  assert encoders.feature_shape(name, image_size, stage) == expected


@pytest.mark.parametrize("name", encoders.ENCODER_NAMES)
def test_module_output_matches_feature_shape(name):
  for image_size, stage in ((224, -1), (97, 0), (61, encoders.num_stages(name) - 2)):
    encoder = encoders.create_encoder(name, feature_stage=stage)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.uint8)
    features, _ = jax.eval_shape(encoder.init_with_output, jax.random.key(0), images)
    assert features.shape == (2,) + encoders.feature_shape(name, image_size, stage)


def test_early_feature_stage_builds_only_the_stages_it_needs():
  encoder = encoders.create_encoder("efficientnet_lite0", feature_stage=2)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
  params = jax.eval_shape(encoder.init, jax.random.key(0), images)["params"]
  assert sorted({key.split("_")[0] for key in params}) == ["stage0", "stage1", "stage2"]
  with_logits = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                               jax.random.key(0), images)["params"]
  assert "classifier" in with_logits and "stage8_conv" in with_logits


def test_bad_names_and_stages_raise_config_errors():
  with pytest.raises(errors.ConfigError, match="efficientnet_lite0"):
    encoders.create_encoder("efficientnet_b0")
  with pytest.raises(errors.ConfigError, match="feature_stage"):
    encoders.create_encoder("resnet50", feature_stage=5)
  with pytest.raises(errors.ConfigError, match="trainable_stages"):
    encoders.trainable_param_labels("vgg16", {}, (7,))


def test_uint8_and_unit_float_images_normalize_alike():
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  from_uint8 = encoders.normalize_images(jnp.asarray(images))
  from_float = encoders.normalize_images(jnp.asarray(images, jnp.float32) / 255.0)
  np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
  expected = (images / 255.0 - np.array(encoders.IMAGENET_MEAN)) / np.array(encoders.IMAGENET_STD)
  np.testing.assert_allclose(from_uint8, expected, atol=1e-5)


# ---------------------------------------------------------------- fine-tuning and bfloat16


def test_trainable_param_labels_drive_multi_transform():
  encoder = encoders.create_encoder("efficientnet_lite0")
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images)["params"]
  frozen = encoders.trainable_param_labels("efficientnet_lite0", shapes, ())
  assert set(jax.tree.leaves(frozen)) == {encoders.FROZEN_LABEL}
  labels = encoders.trainable_param_labels("efficientnet_lite0", shapes, (5, -1))
  assert jax.tree.structure(labels) == jax.tree.structure(shapes)
  trainable_tops = {top for top, sub in labels.items()
                    if encoders.TRAINABLE_LABEL in jax.tree.leaves(sub)}
  assert trainable_tops == {"stage5_block0", "stage5_block1", "stage5_block2", "stage8_conv",
                            "stage8_bn"}
  # optax on a few subtrees (the whole tree works alike, just compiles longer).
  tops = ("stage4_block0", "stage5_block1", "stage8_bn", "classifier")
  params = {top: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[top]) for top in tops}
  optimizer = optax.multi_transform({encoders.TRAINABLE_LABEL: optax.sgd(1.0),
                                     encoders.FROZEN_LABEL: optax.set_to_zero()},
                                    {top: labels[top] for top in tops})
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  assert float(jnp.abs(updates["stage5_block1"]["project_conv"]["kernel"]).min()) == 1.0
  assert float(jnp.abs(updates["stage8_bn"]["scale"]).min()) == 1.0
  assert float(jnp.abs(updates["stage4_block0"]["project_conv"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["classifier"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("name, split_stage, feature_stage", [
    ("efficientnet_lite0", 7, -1), ("efficientnet_lite0", 3, 5), ("vgg16", 3, -1),
    ("resnet50", 4, -1)])
def test_tail_from_a_stage_output_equals_the_whole_encoder(name, split_stage, feature_stage):
  """Head (feature_stage = s - 1) then tail (start_stage = s), one set of variables: the whole encoder,
  in inference and in training mode (batch statistics of the tail's stages only)."""
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8))
  whole = encoders.create_encoder(name, feature_stage=feature_stage, trainable_stages=(split_stage,))
  variables = _random_variables(whole, images)
  head = encoders.create_encoder(name, feature_stage=split_stage - 1)
  tail = encoders.create_encoder(name, feature_stage=feature_stage, start_stage=split_stage,
                                 trainable_stages=(split_stage,))
  head_output = jax.jit(head.apply)(variables, images)
  assert head_output.shape[1:] == encoders.feature_shape(name, 40, split_stage - 1)

  def assert_close(got, want):  # float32 rounding of two programs, at the scale of the output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

  assert_close(jax.jit(tail.apply)(variables, head_output), jax.jit(whole.apply)(variables, images))
  train = functools.partial(nn.Module.apply, train=True, mutable=["batch_stats"])
  tail_output, tail_stats = jax.jit(functools.partial(train, tail))(variables, head_output)
  whole_output, whole_stats = jax.jit(functools.partial(train, whole))(variables, images)
  assert_close(tail_output, whole_output)
  for got, want in zip(jax.tree.leaves(tail_stats), jax.tree.leaves(whole_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tail_checks_its_start_stage_and_input():
  with pytest.raises(errors.ConfigError, match="start_stage"):
    encoders.create_encoder("efficientnet_lite0", feature_stage=4, start_stage=5)
  tail = encoders.create_encoder("efficientnet_lite0", start_stage=8)
  with pytest.raises(ValueError, match="stage 7's output"):
    tail.init(jax.random.key(0), jnp.zeros((2, 49, 320)))


def test_batch_stats_update_only_in_trainable_stages_when_training():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
  encoder = encoders.create_encoder("efficientnet_lite0", feature_stage=3, trainable_stages=(2,))
  variables = _random_variables(encoder, images)
  inference = jax.jit(encoder.apply)(variables, images)
  training, updates = jax.jit(functools.partial(encoder.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  changed = {top for top in variables["batch_stats"] if not all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["batch_stats"][top]),
                                           jax.tree.leaves(updates["batch_stats"][top])))}
  assert changed == {"stage2_block0", "stage2_block1"}
  assert not np.allclose(inference, training)
  all_trainable = encoders.create_encoder("efficientnet_lite0", feature_stage=3)
  _, updates = jax.jit(functools.partial(all_trainable.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  assert not np.allclose(updates["batch_stats"]["stage0_bn"]["mean"],
                         variables["batch_stats"]["stage0_bn"]["mean"])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_synchronized_batch_norm_on_four_devices_equals_one_device_on_the_whole_batch(name):
  """`batch_norm_axis` (what `train_lib.training_model` sets): features and new running statistics
  of 4 devices x 2 images are those of 1 device x 8; without it each device normalizes by its own."""
  assert jax.local_device_count() >= 4, "conftest forces 4 host devices"
  images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  encoder = encoders.create_encoder(name, feature_stage=1)  # every stage follows the batch
  variables = _random_variables(encoder, images)
  train = lambda module: functools.partial(module.apply, variables, train=True,
                                           mutable=["batch_stats"])
  features, updates = jax.jit(train(encoder))(images)
  for axis in ("devices", None):
    sharded = jax.pmap(train(encoder.clone(batch_norm_axis=axis)), axis_name="devices",
                       devices=jax.local_devices()[:4])
    device_features, device_updates = sharded(images.reshape(4, 2, 16, 16, 3))
    device_features = np.asarray(device_features).reshape(features.shape)
    if axis:
      np.testing.assert_allclose(device_features, features, rtol=1e-4, atol=1e-4)
      for whole, per_device in zip(jax.tree.leaves(updates), jax.tree.leaves(device_updates)):
        for device in range(4):  # the same statistics on every device
          np.testing.assert_allclose(per_device[device], whole, rtol=1e-4, atol=1e-5)
    else:
      assert np.abs(device_features - np.asarray(features)).max() > 1e-2


def test_bfloat16_keeps_float32_params_and_top1():
  name = "efficientnet_lite0"
  images, features32, logits32 = _lite_outputs(name)
  encoder = encoders.create_encoder(name, dtype="bfloat16")
  shapes = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images[:2])
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = pretrained.load_pretrained(name, shapes)
  features, logits = jax.jit(functools.partial(encoder.apply, return_logits=True))(
      variables, images[:2])
  assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.argmax(logits, -1), [285, 967])
  assert np.abs(np.asarray(logits) - logits32[:2]).max() < 0.1 * np.abs(logits32[:2]).max()


# ---------------------------------------------------------------- EfficientNet-Lite, real weights


@pytest.mark.parametrize("name", LITE_NAMES)
def test_lite_top1_on_real_photos(name):
  _, _, logits = _lite_outputs(name)
  np.testing.assert_array_equal(np.argmax(logits[:2], -1), [285, 967])  # Egyptian cat, espresso.


@pytest.mark.torch
@pytest.mark.parametrize("name", LITE_NAMES)
def test_lite_matches_torch_reference_on_real_photos(name):
  torch = pytest.importorskip("torch")
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  images, features, logits = _lite_outputs(name)
  reference = lite.EfficientNet.from_pretrained(
      name.replace("_", "-"), weights_path=pretrained.packaged_weights_path(name)).eval()
  assert reference.input_image_size == images.shape[1]
  pooled_inputs = []  # The head's output, which the reference average-pools into the classifier.
  reference._avg_pooling.register_forward_hook(lambda _, inputs, __: pooled_inputs.append(inputs[0]))
  with torch.no_grad():
    reference_logits = reference(_torch_input(images)).numpy()
  reference_features = pooled_inputs[0].numpy().transpose(0, 2, 3, 1)
  assert np.abs(logits - reference_logits).max() <= 1e-4
  assert np.abs(features - reference_features).max() <= 1e-4


# ---------------------------------------------------------------- VGG16 / ResNet, random weights


def _torchvision_layout(torch, name: str, hidden_dim: int = 4096):
  """A torch module with torchvision's layout and state-dict keys for `name`, random weights.

  Weights are scaled (He init, non-trivial BatchNorm statistics, damped residual branches) so that
  activations keep unit scale through the depth and the logits are O(1..10), not vanishing.
  """
  nn = torch.nn

  class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = None
      if stride != 1 or inplanes != planes * 4:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes * 4))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return self.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self, layers):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = 64
      for index, blocks in enumerate(layers):
        planes, stride = 64 * 2**index, 1 if index == 0 else 2
        stage = []
        for block in range(blocks):
          stage.append(Bottleneck(inplanes, planes, stride if block == 0 else 1))
          inplanes = planes * 4
        setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return x, self.fc(torch.flatten(self.avgpool(x), 1))

  class VGG(nn.Module):
    def __init__(self):
      super().__init__()
      layers, channels = [], 3
      for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                    512, 512, 512, "M"):
        if width == "M":
          layers.append(nn.MaxPool2d(2, 2))
        else:
          layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
          channels = width
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 7 * 7, hidden_dim), nn.ReLU(True), nn.Dropout(),
          nn.Linear(hidden_dim, hidden_dim), nn.ReLU(True), nn.Dropout(),
          nn.Linear(hidden_dim, 1000))

    def forward(self, x):
      conv5_3 = self.features[:-1](x)
      pooled = self.avgpool(self.features[-1](conv5_3))
      return conv5_3, self.classifier(torch.flatten(pooled, 1))

  torch.manual_seed(0)
  model = VGG() if name == "vgg16" else ResNet({"resnet50": (3, 4, 6, 3),
                                                "resnet101": (3, 4, 23, 3)}[name])
  with torch.no_grad():
    for module_name, module in model.named_modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        gain = 1.0 if module_name in ("fc", "classifier.6") else 2.0
        module.weight.normal_(0.0, (gain / fan_in)**0.5)
        if module.bias is not None:
          module.bias.normal_(0.0, 0.1)
      elif isinstance(module, nn.BatchNorm2d):
        low, high = (0.1, 0.2) if module_name.endswith("bn3") else (0.8, 1.2)
        module.weight.uniform_(low, high)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return model.eval()


def _random_images(size: int, count: int = 2) -> np.ndarray:
  return np.random.default_rng(size).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.torch
@pytest.mark.parametrize("name, image_size, legacy_format", [
    ("resnet50", 64, False),
    ("vgg16", 64, True),
])
def test_torchvision_layout_matches_torch_on_random_weights(tmp_path, name, image_size,
                                                            legacy_format):
  torch = pytest.importorskip("torch")
  hidden_dim = 64  # VGG16's classifier width (4096 in torchvision) kept small for speed.
  reference = _torchvision_layout(torch, name, hidden_dim)
  path = tmp_path / f"{name}.pth"
  torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=not legacy_format)
  images = _random_images(image_size)
  with torch.no_grad():
    reference_features, reference_logits = (t.numpy() for t in reference(_torch_input(images)))
  assert 1.0 < np.abs(reference_logits).max() < 100.0  # Informative, not vanishing, values.

  encoder = (encoders.VGG16(hidden_dim=hidden_dim) if name == "vgg16"
             else encoders.create_encoder(name))
  shapes = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images)
  variables = pretrained.load_pretrained(name, shapes, path)
  with jax.default_matmul_precision("float32"):
    features, logits = jax.jit(functools.partial(encoder.apply, return_logits=True))(
        variables, images)
  assert np.abs(np.asarray(logits) - reference_logits).max() <= 1e-4
  assert np.abs(np.asarray(features) - reference_features.transpose(0, 2, 3, 1)).max() <= 1e-4


@pytest.mark.torch
def test_resnet101_loads_torchvision_layout(tmp_path):
  torch = pytest.importorskip("torch")
  reference = _torchvision_layout(torch, "resnet101")
  path = tmp_path / "resnet101.pth"
  torch.save(reference.state_dict(), path)
  encoder = encoders.create_encoder("resnet101", feature_stage=3)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images)
  variables = pretrained.load_pretrained("resnet101", shapes, path)
  assert len(jax.tree.leaves(variables)) == sum(
      1 for key in reference.state_dict() if not key.endswith("num_batches_tracked"))
  np.testing.assert_array_equal(
      variables["params"]["stage3_block22"]["conv2"]["kernel"],
      reference.layer3[22].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage4_block0"]["downsample_bn"]["var"],
                                reference.layer4[0].downsample[1].running_var.numpy())
  features, logits = jax.eval_shape(functools.partial(encoder.apply, return_logits=True),
                                    variables, images)
  assert features.shape == (2, 14, 14, 1024) and logits.shape == (2, 1000)


def test_vgg16_classifier_has_torchvision_shapes():
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
  encoder = encoders.create_encoder("vgg16")
  params = jax.eval_shape(functools.partial(encoder.init, return_logits=True),
                          jax.random.key(0), images)["params"]
  assert [params[f"classifier_{i}"]["kernel"].shape for i in range(3)] == [
      (25088, 4096), (4096, 4096), (4096, 1000)]
