"""Self-critical sequence training (Rennie et al., 2017): fine-tunes a captioner on CIDEr-D.

Cross-entropy training teaches the decoder the next word of a human caption; the captions it is judged
on are its own. Self-critical training starts from a cross-entropy run and rewards the decoder's own
samples: each step draws `num_samples` captions per image, scores each with CIDEr-D against the
image's references (document frequencies of the whole training set; optionally plus a weighted
sentence BLEU-4, `CaptionReward`), and moves the decoder towards the samples that beat the mean of
the image's other samples (the baseline of Luo, 2020, "A better variant of self-critical sequence
training") and away from the others:

    loss = - sum_{b,k} (r_bk - mean_{j != k} r_bj) * sum_t log p(w_bkt | w_bk<t, image_b) / #tokens

Dropout is off while sampling and in the update, so the gradient is that of the sampling policy.
Frozen encoder only: a batch is rows of the cached feature table, as in cross-entropy training.
`train_lib.train_and_evaluate` runs it when `config.self_critical.num_samples` > 0.
"""

import functools
import pathlib

import einops
from flax import jax_utils
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flaxcap import decoding
from flaxcap import epoch_plan
from flaxcap import errors
from flaxcap import metrics
from flaxcap import model as model_lib
from flaxcap import sentence_scores
from flaxcap import vocab as vocab_lib

# Appended to references and ended samples when `config.self_critical.reward_end` (see `sentence_scores.CiderD`);
# it goes on after tokenization, and no Flickr8k caption contains it.
REWARD_END_TOKEN = "<eos>"

def advantages(rewards: np.ndarray) -> np.ndarray:
  """Each sample's reward minus the mean reward of the other samples of its image.

  Args:
    rewards: [batch, num_samples], num_samples >= 2.
  Returns:
    [batch, num_samples]; every row sums to zero.
  """
  num_samples = rewards.shape[-1]
  if num_samples < 2:
    raise errors.ConfigError("self-critical training needs config.self_critical.num_samples >= 2 "
                             "(each sample's baseline is the mean of the others)")
  others_mean = (rewards.sum(-1, keepdims=True) - rewards) / (num_samples - 1)
  return rewards - others_mean


class CaptionReward:
  """A sampled caption's reward: CIDEr-D + bleu_weight * sentence BLEU-4 against its image's references.

  CIDEr-D has the end token on both sides with `reward_end` (`sentence_scores.CiderD`); BLEU-4 is that of the
  caption alone (`sentence_scores.SentenceBleu`, with its brevity penalty), computed only when bleu_weight > 0.

      reward = CaptionReward(references, reward_end=True, bleu_weight=0.5)
      values = reward(image_indices, captions, ended)   # float64 [len(captions)]
  """

  def __init__(self, references, *, reward_end: bool, bleu_weight: float):
    if bleu_weight < 0:
      raise errors.ConfigError(f"config.self_critical.bleu_weight is {bleu_weight}; it must be >= 0")
    self.bleu_weight = float(bleu_weight)
    tokenized = metrics.tokenize_captions(caption for refs in references for caption in refs)
    self.cider = sentence_scores.CiderD(references, end_token=REWARD_END_TOKEN if reward_end else None,
                                        tokenized=tokenized)
    self.bleu = (sentence_scores.SentenceBleu(references, tokenized=tokenized) if self.bleu_weight
                 else None)

  def __call__(self, image_indices, captions, ended) -> np.ndarray:
    texts = metrics.tokenize_captions(captions)
    rewards = self.cider.score_tokenized(image_indices, texts, ended)
    if self.bleu is not None:
      rewards = rewards + self.bleu_weight * self.bleu.score_tokenized(image_indices, texts)
    return rewards


def sample_step(params, image_index, feature_table, rng, *, decoder, num_samples: int,
                max_len: int, axis_name: str):
  """Samples captions for this device's images (run under `jax.pmap`).

  Args:
    params: the model's params ({"decoder": ...}).
    image_index: int32 [per_device], rows of `feature_table` [num_images, P, C].
    rng: the step's key, the same on every device. Each image samples with it folded with the
      image's position in the global batch, so the samples do not depend on the device count.
  Returns:
    tokens int32 [per_device, num_samples, max_len] (zeros after <eos>) and lengths int32
    [per_device, num_samples] (tokens up to and including <eos>).
  """
  per_device = image_index.shape[0]
  position = lax.axis_index(axis_name) * per_device + jnp.arange(per_device)
  image_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, position)
  features = feature_table[image_index].astype(jnp.float32)
  result = decoding.sample(decoder, params["decoder"], features, rng=image_keys,
                           num_samples=num_samples, max_len=max_len)
  return result.tokens, result.lengths


