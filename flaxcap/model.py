"""The captioning model (encoder + attention decoder) and its loss.

`Captioner` runs images through a CNN encoder to a feature grid and the `Decoder` over it.  Training with a
frozen encoder can skip the encoder and feed cached features to `decode_features`.  The loss is the
"Show, Attend and Tell" objective: masked token cross-entropy plus the doubly stochastic attention term
alpha_c * mean_{image, location} (1 - sum_t alpha_t)^2.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxcap import decoder as decoder_lib
from flaxcap import errors

Array = jax.Array

PAD_ID = 0  # the padding token id, `flaxcap.vocab.PAD`; padded target positions are masked out

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Captioner(nn.Module):
  """Encoder + soft-attention decoder.

  Attributes:
    encoder: a linen module, `encoder(images, train=...) -> features [batch, h, w, C]`.
    decoder: the `Decoder`.
    encoder_trainable: False (a frozen encoder) stops gradients at the features and runs the encoder in
      inference mode even while training; True runs it with `train=train`.
  """
  encoder: nn.Module
  decoder: decoder_lib.Decoder
  encoder_trainable: bool = False

  def encode_images(self, images: Array, *, train: bool = False) -> Array:
    """images [batch, H, W, 3] -> feature grid [batch, h, w, C]."""
    features = self.encoder(images, train=train and self.encoder_trainable)
    if not self.encoder_trainable:
      features = jax.lax.stop_gradient(features)
    return features

  def __call__(self, images: Array, input_tokens: Array, *, train: bool) -> tuple[Array, Array]:
    """Teacher-forced captioning from images.

    Args:
      images: [batch, H, W, 3], as the encoder takes them.
      input_tokens: [batch, T], <bos> w1 ... (see `teacher_forcing_tokens`).
      train: enables dropout (needs a "dropout" rng) and, for a trainable encoder, its training mode.

    Returns:
      logits [batch, T, V] float32 and attention [batch, T, P] float32.
    """
    features = self.encode_images(images, train=train)
    return self.decoder(features, input_tokens, deterministic=not train)

  def decode_features(self, features: Array, input_tokens: Array, *,
                      deterministic: bool) -> tuple[Array, Array]:
    """Teacher-forced captioning from precomputed (cached) features [batch, P, C] or [batch, h, w, C].

    Returns logits [batch, T, V] and attention [batch, T, P]; uses only the decoder's parameters.
    """
    return self.decoder(features, input_tokens, deterministic=deterministic)

  # Decoding entry points for `apply(..., method=...)`: images -> Encoded, then the decoder's step.

  def encode(self, images: Array) -> decoder_lib.Encoded:
    """images [batch, H, W, 3] -> `Encoded` (features [batch, P, C], projected [batch, P, A])."""
    return self.decoder.encode(self.encode_images(images, train=False))

  def encode_features(self, features: Array) -> decoder_lib.Encoded:
    """Cached features [batch, P, C] or [batch, h, w, C] -> `Encoded`."""
    return self.decoder.encode(features)

  def initial_carry(self, encoded: decoder_lib.Encoded, beam: int | None = None):
    """See `Decoder.initial_carry`."""
    return self.decoder.initial_carry(encoded, beam)

  def step(self, encoded: decoder_lib.Encoded, carry, tokens: Array, deterministic: bool = True):
    """See `Decoder.step`: (logits [batch, (K,) V], new carry, attention [batch, (K,) P])."""
    return self.decoder.step(encoded, carry, tokens, deterministic=deterministic)


def _dtype(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in _DTYPES:
    raise errors.ConfigError(f"config.{field} = {value!r}: use one of {sorted(_DTYPES)}")
  return _DTYPES[value]


def _switch(config, field: str) -> bool | None:
  """A config switch "auto" | "true" | "false" (or a bool, as older configs hold): None for auto."""
  value = config.decoder.get(field, "auto")
  if isinstance(value, bool) or value is None:
    return value
  choice = {"auto": None, "true": True, "false": False}
  if str(value).lower() not in choice:
    raise errors.ConfigError(f"config.decoder.{field} = {value!r}: use auto, true or false")
  return choice[str(value).lower()]


def create_decoder(config, vocab_size: int) -> decoder_lib.Decoder:
  """The `Decoder` from `config.decoder` (`config.half_precision` forces bfloat16 compute)."""
  if vocab_size < 4:
    raise errors.ConfigError(f"vocab_size = {vocab_size}: a vocabulary holds at least the 4 special tokens")
  dec = config.decoder
  for field in ("embed_dim", "hidden_dim", "attention_dim"):
    if int(dec[field]) <= 0:
      raise errors.ConfigError(f"config.decoder.{field} = {dec[field]!r}: must be a positive integer")
  if not 0.0 <= float(dec.dropout_rate) < 1.0:
    raise errors.ConfigError(f"config.decoder.dropout_rate = {dec.dropout_rate!r}: must be in [0, 1)")
  activation = dec.get("attention_activation", "tanh")
  if activation not in ("tanh", "relu"):
    raise errors.ConfigError(f"config.decoder.attention_activation = {activation!r}: use tanh or relu")
  if int(dec.get("pad_columns_to", 1)) < 1:
    raise errors.ConfigError(f"config.decoder.pad_columns_to = {dec.pad_columns_to!r}: must be >= 1")
  dtype = jnp.bfloat16 if config.get("half_precision", False) else _dtype(config, "decoder.dtype")
  feature_dtype = _dtype(config, "decoder.feature_dtype") if dec.get("feature_dtype", "") else None
  return decoder_lib.Decoder(
      vocab_size=int(vocab_size), embed_dim=int(dec.embed_dim), hidden_dim=int(dec.hidden_dim),
      attention_dim=int(dec.attention_dim), dropout_rate=float(dec.dropout_rate), gate=bool(dec.gate),
      prev2out=bool(dec.prev2out), ctx2out=bool(dec.ctx2out), attention_activation=activation,
      dtype=dtype, unroll=int(dec.get("unroll", 1)),
      recompute_attention=_switch(config, "recompute_attention"), feature_dtype=feature_dtype,
      pad_columns_to=int(dec.get("pad_columns_to", 1)),
      fused_attention=bool(dec.get("fused_attention", False)),
      score_kernel=bool(dec.get("score_kernel", False)), approx_tanh=bool(dec.get("approx_tanh", False)),
      late_projected_grad=bool(dec.get("late_projected_grad", False)),
      late_weight_grad=bool(dec.get("late_weight_grad", False)),
      score_vjp=bool(dec.get("score_vjp", False)))


def create_encoder(config, *, feature_stage: int | None = None, start_stage: int = 0) -> nn.Module:
  """The encoder module named by `config.encoder` (`config.half_precision` forces bfloat16).

  `feature_stage` (default `config.encoder.feature_stage`) and `start_stage` cut it into the frozen
  head and the trained tail of fine-tuning from cached features (`encoders.create_encoder`). The
  stages whose BatchNorm follows the batch in training are the trainable ones, or none with
  `config.encoder.frozen_batch_norm`.
  """
  from flaxcap import encoders  # pylint: disable=g-import-not-at-top  (heavy; not needed by decoding)
  dtype = jnp.bfloat16 if config.get("half_precision", False) else _dtype(config, "encoder.dtype")
  if feature_stage is None:
    feature_stage = config.encoder.feature_stage
  batch_norm_stages = () if config.encoder.get("frozen_batch_norm", False) else tuple(
      config.encoder.trainable_stages)
  return encoders.create_encoder(config.encoder.name, feature_stage=feature_stage, dtype=dtype,
                                 trainable_stages=batch_norm_stages, start_stage=start_stage)


def pretrained_encoder(config) -> tuple[nn.Module, dict]:
  """The encoder of `config` and its variables: ImageNet weights (`config.encoder.weights` =
  "imagenet"), a torchvision-format file (a path), or a random initialization ("none")."""
  from flaxcap import pretrained  # pylint: disable=g-import-not-at-top
  encoder = create_encoder(config)
  images = np.zeros((1, config.image_size, config.image_size, 3), np.uint8)
  weights = config.encoder.weights
  if weights == "none":  # one program: op by op, every initializer of a new shape compiles alone
    return encoder, jax.jit(encoder.init)(jax.random.key(config.seed), images)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), images)
  return encoder, pretrained.load_pretrained(config.encoder.name, variables,
                                             None if weights == "imagenet" else weights)


def encoder_and_variables(config, checkpoint_variables: dict | None = None) -> tuple[nn.Module, dict]:
  """The encoder of `config` with the variables a checkpoint carries (a fine-tuned encoder: no
  weights package is read), or else its pretrained ones (`pretrained_encoder`).

  `checkpoint_variables`: {"params": {"decoder", ("encoder")}, ("batch_stats": {"encoder"})}, as
  `checkpoints.load_for_inference` returns them.
  """
  if not checkpoint_variables or "encoder" not in checkpoint_variables["params"]:
    return pretrained_encoder(config)
  variables = {"params": checkpoint_variables["params"]["encoder"]}
  batch_stats = checkpoint_variables.get("batch_stats", {}).get("encoder")
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return create_encoder(config), variables


def create_model(config, vocab_size: int, encoder: nn.Module | None = None) -> Captioner:
  """Builds the `Captioner` from a config.

  Args:
    config: the `ml_collections.ConfigDict` of `configs/default.py` (reads encoder.*, decoder.*,
      half_precision).
    vocab_size: V.
    encoder: an encoder module to use instead of `create_encoder(config)`.

  Raises:
    ConfigError: a decoder field or dtype holds a value that cannot be used.
  """
  return Captioner(encoder=encoder or create_encoder(config),
                   decoder=create_decoder(config, vocab_size),
                   encoder_trainable=bool(tuple(config.encoder.trainable_stages)))


def teacher_forcing_tokens(tokens: Array) -> tuple[Array, Array]:
  """Splits padded captions into decoder inputs and targets.

  Args:
    tokens: [batch, max_len] int, <bos> w1 .. wn <eos> <pad> ...

  Returns:
    input_tokens tokens[:, :-1] and target_tokens tokens[:, 1:], each [batch, max_len - 1].
  """
  return tokens[:, :-1], tokens[:, 1:]


def caption_loss_sums(logits: Array, target_tokens: Array, attention: Array, *,
                      label_smoothing: float = 0.0) -> dict[str, Array]:
  """The loss terms summed over a batch, with their counts, for exact averaging across devices.

  Args:
    logits: [batch, T, V].
    target_tokens: [batch, T] int, PAD_ID where there is nothing to predict.
    attention: [batch, T, P], the attention weights of each step.
    label_smoothing: eps of label smoothing: targets (1 - eps) one-hot + eps / V.

  Returns:
    float32 scalars: "token_loss" (sum over real tokens of the (smoothed) cross-entropy),
    "cross_entropy" (the same without smoothing), "attention_penalty" (sum over images with a real
    token of mean_p (1 - sum_t m_bt alpha_btp)^2), "correct" (real tokens whose argmax is right),
    "num_tokens" and "num_images" (images with at least one real token).
  """
  logits = logits.astype(jnp.float32)
  attention = attention.astype(jnp.float32)
  mask = (target_tokens != PAD_ID).astype(jnp.float32)  # [batch, T]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, target_tokens)  # [batch, T]
  cross_entropy = jnp.sum(nll * mask)
  if label_smoothing:
    labels = optax.smooth_labels(jax.nn.one_hot(target_tokens, logits.shape[-1]), label_smoothing)
    token_loss = jnp.sum(optax.softmax_cross_entropy(logits, labels) * mask)
  else:
    token_loss = cross_entropy
  attention_total = jnp.einsum("btp,bt->bp", attention, mask)  # [batch, P]
  image_mask = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)  # [batch]
  attention_penalty = jnp.sum(image_mask * jnp.mean(jnp.square(1.0 - attention_total), axis=-1))
  correct = (jnp.argmax(logits, axis=-1) == target_tokens).astype(jnp.float32)
  return {
      "token_loss": token_loss,
      "cross_entropy": cross_entropy,
      "attention_penalty": attention_penalty,
      "correct": jnp.sum(correct * mask),
      "num_tokens": jnp.sum(mask),
      "num_images": jnp.sum(image_mask),
  }


def caption_loss(logits: Array, target_tokens: Array, attention: Array, *, alpha_c: float,
                 label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Masked token cross-entropy plus the doubly stochastic attention term.

      loss = sum_{b,t} m_bt CE_bt / sum m  +  alpha_c * mean_{b, p} (1 - sum_t m_bt alpha_btp)^2

  where m_bt = (target_bt != PAD_ID).  The attention mean runs over the images with at least one real
  token (all-padding rows, e.g. filler in a last batch, count for nothing) and over the P locations.
  Shapes and arguments as in `caption_loss_sums`; alpha_c weighs the attention term (0 turns it off).

  Returns:
    (loss scalar, metrics) with metrics float32 scalars: "loss"; "cross_entropy", the mean token negative
    log-likelihood without smoothing; "attention_reg", the mean (1 - sum_t alpha)^2 before alpha_c;
    "accuracy", the share of real tokens whose argmax is right; "num_tokens", the count of real tokens.
  """
  sums = caption_loss_sums(logits, target_tokens, attention, label_smoothing=label_smoothing)
  tokens = jnp.maximum(sums["num_tokens"], 1.0)
  attention_reg = sums["attention_penalty"] / jnp.maximum(sums["num_images"], 1.0)
  metrics = {
      "loss": sums["token_loss"] / tokens + alpha_c * attention_reg,
      "cross_entropy": sums["cross_entropy"] / tokens,
      "attention_reg": attention_reg,
      "accuracy": sums["correct"] / tokens,
      "num_tokens": sums["num_tokens"],
  }
  return metrics["loss"], metrics
