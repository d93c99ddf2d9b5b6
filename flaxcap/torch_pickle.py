"""Reads PyTorch state-dict files with `pickle` and numpy only: no torch, and no code execution.

`torch.save` writes one of two formats and both are read here:

* the legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row,
  a magic number, the protocol version, system info, the object itself, then the list of storage keys,
  followed by each storage's raw bytes (an int64 element count, then the data);
* the zip format (torch.save's default): `<archive>/data.pkl` plus one `<archive>/data/<key>` entry of
  raw bytes per storage.

Every pickle is loaded through `_RestrictedUnpickler`, which, like torch's `weights_only=True`,
resolves only the few globals a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and friends, `torch.<Type>Storage`) to harmless stand-ins defined
here. Any other global (`os.system`, `builtins.eval`, ...) raises `WeightsError` before anything is
called, so a crafted `.pth` cannot run code.
"""

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxcap import errors

_LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(jnp.bfloat16),  # ml_dtypes' bfloat16, which numpy lacks.
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a `torch.<Type>Storage` class: only carries the element dtype."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named by a persistent id; its bytes are read after unpickling."""
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor awaiting its storage: `storage[offset:]` viewed with `shape` and `stride` (elements)."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args, **unused_kwargs):
  """Stand-in for `torch._utils._rebuild_tensor{,_v2}`: records where the tensor's data lives."""
  if not isinstance(storage, _StorageRef):
    raise errors.WeightsError(f"tensor built from {type(storage).__name__}, not from a storage")
  shape, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(shape) != len(stride) or int(storage_offset) < 0 or any(s < 0 for s in shape + stride):
    raise errors.WeightsError(f"tensor with bad size {shape} / stride {stride}")
  if shape and min(shape) > 0:
    last = int(storage_offset) + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= storage.numel:
      raise errors.WeightsError(f"tensor of size {shape} runs past its storage of {storage.numel}")
  return _TensorRef(storage, int(storage_offset), shape, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused_args):
  """Stand-in for `torch._utils._rebuild_parameter`: a parameter is its data."""
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals a state dict needs, to the stand-ins above."""

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise errors.WeightsError(
        f"refusing to load global '{module}.{name}': a weights file may only hold tensors and "
        "(ordered) dicts of them")

  def persistent_load(self, pid):
    # Legacy: ('storage', type, key, location, numel, view_metadata); zip: the first five.
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int)):
      raise errors.WeightsError(f"unsupported persistent id {pid!r:.80}")
    if len(pid) == 6 and pid[5] is not None:
      raise errors.WeightsError("storage views (torch < 0.4 files) are not supported")
    return _StorageRef(key=str(pid[2]), dtype=pid[1].dtype, numel=pid[4])


def _load_pickle(file_obj) -> Any:
  try:
    return _RestrictedUnpickler(file_obj).load()
  except errors.WeightsError:
    raise
  except Exception as e:  # pickle raises many types on malformed input.
    raise errors.WeightsError(f"malformed pickle: {type(e).__name__}: {e}") from e


def _read_legacy(file_obj) -> tuple[Any, dict[str, np.ndarray]]:
  """Reads the legacy (non-zip) format; returns the unpickled object and the storages by key."""
  if _load_pickle(file_obj) != _LEGACY_MAGIC_NUMBER:
    raise errors.WeightsError("not a torch file (bad magic number)")
  if _load_pickle(file_obj) != _LEGACY_PROTOCOL_VERSION:
    raise errors.WeightsError("unsupported torch legacy protocol version")
  sys_info = _load_pickle(file_obj)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise errors.WeightsError("big-endian torch files are not supported")
  obj = _load_pickle(file_obj)
  storage_keys = _load_pickle(file_obj)
  if not isinstance(storage_keys, list) or not all(isinstance(k, str) for k in storage_keys):
    raise errors.WeightsError("malformed storage key list")
  wanted = {ref.key: ref for ref in _storage_refs(obj)}
  storages = {}
  for key in storage_keys:
    (numel,) = struct.unpack("<q", file_obj.read(8))
    ref = wanted.get(key)
    itemsize = ref.dtype.itemsize if ref else 0
    if ref is None or numel != ref.numel:
      raise errors.WeightsError(f"storage {key} does not match the tensors that use it")
    data = file_obj.read(numel * itemsize)
    if len(data) != numel * itemsize:
      raise errors.WeightsError(f"file ends inside storage {key}")
    storages[key] = np.frombuffer(data, dtype=ref.dtype)
  return obj, storages


def _read_zip(path: str) -> tuple[Any, dict[str, np.ndarray]]:
  """Reads the zip format written by torch.save since torch 1.6."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickle_names = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickle_names) != 1:
      raise errors.WeightsError("zip file without exactly one <archive>/data.pkl: not a torch file")
    prefix = pickle_names[0][:-len("data.pkl")]
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
      raise errors.WeightsError("big-endian torch files are not supported")
    obj = _load_pickle(io.BytesIO(archive.read(pickle_names[0])))
    storages = {}
    for ref in _storage_refs(obj):
      entry = f"{prefix}data/{ref.key}"
      if entry not in names:
        raise errors.WeightsError(f"storage {entry} is missing")
      data = archive.read(entry)
      if len(data) < ref.numel * ref.dtype.itemsize:
        raise errors.WeightsError(f"storage {entry} is shorter than its {ref.numel} elements")
      storages[ref.key] = np.frombuffer(data[:ref.numel * ref.dtype.itemsize], dtype=ref.dtype)
  return obj, storages


