"""Self-describing checkpoint directories (orbax).

A training workdir holds two orbax `CheckpointManager` directories and a record of evaluations:

    <workdir>/checkpoints/<step>/   the latest `keep` states, for resuming
    <workdir>/best/<step>/          the best state by the eval metric, for inference
    <workdir>/evaluations.json      each evaluation's step, epoch and metrics, for resuming after it

Each step directory holds three items: `state` (params, batch statistics, optimizer state, step, RNG),
`config` (the `ConfigDict` the run was trained with, as JSON) and `vocab` (the vocabulary's words and ending rates), so
`load_for_inference(dir)` needs nothing else. Orbax writes each step to a temporary directory and renames
it when complete, so a process killed mid-save never leaves a step that fails to load.
"""

import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Sequence

from absl import logging
from flax import serialization
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from flaxcap import datasets
from flaxcap import errors
from flaxcap import vocab as vocab_lib

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
EVALUATIONS_FILE = "evaluations.json"  # in the workdir: every evaluation's step, epoch and metrics


def _orbax():
  """orbax.checkpoint, imported when a training checkpoint is read or written: loading an exported
  model (`infer.py` with the shipped one) does not need it, and importing it takes ~0.35 s."""
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  return orbax.checkpoint


def quiet_orbax(record) -> bool:
  """A log filter (`logging.get_absl_handler().addFilter`) that drops orbax's INFO records, a dozen
  a save, and its warnings that a manager opened to read is read-only (as flaxcap opens them); keeps
  its other warnings and every other library's records."""
  if f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  if record.levelno > logging.converter.STANDARD_WARNING:
    return True
  message = record.getMessage()
  return (record.levelno > logging.converter.STANDARD_INFO
          and "read_only=True" not in message and "is read only" not in message)


def _manager(directory: pathlib.Path, *, keep: int,
             best_metric: str | None = None, read_only: bool = False) -> "ocp.CheckpointManager":
  ocp = _orbax()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
      best_mode="max",
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(directory.absolute(), options=options)


