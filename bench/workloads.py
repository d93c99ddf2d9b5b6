"""Synthetic workloads shared by the bench scripts: problem sizes, random inputs, models with random weights.

Nothing here needs a data set or a trained model. Sizes are named:

  lite0     EfficientNet-Lite0 at 224 px (flaxcap's default encoder): a 7x7x1280 feature grid
  tutorial  the popular tutorial's sizes: ResNet-101 features on a 14x14x2048 grid

both with LSTM/attention/embedding 512, a vocabulary of 2,600 words (Flickr8k with min count 5 has
about that many) and captions of max_len 22 tokens with <bos> and <eos> (21 teacher-forced steps).

Random weights make a decoder whose captions never end (each step <eos> has a ~1/V chance), which would
flatter flaxcap: its searches run max_len steps (on a GPU; on the CPU they skip the steps after the
result is settled), while the per-image loop and the batched torch search stop when every hypothesis has
ended. `end_captions_near` edits a random decoder so that its
captions end after a set number of tokens, as a trained model's do; both frameworks get the same
weights.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flaxcap import model as model_lib  # noqa: E402
from flaxcap import vocab as vocab_lib  # noqa: E402

if TYPE_CHECKING:  # imported where used: it needs the optimizer's packages
  from flaxcap import train_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
  """A problem size: feature grid grid x grid x channels, model width, vocabulary, caption tokens."""
  grid: int
  channels: int
  dim: int = 512
  vocab: int = 2600
  max_len: int = 22  # tokens incl. <bos>/<eos>; teacher forcing runs max_len - 1 steps
  image_size: int = 224

  @property
  def locations(self) -> int:
    return self.grid * self.grid

  @property
  def steps(self) -> int:
    return self.max_len - 1


SIZES = {"lite0": Sizes(grid=7, channels=1280), "tutorial": Sizes(grid=14, channels=2048)}


def config_for(sizes: Sizes, *, dtype: str = "float32", dropout: float = 0.5,
               fine_tune_encoder: bool = False):
  """configs/default.py with the decoder at `sizes`; bfloat16 sets `half_precision` (both halves)."""
  # Imported here (and train_lib below), so that what needs neither config nor optimizer (sizes, random
  # inputs and weights) imports without ml_collections, as bench/probe_gpu9.py does on the GPU.
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.decoder.embed_dim = config.decoder.hidden_dim = config.decoder.attention_dim = sizes.dim
  config.decoder.dropout_rate = dropout
  config.data.max_len = sizes.max_len
  config.image_size = sizes.image_size
  config.half_precision = dtype == "bfloat16"
  config.encoder.weights = "none"  # speed does not depend on the weights
  config.optimizer.warmup_steps = 0  # the loss moves from the first step, as the torch reference's
  if fine_tune_encoder:
    from flaxcap import encoders  # pylint: disable=g-import-not-at-top
    config.encoder.trainable_stages = tuple(range(encoders.num_stages(config.encoder.name)))
  return config


def synthetic_vocab(size: int) -> vocab_lib.Vocabulary:
  """The four special tokens and words "w4", "w5", ... up to `size` entries."""
  return vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + [f"w{i}" for i in range(4, size)])


def random_features(batch: int, sizes: Sizes, seed: int = 0) -> np.ndarray:
  """float32 [batch, grid, grid, channels], non-negative like a ReLU CNN's output (about half zeros)."""
  rng = np.random.default_rng(seed)
  shape = (batch, sizes.grid, sizes.grid, sizes.channels)
  return np.maximum(rng.standard_normal(shape, dtype=np.float32), 0.0)


def random_tokens(batch: int, sizes: Sizes, seed: int = 0) -> np.ndarray:
  """int32 [batch, max_len]: <bos>, 8 .. max_len - 2 random words, <eos>, padding."""
  rng = np.random.default_rng(seed + 1)
  tokens = np.zeros((batch, sizes.max_len), np.int32)
  for row, words in enumerate(rng.integers(8, sizes.max_len - 1, size=batch)):
    tokens[row, :words + 2] = [vocab_lib.BOS, *rng.integers(4, sizes.vocab, size=words), vocab_lib.EOS]
  return tokens


def random_images(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
  """uint8 [batch, image_size, image_size, 3] noise."""
  rng = np.random.default_rng(seed + 2)
  return rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)


def real_target_tokens(tokens: np.ndarray) -> int:
  """The targets a train step predicts: non-pad tokens after the first position."""
  return int(np.sum(tokens[:, 1:] != vocab_lib.PAD))