def _storage_refs(obj) -> list[_StorageRef]:
  refs = []
  def visit(value):
    if isinstance(value, _TensorRef):
      refs.append(value.storage)
    elif isinstance(value, dict):
      for item in value.values():
        visit(item)
    elif isinstance(value, (list, tuple)):
      for item in value:
        visit(item)
  visit(obj)
  return refs


def _materialize(value, storages):
  """Replaces every `_TensorRef` in a nest of dicts/lists by its numpy array (a copy)."""
  if isinstance(value, _TensorRef):
    base = storages[value.storage.key]
    itemsize = base.dtype.itemsize
    if not value.shape or min(value.shape) > 0:
      view = np.lib.stride_tricks.as_strided(
          base[value.offset:], shape=value.shape,
          strides=tuple(s * itemsize for s in value.stride), writeable=False)
    else:
      view = np.zeros(value.shape, base.dtype)
    return np.array(view)
  if isinstance(value, dict):
    return collections.OrderedDict((k, _materialize(v, storages)) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return type(value)(_materialize(v, storages) for v in value)
  return value


def read_torch_file(path: str | os.PathLike) -> Any:
  """Loads a file written by `torch.save`, with tensors as numpy arrays; runs no code from it.

  Args:
    path: a `.pth`/`.pt` file in torch's zip or legacy format.

  Returns:
    The saved object with every tensor replaced by a numpy array (bfloat16 as `jnp.bfloat16`);
    typically an `OrderedDict[str, np.ndarray]` state dict.

  Raises:
    WeightsError: the file is missing, is not a torch file, or holds anything but tensors, storages,
      (ordered) dicts, lists, tuples, strings and numbers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.WeightsError(f"{path}: weights file not found")
  try:
    if zipfile.is_zipfile(path):
      obj, storages = _read_zip(path)
    else:
      with open(path, "rb") as file_obj:
        obj, storages = _read_legacy(file_obj)
  except errors.WeightsError as e:
    raise errors.WeightsError(f"{path}: {e}") from None
  except (OSError, zipfile.BadZipFile, struct.error) as e:
    raise errors.WeightsError(f"{path}: cannot read torch file: {e}") from e
  return _materialize(obj, storages)
