"""The optimizer: learning-rate schedules, Adam/AdamW per parameter group, plateau decay's scale.

    labels = optimizer.param_labels(params, config)      # decoder | encoder_trainable | frozen
    tx = optimizer.create_optimizer(config, steps_per_epoch, labels)
    rate = optimizer.create_learning_rate_fn(config, steps_per_epoch, config.optimizer.learning_rate)
"""

import jax
import optax

from flaxcap import encoders
from flaxcap import errors


def create_learning_rate_fn(config, steps_per_epoch: int, base_learning_rate: float) -> optax.Schedule:
  """Linear warm-up, then cosine decay to zero at the last step (or constant for plateau decay)."""
  warmup_steps = config.optimizer.warmup_steps
  total_steps = max(config.num_epochs * steps_per_epoch, warmup_steps + 1)
  if config.optimizer.schedule == "cosine":
    decay = optax.cosine_decay_schedule(base_learning_rate, total_steps - warmup_steps)
  elif config.optimizer.schedule in ("constant", "plateau"):
    decay = optax.constant_schedule(base_learning_rate)
  else:
    raise errors.ConfigError(f"config.optimizer.schedule={config.optimizer.schedule!r}: "
                             "use cosine, constant or plateau")
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def create_optimizer(config, steps_per_epoch: int, param_labels) -> optax.GradientTransformation:
  """Global-norm clipping, Adam/AdamW per parameter group, and a host-set scale for plateau decay.

  `param_labels` maps every parameter to "decoder", "encoder_trainable" or "frozen"; the trainable
  encoder stages get `config.encoder.learning_rate`, frozen parameters get no update at all.
  """
  def adam(learning_rate):
    lr_fn = create_learning_rate_fn(config, steps_per_epoch, learning_rate)
    if config.optimizer.name == "adam":
      return optax.adam(lr_fn)
    if config.optimizer.name == "adamw":
      return optax.adamw(lr_fn, weight_decay=config.optimizer.weight_decay)
    raise errors.ConfigError(f"config.optimizer.name={config.optimizer.name!r}: use adam or adamw")

  transforms = {"decoder": adam(config.optimizer.learning_rate),
                "encoder_trainable": adam(config.encoder.learning_rate),
                "frozen": optax.set_to_zero()}
  return optax.chain(
      optax.clip_by_global_norm(config.optimizer.grad_clip_norm),
      optax.multi_transform(transforms, param_labels),
      optax.inject_hyperparams(optax.scale)(step_size=1.0))


def plateau_scale(opt_state):
  """The scale the host sets for plateau decay (per device under pmap: [devices])."""
  return opt_state[-1].hyperparams["step_size"]


def param_labels(params, config):
  """Labels for `create_optimizer`: the decoder, and the encoder's trainable or frozen stages."""
  labels = {"decoder": jax.tree_util.tree_map(lambda _: "decoder", params["decoder"])}
  if "encoder" in params:
    labels["encoder"] = encoders.trainable_param_labels(
        config.encoder.name, params["encoder"], config.encoder.trainable_stages)
  return labels