def policy_gradient_step(state, batch, feature_table, *, model, axis_name: str):
  """One optimizer step on the sampled captions of this device's images (run under `jax.pmap`).

  The loss is normalized by the token count of the whole global batch, so that the `pmean` of the
  gradients is the gradient of the single-device loss on the same batch.

  Args:
    batch: {"image_index": int32 [per_device], "tokens": int32 [per_device, K, T],
      "lengths": int32 [per_device, K], "advantage" and "reward": float32 [per_device, K]}.
    feature_table: cached encoder features [num_images, P, C].
  Returns:
    The new state, and metric sums over the global batch.
  """
  num_samples = batch["tokens"].shape[1]
  features = einops.repeat(feature_table[batch["image_index"]], "b p c -> (b k) p c", k=num_samples)
  target_tokens = einops.rearrange(batch["tokens"], "b k t -> (b k) t")
  input_tokens = jnp.pad(target_tokens[:, :-1], ((0, 0), (1, 0)), constant_values=vocab_lib.BOS)
  mask = (jnp.arange(target_tokens.shape[1])[None, :]
          < batch["lengths"].reshape(-1, 1)).astype(jnp.float32)  # [rows, T]
  advantage = batch["advantage"].reshape(-1)
  tokens_per_device = lax.psum(jnp.sum(mask), axis_name) / lax.psum(1, axis_name)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, features, input_tokens, deterministic=True,
                            method=model_lib.Captioner.decode_features)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_log_probs = jnp.take_along_axis(log_probs, target_tokens[..., None], axis=-1)[..., 0]
    caption_log_probs = jnp.sum(token_log_probs * mask, axis=1)  # [rows]
    loss = -jnp.sum(advantage * caption_log_probs) / tokens_per_device
    return loss, caption_log_probs

  (loss, caption_log_probs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=lax.pmean(grads, axis_name))
  sums = {"policy_loss": loss, "reward": jnp.sum(batch["reward"]),
          "negative_log_likelihood": -jnp.sum(caption_log_probs),
          "num_samples": jnp.asarray(advantage.shape[0], jnp.float32), "num_tokens": jnp.sum(mask)}
  sums = lax.psum(sums, axis_name)
  sums["policy_loss"] = sums["policy_loss"] / lax.psum(1, axis_name)
  return new_state, sums


def check_config(config) -> None:
  """Raises ConfigError for a self-critical config that cannot run (before any data is read)."""
  if config.encoder.trainable_stages:
    raise errors.ConfigError("self-critical training runs on cached features: leave "
                             "config.encoder.trainable_stages empty")
  if not config.init_checkpoint:
    raise errors.ConfigError("config.init_checkpoint is empty: self-critical training starts from a "
                             "cross-entropy run (a workdir, checkpoint or exported model)")
  if not pathlib.Path(config.init_checkpoint).exists():
    raise errors.ConfigError(f"{config.init_checkpoint}: config.init_checkpoint does not exist; "
                             "train the cross-entropy run first")
  advantages(np.zeros((1, max(int(config.self_critical.num_samples), 0))))  # num_samples >= 2


@functools.lru_cache(maxsize=4)
def _pmapped_steps(model, num_samples: int, max_len: int, axis_name: str):
  """The pmapped sampling and update steps, kept across runs of the same model in one process."""
  sample = jax.pmap(functools.partial(sample_step, decoder=model.decoder, num_samples=num_samples,
                                      max_len=max_len, axis_name=axis_name), axis_name=axis_name)
  update = jax.pmap(functools.partial(policy_gradient_step, model=model, axis_name=axis_name),
                    axis_name=axis_name, donate_argnums=(0,))
  return sample, update


class SelfCritical:
  """Self-critical training as a `train_lib` objective (see `train_lib.CrossEntropy`)."""

  def __init__(self, config, model, data, *, axis_name: str):
    check_config(config)
    self.config, self.data = config, data
    self.num_samples = int(config.self_critical.num_samples)
    self.reward = CaptionReward([record.captions for record in data.train_records],
                                reward_end=config.self_critical.reward_end,
                                bleu_weight=config.self_critical.bleu_weight)
    self._sample, self._update = _pmapped_steps(model, self.num_samples, config.eval.max_len,
                                                axis_name)

  def steps_per_epoch(self) -> int:
    """Full global batches of `config.batch_size` images in one pass over the training images."""
    return epoch_plan.steps_per_epoch(self.data.captions, "one", self.config.batch_size)

  def batches(self, *, epoch: int, num_devices: int, skip_batches: int):
    """Every training image once per epoch, shuffled: {"image_index": int32 [devices, per_device]}."""
    config = self.config
    plan = epoch_plan.plan_epoch(
        self.data.captions, captions_per_epoch="one", global_batch_size=config.batch_size,
        seed=config.seed, epoch=epoch, process_index=jax.process_index(),
        process_count=jax.process_count())
    _, per_device = epoch_plan.batch_split(config.batch_size, num_devices, jax.process_count())
    return ({"image_index": plan.record_index[step].reshape(num_devices, per_device)}
            for step in range(skip_batches, plan.steps))

  def step(self, replicated_state, batch, replicated_table):
    """Samples, scores the samples on the host, and updates towards the better ones."""
    state_rng, step = replicated_state.rng[0], replicated_state.step[0]
    rng = jax_utils.replicate(jax.random.fold_in(jax.random.fold_in(state_rng, 1), step))
    tokens, lengths = jax.device_get(self._sample(replicated_state.params, batch["image_index"],
                                                  replicated_table, rng))
    image_index = np.repeat(batch["image_index"].reshape(-1), self.num_samples)
    captions = [self.data.vocab.decode(row) for row in tokens.reshape(-1, tokens.shape[-1])]
    ended = (tokens == vocab_lib.EOS).any(axis=-1).reshape(-1)
    rewards = self.reward(image_index, captions, ended).reshape(lengths.shape).astype(np.float32)
    batch = dict(batch, tokens=tokens, lengths=lengths, reward=rewards,
                 advantage=advantages(rewards))
    return self._update(replicated_state, batch, replicated_table)

  def summarize(self, sums) -> dict[str, float]:
    """Means over the steps of `sums` (stacked per step) for logging."""
    samples = float(np.sum(sums["num_samples"]))
    tokens = float(np.sum(sums["num_tokens"]))
    return {"loss": float(np.mean(sums["policy_loss"])),
            "reward": float(np.sum(sums["reward"])) / samples,
            "sample_negative_log_likelihood": float(np.sum(sums["negative_log_likelihood"])) / tokens,
            "sample_length": tokens / samples}
