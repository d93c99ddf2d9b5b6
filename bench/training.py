"""Training throughput, images/s and tokens/s: flaxcap's train step against the torch reference, one run.

Parts (--parts):
  decoder  the decoder on cached features (flaxcap's default path: frozen encoder, features on device),
           at --sizes (lite0: 7x7x1280; tutorial: 14x14x2048), vocabulary 2,600, 21 steps
  full     the whole model from uint8 224 px images, EfficientNet-Lite0 fine-tuned end to end (every
           stage trains, BatchNorm in training mode), decoder at lite0 sizes

Frameworks (--frameworks), all on the same batch in this process:
  flaxcap    `flaxcap.train_lib.train_step` under `jax.pmap` on one device, as train.py runs it: dropout,
             `caption_loss_sums` (cross-entropy + doubly stochastic attention), global-norm clipping and
             Adam from `optimizer.create_optimizer`; bfloat16 = `config.half_precision`
  torch      bench/torch_reference.py: eager PyTorch, a Python loop over time with the shrinking batch,
             Adam + clipping; bfloat16 through `torch.autocast`
  jax_naive  (decoder part) the textbook cell under `nn.scan` (features re-projected every step,
             `nn.LSTMCell`, the vocabulary layer inside the loop) through the same flaxcap train step

Each row: one untimed step (jax: the compilation), on a GPU one more warm-up step (--warmup), then --steps
timed steps, each waited for; images/s = batch / median step; tokens/s counts the real (non-pad) target
tokens. FLOPs are the analytic count of bench/roofline.py (all 21 steps; the torch reference skips
finished captions, so it does up to ~30% less work at the same images/s); on a GPU the row also shows
achieved TFLOP/s against the matmul peak measured at the start of the run.

    python bench/training.py                          # CPU default: decoder, batch 32, float32 (~30 s)
    python bench/training.py --parts=decoder,full --batch_sizes=32,128 --dtypes=float32,bfloat16
    python bench/training.py --sizes=tutorial --batch_sizes=128,512           # GPU defaults: see --help

Prints a table and writes JSON (default bench/results/training.json).
"""

import dataclasses
import functools
import pathlib
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench import decoder_flags  # noqa: E402
from bench import roofline  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import model as model_lib  # noqa: E402
from flaxcap import train_lib  # noqa: E402

_PARTS = flags.DEFINE_list("parts", None, "decoder (cached features) and/or full (default: decoder on "
                           "the CPU, where full compiles for over a minute; both on a GPU).")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["flaxcap", "torch"], "flaxcap, torch, jax_naive.")
_SIZES = flags.DEFINE_enum("sizes", None, sorted(workloads.SIZES),
                           "Decoder part sizes (default: lite0 on the CPU, tutorial on a GPU).")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", None,
                                   "Decoder part batches (default: 32 on the CPU, 32,128,512 on a GPU).")
_FULL_BATCH_SIZES = flags.DEFINE_string("full_batch_sizes", None,
                                        "Full-model batches (default: 8 on the CPU, 32,128 on a GPU).")
_DTYPES = flags.DEFINE_list("dtypes", None, "float32 and/or bfloat16 (default: float32 on the CPU, "
                            "both on a GPU).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per row (default: 2 on the CPU, 20 on a GPU).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed steps before them, the first compiling (default: "
                               "1 on the CPU, 2 on a GPU).")
_DECODER_UNROLL = flags.DEFINE_integer("decoder_unroll", 1, "flaxcap: time steps per iteration of the "
                                       "decoder's teacher-forced scan (config.decoder.unroll).")
_RECOMPUTE_ATTENTION = flags.DEFINE_bool("recompute_attention", None, "flaxcap: recompute the "
                                         "attention's activation in the backward pass "
                                         "(config.decoder.recompute_attention; unset: the "
                                         "library's choice, off the CPU only).")
_FEATURE_DTYPE = flags.DEFINE_enum("feature_dtype", "", ["", "bfloat16", "float32"],
                                   "flaxcap: the dtype the decoder keeps the features in "
                                   "(config.decoder.feature_dtype; '': the compute dtype).")
_LATE_PROJECTED_GRAD = flags.DEFINE_bool("late_projected_grad", False, "flaxcap: the projected "
                                         "features' gradient in one pass after the backward scan "
                                         "(config.decoder.late_projected_grad).")