def init_compiler_options() -> dict[str, Any]:
  """XLA options for jitting a model's `init`, which runs once: on the CPU without LLVM's optimisations.

  Its random initializers (threefry, the truncated normal's erfinv, one set per parameter) took XLA:CPU
  ~7 s to compile for the decoder, ~5 s this way; the values differ by at most ~1e-8 (rounding).
  Elsewhere XLA's defaults.
  """
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def init_decoder_params(decoder, sizes: Sizes, seed: int = 0) -> dict[str, Any]:
  """Random (flax default initializer) parameters of a flaxcap `Decoder`, as numpy."""
  features = jnp.zeros((1, sizes.locations, sizes.channels), jnp.float32)
  tokens = jnp.zeros((1, sizes.steps), jnp.int32)
  variables = jax.jit(lambda key: decoder.init(key, features, tokens, deterministic=True),
                      compiler_options=init_compiler_options())(jax.random.key(seed))
  return jax.tree.map(np.asarray, variables["params"])


def end_captions_near(params: dict[str, Any], *, length: int, eos_id: int = vocab_lib.EOS
                      ) -> dict[str, Any]:
  """Edits a random flaxcap `Decoder` (default options) so that its captions end at `length` tokens.

  One LSTM unit j becomes a step counter: its gates ignore every input (input, forget and output gates
  saturated open, cell input tanh(g) = r), so c_j = r (t + 1) and h_j = tanh(r (t + 1)) after step t,
  and it feeds nothing but one deep-output unit m, out_m = tanh(a (h_j - tau)), whose only outgoing
  weight is +10 into the <eos> logit. tau and a put the switch from out_m ~ -0.8 to +0.8 between steps
  length - 2 and length - 1, so <eos> (the length-th token) wins there for every hypothesis.

  Args:
    params: the decoder's params (gate, ctx2out, prev2out as in the defaults), numpy or jax.
    length: caption tokens including <eos> (so length - 1 words), at least 2.
    eos_id: the <eos> id.

  Returns:
    A numpy copy of `params` with the counter wired in.
  """
  p = jax.tree.map(lambda x: np.array(x, np.float32), params)
  hidden = p["hidden_proj"]["kernel"].shape[0]
  embed = p["hidden_out"]["kernel"].shape[1]
  j, m = hidden - 1, embed - 1
  rate = 0.5 / length  # h_j stays off the flat part of tanh
  gates = [g * hidden + j for g in range(4)]  # i, f, g, o of unit j
  p["input_gates"]["kernel"][:, gates] = 0.0
  p["input_gates"]["bias"][gates] = [10.0, 10.0, math.atanh(rate), 10.0]
  p["context_gates"]["kernel"][:, gates] = 0.0
  p["hidden_proj"]["kernel"][:, gates] = 0.0
  p["hidden_proj"]["kernel"][j, :] = 0.0  # h_j reaches neither the gates nor the attention
  p["init_state"]["kernel"][:, [j, hidden + j]] = 0.0
  p["init_state"]["bias"][[j, hidden + j]] = 0.0
  h_before, h_at = math.tanh(rate * (length - 1)), math.tanh(rate * length)
  tau, slope = (h_before + h_at) / 2, 2.2 / (h_at - h_before)  # a (h - tau) = +-1.1 at the two steps
  p["hidden_out"]["kernel"][j, :] = 0.0
  p["hidden_out"]["kernel"][:, m] = 0.0
  p["hidden_out"]["kernel"][j, m] = slope
  p["hidden_out"]["bias"][m] = -slope * tau
  p["context_out"]["kernel"][:, m] = 0.0
  p["embedding"]["embedding"][:, m] = 0.0
  p["logits_out"]["kernel"][m, :] = 0.0
  p["logits_out"]["kernel"][m, eos_id] = 10.0
  return p


def flaxcap_train_state(config, model, variables, *, seed: int = 1) -> train_lib.TrainState:
  """A `train_lib.TrainState` for `variables` (params, and batch_stats when the encoder trains), with
  flaxcap's optimizer (clipping, Adam per parameter group) — what `create_train_state` builds from
  data."""
  from flaxcap import optimizer, train_lib  # pylint: disable=g-import-not-at-top
  params = dict(variables["params"])
  tx = optimizer.create_optimizer(config, 1000, optimizer.param_labels(params, config))
  return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                     batch_stats=dict(variables.get("batch_stats", {})),
                                     rng=jax.random.key(seed))


def replicate(tree, device):
  """`replication.replicate` onto one device: the pmapped step compiles once (see there)."""
  from flaxcap import replication  # pylint: disable=g-import-not-at-top
  return replication.replicate(tree, [device])


def decoder_for(sizes: Sizes, dtype: str = "float32", dropout: float = 0.0, **decoder_fields):
  """A flaxcap `Decoder` at `sizes` through `model.create_decoder` (as inference builds it), with
  `decoder_fields` set in `config.decoder` (e.g. pad_columns_to=8)."""
  config = config_for(sizes, dtype=dtype, dropout=dropout)
  config.decoder.update(decoder_fields)
  return model_lib.create_decoder(config, sizes.vocab)