class CheckpointStore:
  """The `checkpoints/` (latest) and `best/` managers of one workdir."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int, best_metric: str):
    workdir = pathlib.Path(workdir)
    self.evaluations_path = workdir / EVALUATIONS_FILE
    self.best_metric = best_metric
    self.latest = _manager(workdir / LATEST_DIR, keep=keep)
    self.best = _manager(workdir / BEST_DIR, keep=1, best_metric=best_metric)

  def _items(self, state, config, vocab):
    ocp = _orbax()
    return ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
        vocab=ocp.args.JsonSave(vocab.to_json()),
    )

  def save_latest(self, step: int, state, config, vocab) -> None:
    """Saves `state` (unreplicated) as the newest resumable checkpoint."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=self._items(state, config, vocab), force=True)
    self.latest.wait_until_finished()

  def offer_best(self, step: int, state, config, vocab, metrics: dict[str, float]) -> bool:
    """Keeps `state` in `best/` if its `best_metric` beats the stored one; returns whether it did."""
    previous = self.best_value()
    if previous is not None and metrics[self.best_metric] <= previous:
      return False
    self.best.save(step, args=self._items(state, config, vocab), metrics=dict(metrics), force=True)
    self.best.wait_until_finished()
    return True

  def best_value(self) -> float | None:
    step = self.best.best_step()
    if step is None:
      return None
    metrics = self.best.metrics(step) if hasattr(self.best, "metrics") else None
    if metrics is None:
      return None
    return float(metrics[self.best_metric])

  def evaluations(self) -> list[dict]:
    """Every evaluation of the run so far, oldest first (`record_evaluation`'s entries)."""
    if not self.evaluations_path.exists():
      return []
    try:
      return json.loads(self.evaluations_path.read_text())
    except (OSError, ValueError) as e:
      raise errors.CheckpointError(f"{self.evaluations_path}: cannot be read ({e}); move it away to "
                                   "resume without the record of past evaluations") from None

  def record_evaluation(self, entry: dict) -> None:
    """Appends an evaluation (JSON-able: step, epoch, metrics, ...) to `EVALUATIONS_FILE`, written
    whole to a temporary file and renamed, so a kill leaves the old record or the new one."""
    entries = self.evaluations() + [entry]
    temporary = self.evaluations_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(temporary, self.evaluations_path)

  def restore_latest(self, abstract_state) -> Any | None:
    """Returns the newest complete state shaped like `abstract_state`, or None when there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    args = _orbax().args
    restored = self.latest.restore(
        step, args=args.Composite(state=args.StandardRestore(abstract_state)))
    logging.info("Resumed from %s/%d", self.latest.directory, step)
    return restored["state"]

  def check_vocab(self, vocab) -> None:
    """Raises CheckpointError when a resumed run's vocabulary differs from the checkpoint's."""
    step = self.latest.latest_step()
    if step is None:
      return
    args = _orbax().args
    saved = self.latest.restore(step, args=args.Composite(vocab=args.JsonRestore()))
    words = list(saved["vocab"]["words"])
    if words != list(vocab.words):
      how = ("the same words in another order" if sorted(words) == sorted(vocab.words) else
             f"{len(words)} words against {len(vocab)}")
      raise errors.CheckpointError(
          f"{self.latest.directory}/{step}: its vocabulary does not match the one built from the "
          f"data ({how}: the training captions changed); use a new --workdir")

  def close(self) -> None:
    self.latest.close()
    self.best.close()


# What a resumed run must share with the checkpoint it resumes: the model's shapes and inputs, and
# what fixes the batches of an epoch (so that the step count still says where the run stands).
# (Speed and regularization options, the learning rate and num_epochs may change.)
RESUME_FIELDS = ("image_size", "batch_size", "encoder.name", "encoder.weights", "encoder.feature_stage",
                 "encoder.trainable_stages", "decoder.embed_dim", "decoder.hidden_dim",
                 "decoder.attention_dim", "decoder.gate", "decoder.prev2out", "decoder.ctx2out",
                 "decoder.attention_activation", "data.max_len", "data.captions_per_epoch",
                 "vocab.min_count", "vocab.max_size", "self_critical.num_samples")


def check_resume_config(workdir: str | os.PathLike, config) -> None:
  """Raises CheckpointError naming the first of `RESUME_FIELDS` in which `config` differs from the
  config of the latest checkpoint in `workdir` (nothing to resume: no check). Read before any image
  is encoded."""
  directory = pathlib.Path(workdir) / LATEST_DIR
  if not directory.is_dir():
    return
  manager = _manager(directory, keep=1, read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      return
    args = _orbax().args
    saved = ml_collections.ConfigDict(
        manager.restore(step, args=args.Composite(config=args.JsonRestore()))["config"])
  finally:
    manager.close()
  current = ml_collections.ConfigDict(json.loads(config.to_json()))  # tuples as JSON lists too
  for field in RESUME_FIELDS:
    was, now = _field(saved, field), _field(current, field)
    if was != now:
      raise errors.CheckpointError(
          f"{directory}/{step}: this run was trained with config.{field} = {was!r}, the config now "
          f"says {now!r}; resume with the same setting or use a new --workdir")


def _field(config, dotted: str):
  for name in dotted.split("."):
    if name not in config:
      return None
    config = config[name]
  return config


def _step_dir(path: pathlib.Path) -> tuple[pathlib.Path, int]:
  """Resolves a workdir, a manager dir or a step dir to (manager dir, step)."""
  for candidate in (path / BEST_DIR, path / LATEST_DIR, path):
    if candidate.is_dir():
      manager = _manager(candidate, keep=1, read_only=True)
      step = manager.latest_step()
      manager.close()
      if step is not None:
        return candidate, step
  if (path / "state").is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  raise errors.CheckpointError(
      f"{path}: no complete checkpoint found (expected {BEST_DIR}/<step> or {LATEST_DIR}/<step> "
      "written by train.py)")


EXPORT_PARAMS = "params.msgpack"
ENCODER_FIELDS = ("name", "weights", "feature_stage")


def model_mismatch(config, vocab, reference_config, reference_vocab, reference: str) -> str | None:
  """Why a model's decoder cannot stand in for `reference`'s (vocabulary, encoder), or None.

  Returns e.g. "its vocabulary (2541 words) differs from this run's (2540)"; the caller names the
  model's path and says what needs the match.
  """
  if vocab != reference_vocab:
    return f"its vocabulary ({len(vocab)} words) differs from {reference}'s ({len(reference_vocab)})"
  for field in ENCODER_FIELDS:
    if config.encoder[field] != reference_config.encoder[field]:
      return (f"trained with config.encoder.{field} = {config.encoder[field]!r}, {reference} with "
              f"{reference_config.encoder[field]!r}")
  return None


def _parameter_mismatch(flat, reference, path, reference_path) -> str | None:
  """The first parameter (flattened name) missing from one model or shaped differently, or None."""
  for name in sorted(flat.keys() ^ reference.keys()):
    return f"{name} is in {path if name in flat else reference_path} only"
  for name in sorted(reference):
    if np.shape(flat[name]) != np.shape(reference[name]):
      return f"{name} has shape {np.shape(flat[name])}, {reference_path}'s {np.shape(reference[name])}"
  return None


def average_variables(paths: Sequence[str | os.PathLike], loaded: Sequence[tuple]) -> dict:
  """The leaf-by-leaf mean of several models' variables: a uniform "model soup".

  Args:
    paths: where each model came from (for error messages).
    loaded: each model's `(variables, config, vocab)` as `load_for_inference` returns them.
  Returns:
    variables shaped like the first model's, float32; other leaves must be equal and are kept.
  Raises:
    CheckpointError: naming the model whose vocabulary, encoder, parameter names or shapes differ
    from the first's.
  """
  first_variables, first_config, first_vocab = loaded[0]
  first = traverse_util.flatten_dict(first_variables, sep="/")
  flat_models = [first]
  for path, (variables, config, vocab) in zip(paths[1:], loaded[1:]):
    flat = traverse_util.flatten_dict(variables, sep="/")
    mismatch = (model_mismatch(config, vocab, first_config, first_vocab, str(paths[0]))
                or _parameter_mismatch(flat, first, path, paths[0]))
    if mismatch is not None:
      raise errors.CheckpointError(f"{path}: {mismatch}; only models of one architecture, "
                                   "vocabulary and encoder can be averaged")
    flat_models.append(flat)
  averaged = {}
  for name in first:
    leaves = [np.asarray(model[name]) for model in flat_models]
    if np.issubdtype(leaves[0].dtype, np.floating):
      averaged[name] = np.mean(np.stack(leaves).astype(np.float32), axis=0)
    elif all(np.array_equal(other, leaves[0]) for other in leaves[1:]):
      averaged[name] = leaves[0]
    else:
      raise errors.CheckpointError(f"{paths[0]}: {name} holds integers that differ between the "
                                   "models; it cannot be averaged")
  return traverse_util.unflatten_dict(averaged, sep="/")


def vocabulary_with_ending_rates(config, vocab, data_root: str | os.PathLike, source=""):
  """`vocab` rebuilt from the training captions under `data_root`, with its ending rates.

  For models saved before vocabularies kept `ending_rates`: the model's `config.data` layout is read
  under `data_root` and the vocabulary built as training built it; its words must equal `vocab`'s.
  """
  data_config = datasets.rooted_at(config.data, data_root)
  records = datasets.load_records(data_config, data_config.train_split)
  rebuilt = vocab_lib.Vocabulary.build((c for r in records for c in r.captions),
                                       min_count=config.vocab.min_count,
                                       max_size=config.vocab.max_size)
  if rebuilt != vocab:
    raise errors.CheckpointError(
        f"{source}: the vocabulary built from {data_root}'s {data_config.train_split!r} captions "
        f"({len(rebuilt)} words) is not the model's ({len(vocab)}); pass the data it was trained on")
  return rebuilt


def export(sources: str | os.PathLike | Sequence[str | os.PathLike],
           out_dir: str | os.PathLike, *, data_root: str | os.PathLike | None = None
           ) -> pathlib.Path:
  """Writes a compact inference copy of a checkpoint, or of the average of several.

  Several `sources` (workdirs, checkpoints or exports) are averaged leaf by leaf
  (`average_variables`, a uniform "model soup", Wortsman et al., 2022): meant for runs fine-tuned
  from one model, e.g. self-critical runs at several learning rates from one cross-entropy
  checkpoint, whose average can score above each of them. The copy takes the first one's config.
  `data_root`: rebuild the vocabulary's ending rates from the training captions there
  (`vocabulary_with_ending_rates`), for models trained before vocabularies kept them.

  `out_dir` then holds `params.msgpack` (flax msgpack, float16 leaves; the frozen encoder's weights are
  not copied: they come from the weights package named in the config), `config.json` and `vocab.json`.
  """
  paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
  if not paths:
    raise errors.CheckpointError("export: no checkpoint given")
  loaded = [load_for_inference(path) for path in paths]
  variables, config, vocab = loaded[0]
  if len(loaded) > 1:
    variables = average_variables(paths, loaded)
  if data_root is not None:
    vocab = vocabulary_with_ending_rates(config, vocab, data_root, source=paths[0])
  out_dir = pathlib.Path(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.CheckpointError(f"{out_dir}: cannot hold the exported model ({e.strerror})") from None
  compact = jax.tree_util.tree_map(
      lambda x: np.asarray(x, np.float16) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
      variables)
  (out_dir / EXPORT_PARAMS).write_bytes(serialization.msgpack_serialize(compact))
  (out_dir / "config.json").write_text(config.to_json(indent=2) + "\n")
  vocab.save(out_dir / "vocab.json")
  return out_dir


def _load_export(path: pathlib.Path):
  try:
    compact = serialization.msgpack_restore((path / EXPORT_PARAMS).read_bytes())
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f"{path}: exported model cannot be read ({e})")
  variables = jax.tree_util.tree_map(
      lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
      compact)
  return variables, config, vocab_lib.Vocabulary.load(path / "vocab.json")


def load_for_inference(path: str | os.PathLike):
  """Reads (variables, config, vocab) from a training workdir, checkpoint or exported model directory.

  Returns:
    variables: dict with "params" (and "batch_stats" when the model has them), numpy arrays.
    config: the `ml_collections.ConfigDict` the model was trained with.
    vocab: the `Vocabulary` it was trained with.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.CheckpointError(f"{path}: checkpoint directory does not exist")
  if (path / EXPORT_PARAMS).exists():
    return _load_export(path)
  manager_dir, step = _step_dir(path)
  manager = _manager(manager_dir, keep=1, read_only=True)
  try:
    args = _orbax().args
    restored = manager.restore(step, args=args.Composite(
        state=args.StandardRestore(), config=args.JsonRestore(), vocab=args.JsonRestore()))
  except Exception as e:  # orbax raises many types; the user needs the path and the cause.
    raise errors.CheckpointError(f"{manager_dir}/{step}: cannot be read ({type(e).__name__}: {e})")
  finally:
    manager.close()
  state = restored["state"]
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  config = ml_collections.ConfigDict(restored["config"])
  vocab = vocab_lib.Vocabulary.from_json(restored["vocab"])
  return variables, config, vocab
