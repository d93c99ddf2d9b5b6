"""Exporting jitted functions for a "cuda" target on a machine without a GPU (lowering tests).

Pallas' Triton lowering runs at export time; since jax 0.11 it asks for the GPU it lowers for, which
a machine without one names as an abstract device (`jax.sharding.AbstractDevice`): here an H100, the
card issue 8's targets name. The Triton custom call is allowed through export's safety check.
"""

import jax
import pytest

H100 = "NVIDIA H100 80GB HBM3"


def export_for_cuda(function, *args) -> str:
  """The MLIR text of `function` (jitted) exported for "cuda" with `args` (arrays or shape structs)."""
  export = pytest.importorskip("jax.export")
  device = jax.sharding.AbstractDevice(device_kind=H100, num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  exporter = export.export(
      function, platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  with jax.sharding.use_abstract_mesh(mesh):
    return exporter(*args).mlir_module()


def assert_one_triton_kernel(module: str, grid: str, approx_tanh: bool | None = None):
  """`module` (export_for_cuda's text) holds one Triton call, its grid as `grid` says ("grid_x = 4 :
  i32, grid_y = 256 : i32"), and `tanh.approx.f32` exactly when `approx_tanh` (None: not checked)."""
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
  assert grid in module
  if approx_tanh is not None:
    assert ("tanh.approx.f32" in module) == approx_tanh


def compile_for_h100(function, *args) -> str:
  """The compiled HLO text of `function` (jitted) for an H100, by XLA's GPU compiler without a GPU
  (bench/gpu_aot.py's deviceless compilation); skips the test where jax's CUDA plugin, a dev-only
  install, is missing."""
  from bench import gpu_aot  # pylint: disable=g-import-not-at-top
  try:
    target = gpu_aot.Target()
  except SystemExit as e:
    pytest.skip(f"no XLA GPU compiler here: {e}")
  return target.compile(function, *args).as_text()