_LATE_WEIGHT_GRAD = flags.DEFINE_bool("late_weight_grad", False, "flaxcap: the gradients of the "
                                      "kernels inside a step in one GEMM each after the backward "
                                      "scan (config.decoder.late_weight_grad).")
_SCORE_VJP = flags.DEFINE_bool("score_vjp", False, "flaxcap: the recomputed attention scores' "
                               "backward pass written out (config.decoder.score_vjp).")
_OUTPUT = flags.DEFINE_string("output", "training", "JSON path, or a name under bench/results/.")


# -- the naive JAX baseline (the textbook cell, everything inside the loop) -----------------------------


class NaiveCell(nn.Module):
  """One step written the straightforward way: everything per step, flax's LSTMCell."""
  vocab_size: int
  dim: int
  dropout_rate: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, features, tokens, deterministic):
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    embedded = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype, name="embed")(tokens)
    c, h = carry
    projected = dense(self.dim, name="feature_att")(features)  # [batch, P, A], every step
    scores = dense(1, use_bias=False, name="score")(
        jnp.tanh(projected + dense(self.dim, name="hidden_att")(h)[:, None]))[..., 0]
    attention = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    context = jnp.sum(attention[..., None].astype(self.dtype) * features, axis=1)  # [batch, C]
    context = jax.nn.sigmoid(dense(1, name="gate")(h)) * context
    (c, h), _ = nn.LSTMCell(self.dim, dtype=self.dtype, name="lstm")(
        (c, h), jnp.concatenate([embedded, context.astype(self.dtype)], -1))
    dropout = nn.Dropout(self.dropout_rate)
    out = dense(self.dim, name="hidden_out")(dropout(h, deterministic=deterministic))
    out = out + dense(self.dim, use_bias=False, name="context_out")(context) + embedded
    logits = dense(self.vocab_size, name="logits")(dropout(jnp.tanh(out), deterministic=deterministic))
    return (c, h), (logits.astype(jnp.float32), attention)


class NaiveDecoder(nn.Module):
  """The naive cell over time with `nn.scan`; same call signature as `flaxcap.decoder.Decoder`."""
  vocab_size: int
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, input_tokens, *, deterministic):
    if features.ndim == 4:
      features = features.reshape(features.shape[0], -1, features.shape[-1])
    features = features.astype(self.dtype)
    mean = jnp.mean(features, axis=1)
    carry = (jnp.tanh(nn.Dense(self.dim, dtype=self.dtype, name="init_c")(mean)),
             jnp.tanh(nn.Dense(self.dim, dtype=self.dtype, name="init_h")(mean)))
    scan = nn.scan(NaiveCell, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   in_axes=(nn.broadcast, 1, nn.broadcast), out_axes=1)
    _, (logits, attention) = scan(self.vocab_size, self.dim, dtype=self.dtype, name="cell")(
        carry, features, input_tokens, deterministic)
    return logits, attention


# -- one row per (part, framework, dtype, batch) --------------------------------------------------------


def time_flaxcap_step(part, framework, sizes, dtype, batch, steps, decoder_options=None,
                      warmup=2):
  """Times train_lib.train_step (pmapped over one device); returns (Timing, first loss, last loss).

  `decoder_options`: config.decoder fields to set (e.g. {"unroll": 3}).
  """
  config = workloads.config_for(sizes, dtype=dtype, fine_tune_encoder=part == "full")
  config.decoder.update(decoder_options or {})
  model = model_lib.create_model(config, sizes.vocab)
  if framework == "jax_naive":
    model = model.clone(decoder=NaiveDecoder(sizes.vocab, sizes.dim,
                                               dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32))
  tokens = workloads.random_tokens(batch, sizes)
  input_tokens = jnp.asarray(tokens[:1, :-1])
  key = jax.random.key(0)
  device = common.jax_device()
  start = time.perf_counter()
  if part == "decoder":
    features = workloads.random_features(batch, sizes).reshape(batch, sizes.locations, sizes.channels)
    variables = jax.jit(functools.partial(model.init, deterministic=True,
                                          method=model_lib.Captioner.decode_features),
                        compiler_options=workloads.init_compiler_options())(
                            key, jnp.asarray(features[:1]), input_tokens)
    host_batch = {"image_index": np.arange(batch, dtype=np.int32), "tokens": tokens}
    table = workloads.replicate(jnp.asarray(features), device)
  else:
    images = workloads.random_images(batch, sizes.image_size)
    variables = jax.jit(functools.partial(model.init, train=False),
                        compiler_options=workloads.init_compiler_options())(
                            key, jnp.asarray(images[:1]), input_tokens)
    host_batch = {"images": images, "tokens": tokens}
    table = None
  jax.block_until_ready(variables)
  print(f"  initialised the parameters: {time.perf_counter() - start:.1f} s", flush=True)
  state = workloads.replicate(workloads.flaxcap_train_state(config, model, variables), device)
  device_batch = workloads.replicate(host_batch, device)
  p_step = jax.pmap(functools.partial(train_lib.train_step, model=model, alpha_c=1.0, label_smoothing=0.0),
                    axis_name=train_lib.AXIS, donate_argnums=(0,), devices=[device])
  holder = {"state": state, "losses": []}

  def run():
    holder["state"], sums = p_step(holder["state"], device_batch, table)
    sums = jax.device_get(sums)
    holder["losses"].append(float(sums["token_loss"][0] / sums["num_tokens"][0]
                                  + sums["attention_penalty"][0] / sums["num_images"][0]))

  timing = common.time_calls(run, repeats=steps, warmup=warmup)
  return timing, holder["losses"][0], holder["losses"][-1]


