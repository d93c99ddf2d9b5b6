"""A stand-in for train_lib's TensorBoard writer that keeps every scalar, for the training tests."""


class RecordingWriter:
  """`log[name][step] = value` for every scalar written."""

  def __init__(self, log: dict):
    self.log = log
    self.closed = False

  def add_scalar(self, name, value, step):
    self.log.setdefault(name, {})[step] = value

  def flush(self):
    pass

  def close(self):
    self.closed = True
