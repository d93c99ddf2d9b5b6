"""The environment the tests start the command lines in (train.py, infer.py, export.py)."""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cli_env(**extra: str) -> dict[str, str]:
  """This process's environment for a command line: TF quiet, one host CPU device (the tests' four
  are for pmap inside pytest), and the rest of XLA_FLAGS, conftest's fast compilation included."""
  xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
               if not flag.startswith(_DEVICE_COUNT_FLAG)]
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=" ".join(xla_flags), **extra)