def default_warmup() -> int:
  """Untimed steps before the timed ones: 2 on a GPU; 1 on the CPU (the compilation's own step)."""
  return 2 if common.on_gpu() else 1


def time_torch_step(part, sizes, dtype, batch, steps, warmup=2):
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_reference  # pylint: disable=g-import-not-at-top
  device = common.torch_device()
  torch.manual_seed(0)
  tokens = torch.from_numpy(workloads.random_tokens(batch, sizes)).long().to(device)
  decoder = torch_reference.SoftAttentionDecoder(sizes.vocab, sizes.channels, embed_dim=sizes.dim,
                                                 hidden_dim=sizes.dim, attention_dim=sizes.dim)
  if part == "decoder":
    model = decoder
    inputs = torch.from_numpy(workloads.random_features(batch, sizes).reshape(
        batch, sizes.locations, sizes.channels))
  else:
    model = torch_reference.TorchCaptioner(torch_reference.efficientnet_lite("efficientnet_lite0"),
                                           decoder)
    inputs = torch.from_numpy(workloads.random_images(batch, sizes.image_size))
  model, inputs = model.to(device), inputs.to(device)
  trainer = torch_reference.Trainer(model, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
  losses = []

  def run():
    loss = trainer.step(inputs, tokens)
    common.torch_sync(device)
    losses.append(float(loss))

  timing = common.time_calls(run, repeats=steps, warmup=warmup)
  return timing, losses[0], losses[-1]


# The printed table (also rendered by bench/report.py).
COLUMNS = [common.Column("part", "part"), common.Column("framework", "framework"),
           common.Column("dtype", "dtype"), common.Column("batch", "batch"),
           common.Column("grid", "features"), common.Column("step_ms", "step ms", ".0f"),
           common.Column("images_per_s", "images/s", ",.1f"),
           common.Column("tokens_per_s", "tokens/s", ",.0f"),
           common.Column("vs_torch", "vs torch", ".2f"), common.Column("first_s", "1st step s", ".1f"),
           common.Column("tflops", "TFLOP/s", ".3f"), common.Column("pct_matmul_peak", "% peak", ".1f"),
           common.Column("gbps", "GB/s", ",.0f"), common.Column("pct_copy_peak", "% copy", ".1f"),
           common.Column("last_loss", "loss", ".2f")]


def main(argv):
  del argv
  gpu = common.on_gpu()
  decoder_sizes = workloads.SIZES[_SIZES.value or ("tutorial" if gpu else "lite0")]
  full_sizes = workloads.SIZES["lite0"]
  batch_sizes = common.int_list(_BATCH_SIZES.value or ("32,128,512" if gpu else "32"))
  full_batch_sizes = common.int_list(_FULL_BATCH_SIZES.value or ("32,128" if gpu else "8"))
  dtypes = _DTYPES.value or (["float32", "bfloat16"] if gpu else ["float32"])
  steps = _STEPS.value or (20 if gpu else 2)
  recompute = _RECOMPUTE_ATTENTION.value
  decoder_options = {"unroll": _DECODER_UNROLL.value,
                     "recompute_attention": "auto" if recompute is None else str(recompute).lower(),
                     "feature_dtype": _FEATURE_DTYPE.value,
                     "late_projected_grad": _LATE_PROJECTED_GRAD.value,
                     "late_weight_grad": _LATE_WEIGHT_GRAD.value, "score_vjp": _SCORE_VJP.value,
                     **decoder_flags.options()}
  warmup = _WARMUP.value or default_warmup()
  common.configure_torch()
  info = common.machine()
  print(common.machine_line(info), flush=True)
  peaks = roofline.measure_peaks() if gpu else None

  rows = []
  for part in _PARTS.value or (["decoder", "full"] if gpu else ["decoder"]):
    sizes = decoder_sizes if part == "decoder" else full_sizes
    for dtype in dtypes:
      for batch in batch_sizes if part == "decoder" else full_batch_sizes:
        for framework in _FRAMEWORKS.value:
          if framework == "jax_naive" and part != "decoder":
            continue
          print(f"{part} {framework} {dtype} batch {batch} ...", flush=True)
          if framework == "torch":
            try:
              timing, first_loss, last_loss = time_torch_step(part, sizes, dtype, batch, steps,
                                                              warmup)
            except ImportError as e:  # e.g. no efficientnet_lite_pytorch for the full part
              print(f"  torch skipped: {e}", flush=True)
              continue
          else:
            timing, first_loss, last_loss = time_flaxcap_step(part, framework, sizes, dtype, batch, steps,
                                                              decoder_options, warmup)
          tokens = workloads.real_target_tokens(workloads.random_tokens(batch, sizes))
          row = {"part": part, "framework": framework, "dtype": dtype, "batch": batch,
                 "grid": f"{sizes.grid}x{sizes.grid}x{sizes.channels}", "vocab": sizes.vocab,
                 "steps": sizes.steps, "step_ms": timing.median_s * 1e3,
                 "images_per_s": batch / timing.median_s, "tokens_per_s": tokens / timing.median_s,
                 "first_s": timing.first_s, "first_loss": first_loss, "last_loss": last_loss,
                 "timing": timing.as_dict()}
          if part == "decoder":
            flops = roofline.decoder_train_flops(sizes, batch)
            row["gflop_per_step"] = flops / 1e9
            row["tflops"] = flops / timing.median_s / 1e12
            moved = roofline.decoder_train_bytes(sizes, batch, dtype,
                                                 decoder_options["feature_dtype"] or None)["total"]
            row["gb_per_step"] = moved / 1e9
            row["gbps"] = moved / timing.median_s / 1e9
            if peaks:
              row["pct_matmul_peak"] = 100 * roofline.utilization(row["tflops"],
                                                                  peaks["matmul_tflops"][dtype])
              row["pct_copy_peak"] = 100 * roofline.utilization(row["gbps"], peaks["copy_gbps"])
          rows.append(row)
          print(f"  {row['step_ms']:.1f} ms a step, {row['images_per_s']:,.1f} images/s; first step "
                f"{row['first_s']:.1f} s", flush=True)
  for row in rows:
    torch_row = next((r for r in rows if r["framework"] == "torch" and
                      all(r[k] == row[k] for k in ("part", "dtype", "batch"))), None)
    row["vs_torch"] = row["images_per_s"] / torch_row["images_per_s"] if torch_row else None

  print()
  common.print_table(rows, COLUMNS, title=f"train step (fwd + bwd + Adam), {steps} timed steps, "
                     f"median; {common.machine_line(info)}")
  common.write_json(_OUTPUT.value, {
      "benchmark": "training", "machine": info, "peaks": peaks, "steps": steps, "warmup": warmup,
      "decoder_unroll": _DECODER_UNROLL.value, "decoder_options": decoder_options,
      "sizes": {"decoder": dataclasses.asdict(decoder_sizes), "full": dataclasses.asdict(full_sizes)},
      "notes": "images/s = batch / median step time; tokens/s = real target tokens / median step time; "
               "flops: analytic decoder count (bench/roofline.py), 3x forward; GB/s: the attention's "
               "bytes a step (roofline.decoder_train_bytes) / median step time; 'loss': cross-entropy + "
               "attention term after the last timed step, a sanity check (both start near ln V + 1)",
      "rows": rows})


if __name__ == "__main__":
  app.run(main)
