"""Training: `TrainState`, the pmapped train step, the epoch loop, evaluation and checkpoints.

`train_and_evaluate(config, workdir)` is the whole job. With a frozen encoder (the default) every image
is encoded once (`feature_cache`), the feature table lives on the devices, and a batch is a set of table
rows plus caption tokens, so an epoch costs only the decoder. With `config.encoder.trainable_stages` set,
the table holds the frozen stages' output and each step runs the encoder's trainable tail on its rows,
or (stage 0 trainable, augmentation, `config.data.cache_features=False`) images flow through the
whole encoder every step from the tf.data pipeline (`train_data`).

The batch order is a pure function of (seed, epoch) and dropout keys of (seed, step), so a run restarted
from its latest checkpoint continues exactly where it stopped.
"""

import functools
import math
import pathlib
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import tqdm

from flaxcap import checkpoints
from flaxcap import errors
from flaxcap import metrics as metrics_lib
from flaxcap import model as model_lib
from flaxcap import optimizer
from flaxcap import replication
from flaxcap import run_config
from flaxcap import self_critical
from flaxcap import train_data

AXIS = replication.AXIS  # the mesh axis the train step is pmapped over


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array


def _evaluates_after(config, epoch: int) -> bool:
  """Whether the dev split is captioned and scored after `epoch` (from 0)."""
  return (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs


def dropout_key(rng: jax.Array, step) -> jax.Array:
  """This device's dropout key at `step` (under `jax.pmap` over `AXIS`): a function of the run's key
  and the step, different on every device (the same masks everywhere would drop the same units)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))


def train_step(state: TrainState, batch, feature_table, *, model, alpha_c: float,
               label_smoothing: float):
  """One optimizer step on this device's share of the global batch (run under `jax.pmap`).

  The loss is normalized by the token and image counts of the whole global batch, so that the
  `pmean` of the gradients equals the gradient of the single-device loss on the same batch.

  Args:
    batch: {"tokens": int32 [per_device, max_len]} and either {"image_index": int32 [per_device]},
      rows of `feature_table`, or {"images": uint8 [per_device, H, W, 3]}.
    feature_table: cached encoder features [num_images, P, C] (a frozen encoder) or the frozen
      stages' output [num_images, h, w, c] (the model's encoder is the trainable tail), or None
      when images are given.
  Returns:
    The new state, and metric sums over the global batch.
  """
  rng = dropout_key(state.rng, state.step)
  input_tokens, target_tokens = model_lib.teacher_forcing_tokens(batch["tokens"])

  def loss_fn(params):
    if feature_table is not None and not model.encoder_trainable:
      features = feature_table[batch["image_index"]]
      logits, attention = model.apply(
          {"params": params}, features, input_tokens, deterministic=False, rngs={"dropout": rng},
          method=model_lib.Captioner.decode_features)
      new_model_state = {}
    else:  # images, or the cached output of the frozen stages for the encoder's trainable tail
      inputs = batch["images"] if feature_table is None else feature_table[batch["image_index"]]
      (logits, attention), new_model_state = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, inputs, input_tokens,
          train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    sums = model_lib.caption_loss_sums(logits, target_tokens, attention,
                                       label_smoothing=label_smoothing)
    num_devices = lax.psum(1, AXIS)
    tokens_per_device = lax.psum(sums["num_tokens"], AXIS) / num_devices
    images_per_device = lax.psum(sums["num_images"], AXIS) / num_devices
    loss = (sums["token_loss"] / tokens_per_device
            + alpha_c * sums["attention_penalty"] / images_per_device)
    return loss, (sums, new_model_state)

  (_, (sums, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=lax.pmean(grads, AXIS))
  if new_model_state:
    new_state = new_state.replace(batch_stats=lax.pmean(new_model_state["batch_stats"], AXIS))
  return new_state, lax.psum(sums, AXIS)


def summarize(sums: dict[str, np.ndarray], alpha_c: float) -> dict[str, float]:
  """Turns metric sums over one or more steps into means for logging."""
  tokens = float(np.sum(sums["num_tokens"]))
  images = float(np.sum(sums["num_images"]))
  cross_entropy = float(np.sum(sums["cross_entropy"])) / tokens
  attention = float(np.sum(sums["attention_penalty"])) / images
  return {"loss": cross_entropy + alpha_c * attention, "cross_entropy": cross_entropy,
          "attention_penalty": attention, "accuracy": float(np.sum(sums["correct"])) / tokens,
          "perplexity": math.exp(min(cross_entropy, 50.0))}


@functools.lru_cache(maxsize=4)
def _pmapped_train_step(model, alpha_c: float, label_smoothing: float):
  """`train_step` pmapped, kept across runs of the same model in one process (one compilation)."""
  return jax.pmap(functools.partial(train_step, model=model, alpha_c=alpha_c,
                                    label_smoothing=label_smoothing),
                  axis_name=AXIS, donate_argnums=(0,))


class CrossEntropy:
  """The paper's objective, teacher-forced (the default): what `train_and_evaluate` optimizes.

  An objective owns an epoch's batches and the update on one batch; `self_critical.SelfCritical`
  is the other one.
  """

  def __init__(self, config, model, data: train_data.TrainData):
    self.config, self.data = config, data
    self._train_step = _pmapped_train_step(model, float(config.loss.alpha_c),
                                           float(config.loss.label_smoothing))

  def steps_per_epoch(self) -> int:
    return self.data.steps_per_epoch()

  def batches(self, *, epoch: int, num_devices: int, skip_batches: int):
    return self.data.train_batches(epoch=epoch, num_devices=num_devices, skip_batches=skip_batches)

  def step(self, replicated_state, batch, replicated_table):
    """One update: (new replicated state, metric sums on device)."""
    return self._train_step(replicated_state, batch, replicated_table)

  def summarize(self, sums) -> dict[str, float]:
    return summarize(sums, self.config.loss.alpha_c)


def training_model(config, vocab_size: int, encoder) -> model_lib.Captioner:
  """The model the train step applies: `encoder` (the data's) with a decoder for `vocab_size` words.

  With `config.encoder.sync_batch_norm` the encoder's BatchNorm layers that follow the batch take
  their statistics over the `AXIS` devices, so fine-tuning on N devices gives the parameters of one.
  """
  if config.encoder.get("sync_batch_norm", True):
    encoder = encoder.clone(batch_norm_axis=AXIS)
  return model_lib.create_model(config, vocab_size, encoder=encoder)


def create_train_state(config, model, data: train_data.TrainData, steps_per_epoch: int) -> TrainState:
  """Initializes the decoder (and the pretrained encoder when it is fine-tuned) and the optimizer."""
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  input_tokens = np.zeros((1, config.data.max_len - 1), np.int32)
  if not model.encoder_trainable:
    feature_shape = data.feature_table.shape[1:]
  else:  # the encoder's output shape, traced without running it
    inputs = (jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
              if data.feature_table is None else
              jax.ShapeDtypeStruct((1,) + data.feature_table.shape[1:], jnp.float32))
    feature_shape = jax.eval_shape(data.encoder.apply, data.encoder_variables, inputs).shape[1:]
  # Only the decoder is initialized here (the same parameters as a whole-model init: flax derives
  # each submodule's keys from its name); a fine-tuned encoder starts from its pretrained variables,
  # so a random init of it, op by op, would be thrown away.
  # Compiled as one program: run op by op, each initializer and each optimizer slot of a new shape
  # compiles on its own (seconds at start-up, on every run).
  init = functools.partial(model.init, deterministic=True, method=model_lib.Captioner.decode_features)
  variables = jax.jit(init)(init_rng, np.zeros((1,) + tuple(feature_shape), np.float32),
                            input_tokens)
  params, batch_stats = dict(variables["params"]), {}
  # The whole encoder's variables (a tail ignores its head's) when they train, or when they are a
  # fine-tuned run's (frozen here, but checkpoints and exports must carry them).
  if model.encoder_trainable or data.encoder_from_checkpoint:
    params["encoder"] = data.encoder_variables["params"]
    batch_stats = {"encoder": data.encoder_variables.get("batch_stats", {})}
  tx = optimizer.create_optimizer(config, steps_per_epoch, optimizer.param_labels(params, config))
  return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx,
                    opt_state=jax.jit(tx.init)(params), batch_stats=batch_stats, rng=state_rng)


def warm_start(state: TrainState, data: train_data.TrainData) -> TrainState:
  """`state` with the decoder parameters of `config.init_checkpoint` (unchanged when it is "").

  A fine-tuned encoder of that run is already in `state` (`train_data.prepare` took it as the encoder's
  variables); the optimizer starts afresh.
  """
  if data.init_params is None:
    return state
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  if shapes(data.init_params["decoder"]) != shapes(state.params["decoder"]):
    raise errors.ConfigError(f"{data.config.init_checkpoint}: its decoder's parameter shapes differ "
                             "from config.decoder's; use the config it was trained with")
  params = dict(state.params, decoder=jax.device_put(data.init_params["decoder"]))
  return state.replace(params=params, opt_state=jax.jit(state.tx.init)(params))


def evaluate(config, params, data: train_data.TrainData, *, metrics=("BLEU", "CIDEr"),
             beam_size=None, batch_stats=None) -> dict[str, float]:
  """Captions the eval split (greedy by default) and scores it against its references.

  `batch_stats`: a fine-tuned encoder's running statistics (the train state's).
  """
  beam_size = beam_size or config.eval.beam_size
  captions = data.caption_eval_split(params, beam_size=beam_size, max_len=config.eval.max_len,
                                     length_penalty=config.eval.length_penalty,
                                     batch_size=config.eval.batch_size, batch_stats=batch_stats)
  references = {record.image_id: list(record.captions) for record in data.eval_records}
  references = {key: references[key] for key in captions}
  return metrics_lib.score(references, captions, metrics=metrics)


class _NaNGuard:
  """Collects per-step metric sums on device and checks them on the host before any checkpoint."""

  def __init__(self):
    self.pending = []  # (step, device metrics)

  def add(self, step, sums):
    self.pending.append((step, sums))

  def flush(self, store) -> list[dict]:
    """Returns the pending steps' metric sums (host numpy); raises TrainingError on a NaN loss."""
    fetched = jax.device_get([jax.tree_util.tree_map(lambda x: x[0], s) for _, s in self.pending])
    for (step, _), sums in zip(self.pending, fetched):
      if not all(np.isfinite(np.asarray(value)).all() for value in sums.values()):
        last = store.latest.latest_step()
        raise errors.TrainingError(
            f"the loss became NaN or infinite at step {step}; the last good checkpoint "
            f"({store.latest.directory}/{last}) is kept intact" if last is not None else
            f"the loss became NaN or infinite at step {step}; no checkpoint was written")
    self.pending = []
    return fetched


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains, evaluates each epoch, checkpoints, and resumes from `workdir` when it holds a run."""
  if config.distributed:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # no coordinator given or found
      raise errors.ConfigError(
          f"config.distributed=True: jax.distributed.initialize() failed ({str(e).splitlines()[0]}); "
          "set the coordinator address, process count and id, or leave it False on one host") from None
  run_config.check(config)
  if config.self_critical.num_samples:
    self_critical.check_config(config)
  workdir = pathlib.Path(workdir)
  checkpoints.check_resume_config(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  data = train_data.prepare(config, workdir)
  model = training_model(config, len(data.vocab), data.encoder)
  if config.self_critical.num_samples:
    objective = self_critical.SelfCritical(config, model, data, axis_name=AXIS)
  else:
    objective = CrossEntropy(config, model, data)
  num_devices = jax.local_device_count()
  steps_per_epoch = objective.steps_per_epoch()

  store = checkpoints.CheckpointStore(workdir, keep=config.checkpoint.keep,
                                      best_metric=config.eval.best_metric)
  writer = None
  try:  # closed on any exit: an open writer left to atexit prints a traceback (Python 3.12)
    store.check_vocab(data.vocab)
    state = create_train_state(config, model, data, steps_per_epoch)
    state = store.restore_latest(state) or warm_start(state, data)
    step = int(state.step)
    start_epoch, skip_batches = divmod(step, steps_per_epoch)
    history = store.evaluations()
    if history and history[-1]["step"] != history[-1]["epoch"] * steps_per_epoch:
      raise errors.CheckpointError(
          f"{store.evaluations_path}: epoch {history[-1]['epoch']} ended at step "
          f"{history[-1]['step']}, an epoch is now {steps_per_epoch} steps (the training split "
          "changed); use a new --workdir")
    if (history and history[-1]["step"] == step and config.eval.patience
        and history[-1]["epochs_since_best"] >= config.eval.patience):
      logging.info("The run stopped early at step %d (config.eval.patience): nothing to do", step)
      return history[-1]["metrics"]
    if history and config.optimizer.schedule == "plateau":  # the scale set after the last evaluation
      state.opt_state[-1].hyperparams["step_size"] = np.float32(history[-1]["plateau_scale"])
    if (step and not skip_batches and _evaluates_after(config, start_epoch - 1)
        and step not in {entry["step"] for entry in history}):
      # Stopped after the epoch's checkpoint, before its evaluation was recorded: evaluate it first.
      start_epoch, skip_batches = start_epoch - 1, steps_per_epoch

    replicated_table = (None if data.feature_table is None
                        else replication.replicate(data.feature_table))
    replicated_state = replication.replicate(state)
    writer = _summary_writer(workdir) if is_chief else None
    learning_rate = optimizer.create_learning_rate_fn(config, steps_per_epoch, config.optimizer.learning_rate)
    guard = _NaNGuard()
    eval_metrics = {}
    for epoch in range(start_epoch, config.num_epochs):
      epoch_sums, epoch_start = [], time.time()
      progress = tqdm.tqdm(total=steps_per_epoch, initial=skip_batches, desc=f"epoch {epoch + 1}",
                           unit="step", disable=not is_chief, dynamic_ncols=True)
      window_start, window_steps = time.time(), 0
      batches = () if skip_batches == steps_per_epoch else objective.batches(
          epoch=epoch, num_devices=num_devices, skip_batches=skip_batches)
      for batch in batches:
        replicated_state, sums = objective.step(replicated_state, batch, replicated_table)
        step += 1
        window_steps += 1
        guard.add(step, sums)
        progress.update(1)
        if step % config.log_every_steps == 0 or step % config.checkpoint.every_steps == 0:
          fetched = guard.flush(store)
          epoch_sums.extend(fetched)
          logged = objective.summarize(_stack(fetched))
          seconds = time.time() - window_start
          logged["images_per_second"] = window_steps * config.batch_size / seconds
          logged["learning_rate"] = (float(learning_rate(step - 1))  # the last update's
                                     * float(optimizer.plateau_scale(replicated_state.opt_state)[0]))
          window_start, window_steps = time.time(), 0
          progress.set_postfix(loss=f"{logged['loss']:.3f}",
                               img_s=f"{logged['images_per_second']:.0f}")
          if writer:
            for name, value in logged.items():
              writer.add_scalar(f"train/{name}", value, step)
        if step % config.checkpoint.every_steps == 0:
          store.save_latest(step, replication.unreplicate(replicated_state), config, data.vocab)
      progress.close()
      skip_batches = 0
      epoch_sums.extend(guard.flush(store))
      state = jax.device_put(replication.unreplicate(replicated_state))  # on device for the evaluation
      store.save_latest(step, state, config, data.vocab)
      summary = objective.summarize(_stack(epoch_sums)) if epoch_sums else {}
      if writer:  # the means over the epoch's steps (those run since a resume, in a resumed epoch)
        for name, value in summary.items():
          writer.add_scalar(f"epoch/{name}", value, step)
        writer.add_scalar("epoch/seconds", time.time() - epoch_start, step)
      if not _evaluates_after(config, epoch):
        continue
      eval_metrics = evaluate(config, state.params, data, batch_stats=state.batch_stats)
      improved = store.offer_best(step, state, config, data.vocab, eval_metrics)
      if writer:
        for name, value in eval_metrics.items():
          writer.add_scalar(f"eval/{name}", value, step)
        writer.flush()
      logging.info("epoch %d step %d: train loss %s, %s %s(%.0f s)", epoch + 1, step,
                   f"{summary['loss']:.4f}" if "loss" in summary else "- (resumed after it)",
                   ", ".join(f"{config.data.eval_split} {k} {v:.4f}" for k, v in eval_metrics.items()),
                   "(best) " if improved else "", time.time() - epoch_start)
      epochs_since_best = epoch + 1 - (store.best.best_step() or 0) // steps_per_epoch
      stop = bool(config.eval.patience) and epochs_since_best >= config.eval.patience
      if (not stop and config.optimizer.schedule == "plateau" and epochs_since_best > 0
          and epochs_since_best % config.optimizer.plateau_patience == 0):
        scale = optimizer.plateau_scale(replicated_state.opt_state) * config.optimizer.plateau_factor
        logging.info("Plateau: learning rate scale now %.4g", float(scale[0]))
        replicated_state.opt_state[-1].hyperparams["step_size"] = scale
      if is_chief:
        store.record_evaluation({
            "step": step, "epoch": epoch + 1, "metrics": eval_metrics,
            "epochs_since_best": epochs_since_best,
            "plateau_scale": float(np.asarray(optimizer.plateau_scale(replicated_state.opt_state))[0])})
      if stop:
        logging.info("No %s improvement for %d epochs: stopping early", config.eval.best_metric,
                     epochs_since_best)
        break
  finally:
    store.close()
    if writer:
      writer.close()
  return eval_metrics


def _stack(sums_list):
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *sums_list)


def _summary_writer(workdir: pathlib.Path):
  """TensorBoard event files under `<workdir>/tensorboard` (tensorboardX; optional)."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("tensorboardX is not installed: no TensorBoard event files are written")
    return None
  # Its thread writes events to disk every flush_secs (default 120 s): scalars of a run killed
  # sooner were lost, `flush()` writing only what the thread had already taken from its queue.
  return tensorboardX.SummaryWriter(str(workdir / "tensorboard"), flush_secs=2)
