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
