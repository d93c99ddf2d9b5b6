"""Issue 8 GPU probe (rounds 4-5): main's train step and beam search against variants.

Not part of the bench suite: one script for one device call (up to --budget_s, 300 s,
compilation included; give the call timeout_s=360: the JSON is rewritten after every row, so a
cut-off run still returns what it measured). In one process, on the issue's workloads
(bench/workloads.py: random weights and inputs):

  train_bf16, train_fp32   `train_lib.train_step` under `jax.pmap`, as bench/training.py times it
      (dropout, cross-entropy + attention term, clipping + Adam), the decoder at the tutorial's sizes
      (14x14x2048, 512, vocab 2,600, 21 steps): batch 512 bfloat16 and batch 128 float32. Variants
      are `Decoder` options:
        main                     main's decoder (since session 22 on a GPU: the attention recomputed
                                 and the embedding's gradient a one-hot product)
        no_recompute             recompute_attention=False (main before session 22)
        scatter, recompute+scatter, recompute+pad8(+scatter)  one_hot_embedding_grad=False: nn.Embed's
                                 scatter-add gradient (main before session 22), and combinations
        recompute                recompute_attention: the attention score by multiply and sum under
                                 nn.remat; the forward scan keeps no [B, 196, 512] tensor (main keeps
                                 one a step since session 16, tanh's output: 103 MB a step at batch
                                 512 bf16, written and read back; two before)
        bf16_features(+recompute)  feature_dtype=bfloat16 (float32 runs): the grid kept in bf16, so
                                 each step's context product reads half of its 205 MB (at batch 128);
                                 rounds the features, so not exact
        pad8                     pad_columns_to=8: the kernels padded with zero columns to a multiple
                                 of 8 inside each product (hidden_proj's 2,561 -> 2,568), the same values
        late_grad(+pad8, +bf16_features)  late_projected_grad: the projected features' gradient
                                 summed in one pass after the backward scan instead of in a running
                                 sum each step reads and writes (206 MB a step at batch 512 bf16)
        score_vjp(+late_grad, +pad8, +bf16_features)  score_vjp: the recomputed scores' backward
                                 pass by `attention_grad.recomputed_scores` (session 25): the
                                 activation recomputed inside each of its two sums over P, where
                                 autodiff of the remat wrote it out in float32 and read it back
                                 (compiled for an H100 by bench/gpu_aot.py: the backward scan's
                                 kernels move 802 MB an iteration with late_grad, against
                                 1,519 for main's; not yet timed); +scorek_approx: the forward
                                 scores by the Pallas score kernel and the backward pass's two
                                 sums by `attention_grad_kernel.score_grads` (one recomputation, one
                                 pass: 699 MB), their tanh by `tanh.approx.f32`
        score_vjp+late_grads(+scorek_approx, +bf16_features)  late_weight_grad too (session 27):
                                 the kernels of hidden_proj and context_gates get their gradient in
                                 one GEMM each after the backward scan, where each backward step
                                 read and wrote their float32 running sums (compiled: 626 MB and 21
                                 kernels a backward iteration with the kernels at batch 512 bf16,
                                 against 699 and 25; 345 MB and 21 against 388 and 23 at 128 fp32)
        score_vjp+late_grads+scorek_approx(+pad64, +bf16_features)  session 28: +pad64, hidden_proj's
                                 kernel padded to 2,624 columns, the multiple of 64 to which XLA
                                 padded it (and dp_t) in every backward step for dh = dp_t W_h^T;
                                 with the kernel padded the backward step has one pad fewer
        jax_tanh                 the attention's tanh as jnp.tanh (main before session 16: its gradient
                                 rule kept y and 1 - y a step, `layers.tanh` keeps y): what the
                                 change gained against the 20.5k / 9.8k images/s of round 3
      A row: images/s (batch / median step), the compiled step's temporary memory, the first step's
      loss and the parameters after all steps against main's (same initial state, batch and dropout
      keys: only rounding differs).
  beam256, beam1   `decoding.search` under `jax.jit`, as bench/beam_search.py times it: lite0 sizes
      (7x7x1280, vocab 2,600), beam 5, max_len 20, bfloat16, weights edited to end captions near 12
      tokens. Variants are `top_k.CANDIDATE_TOP_K` and `decoding.search(unroll=..., early_stop=...)`:
        main             the library's choice (since session 22 on a GPU: the while-loop stop, and at
                         batch 256 the Pallas top-k on segments of 1,024; batch 1: chunks)
        flat             XLA's TopK over the 5 x 2,600 candidates (main's choice at batch 256 before)
        fused            main with `Decoder(fused_attention=True)`: each step's scores, softmax and
                         context in one Pallas kernel per image (`attention_kernel.attend`; session
                         22; round 5 on an H100: 3.39 ms against 3.00, 101.5 us a call; not in
                         the default lists since)
        stop_while+fused, stop_while+kseg+fused  the same with the stop / top-k named
        scorek           `Decoder(score_kernel=True)`: each step's scores alone in a Pallas kernel
                         (`attention_kernel.attention_scores`: 256 x 4 programs of 16 positions, all
                         beams from one read), softmax and context XLA's (session 24, not yet run)
        scorek_approx(+pad8), fused_approx  with `approx_tanh`: the kernel's tanh one
                         `tanh.approx.f32` instead of ~20 float32 operations (XLA's score fusion,
                         34.9 us a step in round 5, is bound by that arithmetic)
        noproj, scorek_approx+noproj  `decoding.search(project_context=False)`: each step reads the
                         features (32 MB at batch 256) for the context, then multiplies the context
                         by the LSTM's and L_z's weights, instead of reading the grid's projections
                         through them (64 MB, more than the H100's 50 MB L2; the 29.6 us GEMM fusion?)
        kseg_padded, scorek_approx+kseg_padded  the segments' kernel reading int32 keys that a
                         pass before it writes, padded to whole segments (main before session 25:
                         that pass took 6.6 us a step in round 5's profile); main's programs read
                         their segments of the float32 candidates in place
                         (`top_k.KERNEL_READS_VALUES`; the padded keys also take the XLA
                         selection below)
        xla_select, scorek_approx+xla_select  the step's new live and finished sets by XLA's
                         fusions (5, and 3 copies of the finished set: main before session 26)
                         instead of one Pallas program per image from the segments' winners
                         (`beam_select_kernel`, `top_k.SELECT_BY_KERNEL`)
        stop_while+kseg(1024, 4096)  the kernel on segments of 2,048 (1,024, 4,096) candidates
        rounds           10 rounds of argmax over the 13,000 candidates: 10 reductions, no TopK kernel
        chunks_barrier   chunk maxima, the chosen entries written out before the final ranking
                         (round 3, without the barrier: 13.1 ms at batch 256, one ranking 400 us a step)
        unroll20         the library's top-k, the whole search unrolled (no loop)
        stop_cond        the library's top-k, skipping the steps after no live hypothesis can win
                         (`decoding.search(early_stop="cond")`, the CPU's default: a `lax.cond` in
                         each of the scan's 20 iterations, its predicate read by the host; the
                         edited weights end every caption at 12 tokens, so 12 steps are taken)
        stop_while       the same stop as a `lax.while_loop` of the 12 steps taken (its condition
                         read by the host each iteration)
        stop_while4      the while loop checking every 4 steps: 3 reads by the host, not 13
        stop_while+chunks_barrier  both
        kernel           the candidates' top-k in one Pallas (Triton) kernel, one program per image
                         (`top_k.top_k_by_kernel`; session 16, first run on a GPU in session 21's lease)
        stop_while+kernel, stop_while4+kernel  the kernel with the while loop's stop
        kernel_w4, kernel_w16  the kernel's programs with 4 or 16 warps instead of 8 (4: 255
                         registers a thread, 2 programs an SM; 16: 89 registers, 1;
                         bench/triton_compile.py)
        kseg_w1, kseg_w2  main's segment programs (1,024 candidates each, 3,328 at batch 256) with
                         1 or 2 warps instead of 4: each program's 10 rounds of a maximum and a
                         minimum are latency, and with fewer warps no barrier joins them (round 5:
                         the kernel took 22.1 us a step to read 13 MB)
        pad8, pad128     `Decoder(pad_columns_to=...)`: the layers' kernels padded with zero columns
                         (hidden_proj's 2,561 -> 2,568 or 2,688: bf16 rows 16-byte aligned); since
                         session 27 hidden_proj's is padded once a search, not in every step
                         (`Encoded.hidden_kernel`: 17 kernels a step, as main). Round 5's profile:
                         the h projection's unaligned GEMM took 23.4 us a step, the logits' of the
                         same FLOPs 10.0 (cuBLAS)
        stop_while+kernel+pad8  all three
      A row: captions/s, and the share of images whose K hypotheses (tokens) are main's.
  profile   jax.profiler traces of the --profile_variants train steps (batch 512 bf16; main,
            score_vjp+late_grads+scorek_approx), summed per GPU kernel:
            $OUT/profile_train_<variant>.txt, and of the --fp32_profile_variants (batch 128 fp32;
            main, score_vjp+late_grads+scorek_approx): profile_train_float32_<variant>.txt;
            their compiled HLO: hlo_train(_float32)_<variant>.txt.
            The beam256 part ends with traces of
            --beam_profile_variants (main, scorek_approx+pad8): $OUT/profile_beam256_<variant>.txt,
            per search, which time the Pallas kernels themselves, and their compiled HLO,
            $OUT/hlo_beam256_<variant>.txt, where the profile's fusion names are defined.
  grads     for each train variant timed: loss and gradients at --grad_batch against main's.

The parts run in the order of --parts (beam256, beam1, train_bf16, train_fp32, profile, grads: the
most wanted first), after 2 s of matmuls to raise the GPU's clocks; each part times main first and
again after its variants (row main_again: the noise between the two). An item that would end after
--budget_s (300 s) is skipped, and listed.

    python3 bench/probe_gpu9.py                               # the GPU run, every part
    JAX_PLATFORMS=cpu python bench/probe_gpu9.py --quick      # tiny shapes: every code path on a CPU

XLA flags apply to a whole process, so a variant under other flags is a second run, e.g. the early
stop with while loops and conditionals as CUDA graph nodes, which could spare the host's read of
the stop's predicate every iteration (round 3 found graphs of the whole loop 2-16% slower, without a
stop):

    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,CONDITIONAL,WHILE \
      python3 bench/probe_gpu9.py --tag=graphs --parts=beam256,beam1 --budget_s=90 \
      --beam256_variants=main,stop_while+kernel,stop_cond \
      --beam1_variants=main,stop_while+kernel,stop_cond --beam_profile_variants=

Prints each row as it comes and a table at the end; rewrites $OUT/probe_gpu9.json after every row (OUT:
environment variable, default /tmp). Needs jax, flax, optax, numpy (and train_lib's absl, tqdm); not
tensorflow, not ml_collections (an empty stand-in satisfies `flaxcap.checkpoints`' import when it is
missing; no checkpoint is read or written).
"""

import argparse
import contextlib
import functools
import json
import os
import pathlib
import sys
import time
import traceback
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
try:
  import ml_collections  # noqa: F401  pylint: disable=unused-import
except ImportError:  # imported at the top of flaxcap/checkpoints.py (via train_lib); unused here
  sys.modules["ml_collections"] = types.ModuleType("ml_collections")

from flax import jax_utils  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench import hlo_kernels  # noqa: E402
from bench import workloads  # noqa: E402
from flaxcap import decoder as decoder_lib  # noqa: E402
from flaxcap import layers  # noqa: E402
from flaxcap import decoding  # noqa: E402
from flaxcap import model as model_lib  # noqa: E402
from flaxcap import step_loop  # noqa: E402
from flaxcap import top_k as top_k_lib  # noqa: E402

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

# Decoder options of each training variant.
TRAIN_VARIANTS = {
    "main": {},
    "recompute": {"recompute_attention": True},
    "bf16_features": {"feature_dtype": jnp.bfloat16},
    "bf16_features+recompute": {"feature_dtype": jnp.bfloat16, "recompute_attention": True},
    "pad8": {"pad_columns_to": 8},
    "jax_tanh": {},
    "recompute+pad8": {"recompute_attention": True, "pad_columns_to": 8},
    "no_recompute": {"recompute_attention": False},  # main before session 22
    # The embedding's gradient as nn.Embed's scatter-add (main before session 22: main's is a one-hot
    # product off the CPU, `layers.Embed`).
    "scatter": {"one_hot_embedding_grad": False},
    "recompute+scatter": {"recompute_attention": True, "one_hot_embedding_grad": False},
    "recompute+pad8+scatter": {"recompute_attention": True, "pad_columns_to": 8,
                               "one_hot_embedding_grad": False},
    # The projected features' gradient after the backward scan (`attention_grad`; session 23).
    "late_grad": {"late_projected_grad": True},
    "late_grad+pad8": {"late_projected_grad": True, "pad_columns_to": 8},
    "late_grad+bf16_features": {"late_projected_grad": True, "feature_dtype": jnp.bfloat16},
    # The recomputed scores' backward pass written out (`attention_grad.recomputed_scores`; session 25).
    "score_vjp": {"recompute_attention": True, "score_vjp": True},
    "score_vjp+late_grad": {"recompute_attention": True, "score_vjp": True,
                            "late_projected_grad": True},
    "score_vjp+late_grad+pad8": {"recompute_attention": True, "score_vjp": True,
                                 "late_projected_grad": True, "pad_columns_to": 8},
    "score_vjp+late_grad+bf16_features": {"recompute_attention": True, "score_vjp": True,
                                          "late_projected_grad": True,
                                          "feature_dtype": jnp.bfloat16},
    # ... and the forward scores by the Pallas score kernel with the GPU's tanh instruction.
    "score_vjp+late_grad+scorek_approx": {"recompute_attention": True, "score_vjp": True,
                                          "late_projected_grad": True, "score_kernel": True,
                                          "approx_tanh": True},
    # ... and the weights inside a step, late too (`late_grads`; session 27).
    "score_vjp+late_grads": {"recompute_attention": True, "score_vjp": True,
                             "late_projected_grad": True, "late_weight_grad": True},
    "score_vjp+late_grads+scorek_approx": {"recompute_attention": True, "score_vjp": True,
                                           "late_projected_grad": True, "late_weight_grad": True,
                                           "score_kernel": True, "approx_tanh": True},
    "score_vjp+late_grads+scorek_approx+pad64": {"recompute_attention": True, "score_vjp": True,
                                                 "late_projected_grad": True,
                                                 "late_weight_grad": True, "score_kernel": True,
                                                 "approx_tanh": True, "pad_columns_to": 64},
    "score_vjp+late_grads+scorek_approx+bf16_features": {
        "recompute_attention": True, "score_vjp": True, "late_projected_grad": True,
        "late_weight_grad": True, "score_kernel": True, "approx_tanh": True,
        "feature_dtype": jnp.bfloat16},
    "score_vjp+late_grads+bf16_features": {"recompute_attention": True, "score_vjp": True,
                                           "late_projected_grad": True, "late_weight_grad": True,
                                           "feature_dtype": jnp.bfloat16},
}
# The attention's tanh of the train variants that change it (read while tracing): jax_tanh is main's
# decoder before session 16, whose tanh kept y and 1 - y for the backward pass (`layers.tanh`: y).
TRAIN_TANH = {"jax_tanh": jnp.tanh}


@contextlib.contextmanager
def attention_tanh(variant: str):
  """Traces inside use the variant's tanh for the attention (`TRAIN_TANH`; else flaxcap's)."""
  activations = layers.ATTENTION_ACTIVATIONS
  original = activations["tanh"]
  activations["tanh"] = TRAIN_TANH.get(variant, original)
  try:
    yield
  finally:
    activations["tanh"] = original
# (top_k.CANDIDATE_TOP_K, unroll, early_stop) of each beam search variant; None: the library's choice.
BEAM_VARIANTS = {"main": (None, 1, None), "flat": ("flat", 1, None), "rounds": ("rounds", 1, None),
                 "chunks": ("chunks", 1, None), "chunks_barrier": ("chunks_barrier", 1, None),
                 "unroll20": (None, 20, None), "stop_cond": (None, 1, "cond"),
                 "stop_while": (None, 1, "while"), "stop_while4": (None, 4, "while"),
                 "stop_while+chunks_barrier": ("chunks_barrier", 1, "while"),
                 "kernel": ("kernel", 1, None), "stop_while+kernel": ("kernel", 1, "while"),
                 "stop_while4+kernel": ("kernel", 4, "while"), "pad8": (None, 1, None),
                 "pad128": (None, 1, None), "stop_while+kernel+pad8": ("kernel", 1, "while"),
                 "kernel_w4": ("kernel", 1, None), "kernel_w16": ("kernel", 1, None),
                 "stop_while+kernel_w4": ("kernel", 1, "while"),
                 "stop_while+kseg": ("kernel_segments", 1, "while"),
                 "stop_while+kseg1024": ("kernel_segments", 1, "while"),
                 "stop_while+kseg4096": ("kernel_segments", 1, "while"),
                 "fused": (None, 1, None), "stop_while+kseg+fused": ("kernel_segments", 1, "while"),
                 "stop_while+fused": (None, 1, "while"), "fused+pad8": (None, 1, None),
                 "scorek": (None, 1, None), "scorek_approx": (None, 1, None),
                 "scorek_approx+pad8": (None, 1, None), "fused_approx": (None, 1, None),
                 "noproj": (None, 1, None), "scorek_approx+noproj": (None, 1, None),
                 "kseg_padded": (None, 1, None), "scorek_approx+kseg_padded": (None, 1, None),
                 "xla_select": (None, 1, None), "scorek_approx+xla_select": (None, 1, None),
                 "kseg_w1": (None, 1, None), "kseg_w2": (None, 1, None)}
# `top_k.KERNEL_NUM_WARPS` of the kernel variants that set it (8 otherwise, at these sizes).
BEAM_KERNEL_WARPS = {"kernel_w4": 4, "kernel_w16": 16, "stop_while+kernel_w4": 4, "kseg_w1": 1,
                     "kseg_w2": 2}
# `top_k.KERNEL_SEGMENT` of the "kernel_segments" variants that set it (2,048 otherwise).
BEAM_KERNEL_SEGMENT = {"stop_while+kseg1024": 1024, "stop_while+kseg4096": 4096}
# `Decoder` options of the beam search variants that have any.
BEAM_DECODER_OPTIONS = {"pad8": {"pad_columns_to": 8}, "pad128": {"pad_columns_to": 128},
                        "stop_while+kernel+pad8": {"pad_columns_to": 8},
                        "fused": {"fused_attention": True},
                        "stop_while+kseg+fused": {"fused_attention": True},
                        "stop_while+fused": {"fused_attention": True},
                        "fused+pad8": {"fused_attention": True, "pad_columns_to": 8},
                        "scorek": {"score_kernel": True},
                        "scorek_approx": {"score_kernel": True, "approx_tanh": True},
                        "scorek_approx+pad8": {"score_kernel": True, "approx_tanh": True,
                                               "pad_columns_to": 8},
                        "fused_approx": {"fused_attention": True, "approx_tanh": True},
                        "scorek_approx+noproj": {"score_kernel": True, "approx_tanh": True},
                        "scorek_approx+kseg_padded": {"score_kernel": True, "approx_tanh": True},
                        "scorek_approx+xla_select": {"score_kernel": True, "approx_tanh": True}}

# `decoding.search` options of the beam search variants that have any.
BEAM_SEARCH_OPTIONS = {"noproj": {"project_context": False},
                       "scorek_approx+noproj": {"project_context": False}}

# The beam variants whose segments' kernel reads keys padded by a pass before it
# (`top_k.KERNEL_READS_VALUES` off: main before session 25).
BEAM_KEYS_PADDED = {"kseg_padded", "scorek_approx+kseg_padded"}
# The beam variants whose steps take the new live and finished sets by XLA's fusions
# (`top_k.SELECT_BY_KERNEL` off: main before session 26) instead of `beam_select_kernel`'s kernel.
BEAM_XLA_SELECT = {"xla_select", "scorek_approx+xla_select"}


@contextlib.contextmanager
def top_k_settings(variant: str):
  """`flaxcap.top_k`'s module settings for a beam variant (read while tracing its search)."""
  saved = (top_k_lib.CANDIDATE_TOP_K, top_k_lib.KERNEL_NUM_WARPS, top_k_lib.KERNEL_SEGMENT,
           top_k_lib.KERNEL_READS_VALUES, top_k_lib.SELECT_BY_KERNEL)
  top_k_lib.CANDIDATE_TOP_K = BEAM_VARIANTS[variant][0]
  top_k_lib.KERNEL_NUM_WARPS = BEAM_KERNEL_WARPS.get(variant)
  top_k_lib.KERNEL_SEGMENT = BEAM_KERNEL_SEGMENT.get(variant, saved[2])
  top_k_lib.KERNEL_READS_VALUES = variant not in BEAM_KEYS_PADDED
  top_k_lib.SELECT_BY_KERNEL = variant not in BEAM_XLA_SELECT
  try:
    yield
  finally:
    (top_k_lib.CANDIDATE_TOP_K, top_k_lib.KERNEL_NUM_WARPS, top_k_lib.KERNEL_SEGMENT,
     top_k_lib.KERNEL_READS_VALUES, top_k_lib.SELECT_BY_KERNEL) = saved


# Seconds a part's item takes on an H200 (compilation + timing), for the budget; rough.
ESTIMATED_S = {"train": 16, "grads": 8, "beam": 6, "beam_unrolled": 12, "profile": 12}

COLUMNS = [common.Column("part", "part"), common.Column("variant", "variant"),
           common.Column("batch", "batch"), common.Column("dtype", "dtype"),
           common.Column("ms", "ms", ".3f"), common.Column("rate", "per s", ",.0f"),
           common.Column("vs_main", "vs main", ".3f"), common.Column("first_s", "1st s", ".1f"),
           common.Column("temp_mib", "temp MiB", ",.0f"), common.Column("check", "vs main")]


class Record:
  """The probe's rows, time budget and files: $OUT/probe_gpu9[_<tag>].json, and `path`'s profiles and
  HLO texts."""

  def __init__(self, out_dir: pathlib.Path, budget_s: float, args):
    self.out_dir, self.budget_s, self.start = out_dir, budget_s, time.perf_counter()
    self.suffix = f"_{args.tag}" if args.tag else ""
    self.json_path = out_dir / f"probe_gpu9{self.suffix}.json"
    self.payload = {"probe": "bench/probe_gpu9.py", "args": vars(args),
                    "machine": common.machine(torch_too=False),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": [], "errors": [],
                    "skipped": [], "profiles": {}}

  def path(self, kind: str, label: str) -> pathlib.Path:
    """$OUT/<kind>_<label>[_<tag>].txt ("+" in a variant's name as "_")."""
    return self.out_dir / f"{kind}_{label.replace('+', '_')}{self.suffix}.txt"

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def fits(self, what: str, estimate_s: float) -> bool:
    """Whether `what` (about `estimate_s`) fits in what is left of the budget; logs a skip if not."""
    if self.budget_s - self.elapsed() >= estimate_s:
      return True
    log(f"[{self.elapsed():.0f}s] skipped (budget): {what}")
    self.payload["skipped"].append(what)
    return False

  def add(self, row: dict) -> dict:
    """Keeps the row, logs it, and rewrites the JSON file (a run cut short keeps every row)."""
    self.payload["rows"].append(row)
    cells = [f"[{self.elapsed():.0f}s] {row['part']:16s} {row['variant']:24s} b{row['batch']:<4d}"]
    for key, fmt in (("ms", "{:.3f} ms"), ("rate", "{:,.0f}/s"), ("vs_main", "vs main {:.3f}"),
                     ("first_s", "first {:.1f} s"), ("check", "{}")):
      if row.get(key) is not None:
        cells.append(fmt.format(row[key]))
    log("  ".join(cells))
    self.save()
    return row

  def error(self, what: str, exc: BaseException):
    log(f"[{self.elapsed():.0f}s] FAILED {what}: {exc!r}"[:2000])
    traceback.print_exc()
    self.payload["errors"].append({"what": what, "error": repr(exc)[:2000]})
    self.save()

  def save(self):
    self.payload["elapsed_s"] = self.elapsed()
    self.json_path.write_text(json.dumps(self.payload, indent=1, default=str))


def log(*args):
  print(*args, flush=True)


def make_decoder(sizes, dtype: str, *, dropout: float, **options) -> decoder_lib.Decoder:
  """The decoder `model.create_decoder` builds from `workloads.config_for(sizes, dtype=dtype)`,
  with `Decoder` options on top."""
  return decoder_lib.Decoder(vocab_size=sizes.vocab, embed_dim=sizes.dim, hidden_dim=sizes.dim,
                             attention_dim=sizes.dim, dropout_rate=dropout, dtype=DTYPES[dtype],
                             **options)


def optimizer_config():
  """The fields of `workloads.config_for`'s config that `optimizer.create_optimizer` reads."""
  ns = types.SimpleNamespace
  return ns(num_epochs=20, encoder=ns(learning_rate=1e-4),
            optimizer=ns(name="adam", learning_rate=4e-4, weight_decay=0.0, grad_clip_norm=5.0,
                         schedule="cosine", warmup_steps=0))


def max_abs_diff(tree, reference) -> tuple[float, str]:
  """Largest |a - b| over two pytrees of the same structure, and the path where it is."""
  worst = (0.0, "")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference)):
    diff = float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
    worst = max(worst, (diff, jax.tree_util.keystr(path)))
  return worst


def max_relative_diff(tree, reference) -> tuple[float, str]:
  """Largest max|a - b| / max|b| over the leaves (gradients of very different scales)."""
  worst = (0.0, "")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
    worst = max(worst, (diff, jax.tree_util.keystr(path)))
  return worst


# -- training -----------------------------------------------------------------------------------------


class TrainCase:
  """One training workload (sizes, dtype, batch): inputs, main's initial parameters, and per variant
  its compiled pmapped step."""

  def __init__(self, sizes, dtype: str, batch: int):
    from flaxcap import train_lib  # pylint: disable=g-import-not-at-top  (ml_collections stand-in)
    self.train_lib, self.sizes, self.dtype, self.batch = train_lib, sizes, dtype, batch
    self.device = common.jax_device()
    self.features = workloads.random_features(batch, sizes).reshape(batch, sizes.locations,
                                                                     sizes.channels)
    self.tokens = workloads.random_tokens(batch, sizes)
    model = self.model("main")
    variables = jax.jit(functools.partial(model.init, deterministic=True,
                                          method=model_lib.Captioner.decode_features))(
        jax.random.key(0), jnp.asarray(self.features[:1]), jnp.asarray(self.tokens[:1, :-1]))
    self.host_params = jax.device_get(variables["params"])
    self.device_batch = jax_utils.replicate(
        {"image_index": np.arange(batch, dtype=np.int32), "tokens": self.tokens}, devices=[self.device])
    self.table = jax_utils.replicate(jnp.asarray(self.features), devices=[self.device])
    self.compiled = {}  # variant -> compiled step
    self.initial_states = {}  # variant -> its unreplicated initial TrainState (never donated)

  def model(self, variant: str) -> model_lib.Captioner:
    decoder = make_decoder(self.sizes, self.dtype, dropout=0.5, **TRAIN_VARIANTS[variant])
    return model_lib.Captioner(encoder=None, decoder=decoder)  # decode_features only

  def fresh_state(self, variant: str):
    """main's initial parameters, a fresh Adam state and rng (the same values for every variant),
    replicated anew from one TrainState per variant (a compiled step takes the pytree it was
    compiled for: the same optimizer object)."""
    if variant not in self.initial_states:
      self.initial_states[variant] = workloads.flaxcap_train_state(
          optimizer_config(), self.model(variant), {"params": self.host_params})
    return jax_utils.replicate(self.initial_states[variant], devices=[self.device])

  def compile(self, variant: str):
    """The variant's `train_lib.train_step`, pmapped over one device as bench/training.py runs it,
    compiled; returns (compiled step, seconds, memory analysis or None)."""
    p_step = jax.pmap(functools.partial(self.train_lib.train_step, model=self.model(variant),
                                        alpha_c=1.0, label_smoothing=0.0),
                      axis_name=self.train_lib.AXIS, donate_argnums=(0,), devices=[self.device])
    start = time.perf_counter()
    try:
      with attention_tanh(variant):
        compiled = p_step.lower(self.fresh_state(variant), self.device_batch, self.table).compile()
    except Exception as e:  # pylint: disable=broad-except  (then it compiles at its first call)
      log(f"  lower/compile failed ({e!r:.200}); the first step compiles")
      compiled = p_step
    seconds = time.perf_counter() - start
    try:
      memory = compiled.memory_analysis()
      memory = memory[0] if isinstance(memory, (list, tuple)) else memory
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
      memory = None
    self.compiled[variant] = compiled
    return compiled, seconds, memory

  def run_steps(self, variant: str, steps: int):
    """2 untimed steps and `steps` timed ones from the fresh state, each waited for (its metric sums
    fetched, as bench/training.py does); returns (Timing, per-step losses, final params on the host)."""
    step = self.compiled[variant]
    holder = {"state": self.fresh_state(variant), "losses": []}

    def run():
      holder["state"], sums = step(holder["state"], self.device_batch, self.table)
      sums = jax.device_get(sums)
      holder["losses"].append(float(sums["token_loss"][0] / sums["num_tokens"][0]
                                    + sums["attention_penalty"][0] / sums["num_images"][0]))

    timing = common.time_calls(run, repeats=steps, warmup=2)
    params = jax.device_get(jax.tree.map(lambda x: x[0], holder["state"].params))
    return timing, holder["losses"], params


def train_row(name: str, variant: str, case: TrainCase, timing, losses, **extra) -> dict:
  return {"part": name, "variant": variant, "batch": case.batch, "dtype": case.dtype,
          "ms": timing.median_s * 1e3, "rate": case.batch / timing.median_s,
          "min_ms": timing.min_s * 1e3, "timing": timing.as_dict(), "losses": losses, **extra}


def train_part(record: Record, name: str, case_args, variants, steps: int):
  """Times each variant's train step (main first, and main again at the end: the drift between
  the two is the noise floor); returns the TrainCase (for grads and profile) or None."""
  if not record.fits(f"{name} set-up", ESTIMATED_S["train"]):
    return None
  try:
    case = TrainCase(*case_args)
  except Exception as e:  # pylint: disable=broad-except
    record.error(f"{name} set-up", e)
    return None
  main = None
  for variant in variants:
    if not record.fits(f"{name} {variant}", ESTIMATED_S["train"]):
      continue
    try:
      _, compile_s, memory = case.compile(variant)
      timing, losses, params = case.run_steps(variant, steps)
      row = train_row(name, variant, case, timing, losses, compile_s=compile_s,
                      first_s=compile_s + timing.first_s,
                      temp_mib=memory.temp_size_in_bytes / 2**20 if memory else None,
                      options={k: str(v) for k, v in TRAIN_VARIANTS[variant].items()})
      if variant == "main":
        main = {"row": row, "params": params}
      elif main:
        loss_diff = abs(losses[0] - main["row"]["losses"][0])
        param_diff, where = max_abs_diff(params, main["params"])
        row.update(vs_main=row["rate"] / main["row"]["rate"], first_loss_diff=loss_diff,
                   final_param_diff=param_diff, final_param_diff_at=where,
                   check=f"loss1 {loss_diff:.1e}, params after {len(losses)} steps {param_diff:.1e}")
      record.add(row)
    except Exception as e:  # pylint: disable=broad-except
      record.error(f"{name} {variant}", e)
  if main and len(case.compiled) > 1:
    try:
      timing, losses, _ = case.run_steps("main", steps)
      record.add(train_row(name, "main_again", case, timing, losses,
                           vs_main=case.batch / timing.median_s / main["row"]["rate"],
                           check="main timed again after the variants (noise)"))
    except Exception as e:  # pylint: disable=broad-except
      record.error(f"{name} main_again", e)
  record.save()
  return case


def train_loss(model, params, features, tokens, rng):
  """train_step's loss on one device (alpha_c 1, no label smoothing), dropout keyed by `rng`."""
  input_tokens, target_tokens = model_lib.teacher_forcing_tokens(tokens)
  logits, attention = model.apply({"params": params}, features, input_tokens, deterministic=False,
                                  rngs={"dropout": rng}, method=model_lib.Captioner.decode_features)
  sums = model_lib.caption_loss_sums(logits, target_tokens, attention)
  return sums["token_loss"] / sums["num_tokens"] + sums["attention_penalty"] / sums["num_images"]


def grads_part(record: Record, name: str, case: TrainCase, grad_batch: int):
  """Loss and gradients of every variant timed in `case` against main's, at `grad_batch`."""
  features = jnp.asarray(case.features[:grad_batch])
  tokens = jnp.asarray(case.tokens[:grad_batch])
  params = jax.device_put(case.host_params)
  main = None
  for variant in case.compiled:
    if not record.fits(f"grads {name} {variant}", ESTIMATED_S["grads"]):
      continue
    try:
      grad_fn = jax.jit(jax.value_and_grad(functools.partial(train_loss, case.model(variant))))
      start = time.perf_counter()
      with attention_tanh(variant):  # the first call traces
        loss, grads = jax.device_get(grad_fn(params, features, tokens, jax.random.key(7)))
      row = {"part": f"grads_{name}", "variant": variant, "batch": grad_batch, "dtype": case.dtype,
             "first_s": time.perf_counter() - start, "loss": float(loss)}
      if variant == "main":
        main = (float(loss), grads)
      elif main:
        grad_diff, where = max_relative_diff(grads, main[1])
        row.update(loss_diff=abs(float(loss) - main[0]), grad_relative_diff=grad_diff,
                   grad_relative_diff_at=where, grad_abs_diff=max_abs_diff(grads, main[1])[0],
                   check=f"loss {abs(float(loss) - main[0]):.1e}, grads (rel. to max) {grad_diff:.1e} "
                         f"at {where}")
      record.add(row)
    except Exception as e:  # pylint: disable=broad-except
      record.error(f"grads {name} {variant}", e)
  record.save()


# -- beam search --------------------------------------------------------------------------------------


def time_search(search, params, features, repeats: int):
  """(result on the host, first call s, Timing of `repeats` calls after one warm-up call)."""
  start = time.perf_counter()
  result = jax.device_get(search(params, features))
  first_s = time.perf_counter() - start
  timing = common.time_calls(lambda: search(params, features).tokens.block_until_ready(),
                             repeats=repeats, warmup=1,
                             warmup_s=common.GPU_WARMUP_S if common.on_gpu() else 0.0)
  return result, first_s, timing


def agreement(result, reference) -> dict:
  """How far a search's result is from the reference's: the share of images whose K hypotheses
  (and whose best one) have the same tokens, and the largest score difference."""
  same = np.all(result.tokens == reference.tokens, axis=(1, 2))
  same_best = np.all(result.tokens[:, 0] == reference.tokens[:, 0], axis=1)
  finite = np.isfinite(reference.scores)
  score_diff = float(np.max(np.abs(np.where(finite, result.scores - reference.scores, 0.0))))
  return {"same_tokens": float(np.mean(same)), "same_best": float(np.mean(same_best)),
          "score_diff": score_diff,
          "check": f"same tokens {np.mean(same):.0%} (best {np.mean(same_best):.0%}), "
                   f"scores {score_diff:.1e}"}


def beam_part(record: Record, name: str, sizes, batch: int, variants, *, repeats: int,
              max_len: int, caption_length: int, beam: int = 5, profile_variants=()):
  """Times `decoding.search` for each variant (main first, and main again at the end); token
  agreement with main's result; then kernel profiles of the timed `profile_variants`
  ($OUT/profile_<name>_<variant>.txt, per search)."""
  if not record.fits(f"{name} set-up", ESTIMATED_S["beam"]):
    return
  try:
    decoder = make_decoder(sizes, "bfloat16", dropout=0.0)
    params = jax.device_put(workloads.end_captions_near(workloads.init_decoder_params(decoder, sizes),
                                                        length=caption_length))
    # As the Captioner does at load (and bench/beam_search.py): the word gate table, once.
    table = jax.jit(lambda p: decoder.apply({"params": p}, method="word_gate_table"))(params)
    features = jax.device_put(workloads.random_features(batch, sizes))
  except Exception as e:  # pylint: disable=broad-except
    record.error(f"{name} set-up", e)
    return
  main = None  # (row, result, search)
  searches = {}  # variant -> its compiled search (for the profiles)
  for variant in variants:
    _, unroll, early_stop = BEAM_VARIANTS[variant]
    if not record.fits(f"{name} {variant}",
                       ESTIMATED_S["beam_unrolled" if unroll > 1 else "beam"]):
      continue
    options = BEAM_DECODER_OPTIONS.get(variant, {})
    search = jax.jit(lambda p, f, unroll=unroll, early_stop=early_stop, options=options,
                     search_options=BEAM_SEARCH_OPTIONS.get(variant, {}):
                     decoding.search(make_decoder(sizes, "bfloat16", dropout=0.0, **options), p, f,
                                     beam_size=beam, max_len=max_len, unroll=unroll,
                                     word_gate_table=table, early_stop=early_stop,
                                     **search_options))
    with top_k_settings(variant):  # read while tracing (the first call), as is:
      try:
        result, first_s, timing = time_search(search, params, features, repeats)
        row = {"part": name, "variant": variant, "batch": batch, "dtype": "bfloat16", "beam": beam,
               "ms": timing.median_s * 1e3, "rate": batch / timing.median_s,
               "min_ms": timing.min_s * 1e3, "first_s": first_s, "timing": timing.as_dict(),
               "candidate_top_k": top_k_lib.candidate_top_k_method(batch), "unroll": unroll,
               "kernel_num_warps": top_k_lib.KERNEL_NUM_WARPS, "decoder_options": options,
               "search_options": BEAM_SEARCH_OPTIONS.get(variant, {}),
               "kernel_segment": top_k_lib.KERNEL_SEGMENT,
               "kernel_reads_values": top_k_lib.KERNEL_READS_VALUES,
               "select_by_kernel": top_k_lib.SELECT_BY_KERNEL,
               "early_stop": step_loop.loop_for(early_stop) or "off",
               "steps": int(result.steps),
               "mean_length": float(np.mean(result.lengths[:, 0]))}
        if variant == "main":
          main = (row, result, search)
        elif main:
          row.update(vs_main=row["rate"] / main[0]["rate"], **agreement(result, main[1]))
        record.add(row)
        searches[variant] = search
        if variant in profile_variants:  # the fusions the profile names (traced as timed, here)
          write_hlo(record, f"{name}_{variant}", lambda: search.lower(params, features).compile())
      except Exception as e:  # pylint: disable=broad-except
        record.error(f"{name} {variant}", e)
  if main and len(variants) > 1:
    try:
      _, _, timing = time_search(main[2], params, features, repeats)  # compiled: no tracing
      record.add({"part": name, "variant": "main_again", "batch": batch, "dtype": "bfloat16",
                  "ms": timing.median_s * 1e3, "rate": batch / timing.median_s,
                  "timing": timing.as_dict(), "vs_main": batch / timing.median_s / main[0]["rate"],
                  "check": "main timed again after the variants (noise)"})
    except Exception as e:  # pylint: disable=broad-except
      record.error(f"{name} main_again", e)
  for variant in (v for v in profile_variants if v in searches):
    search = searches[variant]  # compiled: tracing sees the calls only
    profile(record, f"{name}_{variant}", lambda: search(params, features).tokens.block_until_ready(),
            header=f"beam search, bfloat16, batch {batch}, beam {beam}, variant {variant}; per search")
  record.save()


# -- kernel profile -----------------------------------------------------------------------------------


def write_hlo(record: Record, label: str, compiled):
  """Writes the HLO text of `compiled()` (a `Compiled`) to $OUT/hlo_<label>.txt."""
  try:
    text = compiled().as_text()
    record.path("hlo", label).write_text(text)
  except Exception as e:  # pylint: disable=broad-except
    record.error(f"hlo {label}", e)


def profile(record: Record, label: str, run, *, header: str, calls: int = 3):
  """Traces `calls` calls of `run` (compiled and warmed up beforehand by one untraced call) and
  writes the GPU time per kernel and call to $OUT/profile_<label>.txt (and the JSON's profiles)."""
  if not record.fits(f"profile {label}", ESTIMATED_S["profile"]):
    return
  try:
    run()
    trace_dir = f"/tmp/probe_gpu9_trace_{label}"
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(calls):
        run()
    finally:  # a failed call must not leave the trace open (every later start_trace would fail)
      jax.profiler.stop_trace()
    lines, summary = hlo_kernels.trace_kernel_summary(trace_dir, calls)
    path = record.path("profile", label)
    path.write_text(f"{header} (mean of {calls})\n" + "\n".join(lines) + "\n")
    record.payload["profiles"][label] = summary
    log(f"--- profile {label} (top of {path})")
    log("\n".join(lines[:30]))
  except Exception as e:  # pylint: disable=broad-except
    record.error(f"profile {label}", e)


def profile_part(record: Record, case: TrainCase, variants, calls: int = 3):
  """Kernel time per train step of the given (already compiled) variants: $OUT/profile_train_*.txt."""
  for variant in (v for v in variants if v in case.compiled):
    step, holder = case.compiled[variant], {"state": case.fresh_state(variant)}

    def run(step=step, holder=holder):
      holder["state"], sums = step(holder["state"], case.device_batch, case.table)
      jax.block_until_ready(sums)

    prefix = "train" if case.dtype == "bfloat16" else f"train_{case.dtype}"
    write_hlo(record, f"{prefix}_{variant}", lambda step=step: step)
    profile(record, f"{prefix}_{variant}", run, calls=calls,
            header=f"train step, {case.dtype}, batch {case.batch}, variant {variant}; per step")
  record.save()


# -- the run ------------------------------------------------------------------------------------------


def warm_up(seconds: float, size: int = 4096):
  """Matmuls for `seconds`, so that the first timing (main's) does not run at idle clocks."""
  x = jnp.ones((size, size), jnp.bfloat16)
  matmul = jax.jit(lambda x: (x @ x) * 1e-4)
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    x = jax.block_until_ready(matmul(x))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes: every code path on a CPU")
  parser.add_argument("--parts", default="beam256,beam1,train_bf16,train_fp32,profile,grads",
                      help="in this order (most wanted first: the budget skips the last)")
  parser.add_argument("--bf16_variants",
                      default="main,score_vjp+late_grads+scorek_approx,"
                              "score_vjp+late_grads+scorek_approx+pad64,"
                              "score_vjp+late_grad+scorek_approx,score_vjp+late_grads,late_grad")
  parser.add_argument("--fp32_variants",
                      default="main,score_vjp+late_grads+scorek_approx,"
                              "score_vjp+late_grads+scorek_approx+pad64,score_vjp+late_grads,"
                              "bf16_features,score_vjp+late_grads+scorek_approx+bf16_features")
  parser.add_argument("--beam256_variants",
                      default="main,scorek_approx,pad8,scorek_approx+pad8,xla_select,"
                              "kseg_w1,kseg_w2,noproj,scorek_approx+noproj",
                      help="the defaults are those bench/beam_search.py has flags for (kernel_w4 and "
                           "kernel_w16 need a code change to become the default: ask for them)")
  parser.add_argument("--beam1_variants",
                      default="main,stop_while+kseg,scorek_approx,pad8,kernel",
                      help="stop_while+kseg: since session 26 also the selection kernel, 20 kernels "
                           "a step against main's 33 (bench/gpu_aot.py)")
  parser.add_argument("--fp32_profile_variants", default="main,score_vjp+late_grads+scorek_approx",
                      help="train variants (batch 128 fp32) the profile part traces")
  parser.add_argument("--profile_variants", default="main,score_vjp+late_grads+scorek_approx",
                      help="train variants (batch 512 bf16) whose kernels the profile part traces")
  parser.add_argument("--beam_profile_variants", default="main,scorek_approx+pad8",
                      help="beam variants traced after beam256's timings (kernel time per search)")
  parser.add_argument("--steps", type=int, default=None, help="timed train steps (10; quick 2)")
  parser.add_argument("--repeats", type=int, default=None, help="timed searches (20; quick 2)")
  parser.add_argument("--grad_batch", type=int, default=None, help="images (32; quick 2)")
  parser.add_argument("--tag", default="",
                      help="names the JSON probe_gpu9_<tag>.json and ends the profiles' and HLO "
                           "files' names (a second run in the same call, e.g. "
                           "under other XLA_FLAGS, keeps the first's file)")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="skip what would end after this many seconds (300; quick: no limit)")
  args = parser.parse_args()
  for flag, known in (("bf16_variants", TRAIN_VARIANTS), ("fp32_variants", TRAIN_VARIANTS),
                      ("profile_variants", TRAIN_VARIANTS), ("fp32_profile_variants", TRAIN_VARIANTS),
                      ("beam256_variants", BEAM_VARIANTS),
                      ("beam1_variants", BEAM_VARIANTS), ("beam_profile_variants", BEAM_VARIANTS),
                      ("parts", ("beam256", "beam1", "train_bf16", "train_fp32", "profile", "grads"))):
    unknown = [name for name in getattr(args, flag).split(",") if name and name not in known]
    if unknown:
      parser.error(f"--{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
  return args


def main():
  args = parse_args()
  quick = args.quick
  if quick:  # every path, tiny: the sizes keep the grid, vocabulary and chunking non-trivial
    train_sizes = workloads.Sizes(grid=3, channels=16, dim=16, vocab=50, max_len=12)
    beam_sizes = workloads.Sizes(grid=2, channels=8, dim=16, vocab=60)
    bf16_batch, fp32_batch, big_beam_batch, max_len, caption_length = 4, 2, 8, 6, 4
  else:
    train_sizes, beam_sizes = workloads.SIZES["tutorial"], workloads.SIZES["lite0"]
    bf16_batch, fp32_batch, big_beam_batch, max_len, caption_length = 512, 128, 256, 20, 12
  steps = args.steps or (2 if quick else 10)
  repeats = args.repeats or (2 if quick else 20)
  grad_batch = args.grad_batch or (2 if quick else 32)
  budget_s = args.budget_s or (1e9 if quick else 300.0)
  out_dir = pathlib.Path(os.environ.get("OUT", "/tmp"))
  out_dir.mkdir(parents=True, exist_ok=True)
  record = Record(out_dir, budget_s, args)
  log(common.machine_line(record.payload["machine"]) + f"; XLA_FLAGS={record.payload['xla_flags']!r}")
  parts = args.parts.split(",")
  warm_up(seconds=0.1 if quick else 2.0, size=256 if quick else 4096)
  variants = lambda text: [v for v in text.split(",") if v]
  beam = functools.partial(beam_part, record, repeats=repeats, max_len=max_len,
                           caption_length=caption_length)
  cases = {}
  for part in parts:
    if part == "beam256":
      beam("beam256", beam_sizes, big_beam_batch, variants(args.beam256_variants),
           profile_variants=variants(args.beam_profile_variants))
    elif part == "beam1":
      beam("beam1", beam_sizes, 1, variants(args.beam1_variants))
    elif part == "train_bf16":
      cases[part] = train_part(record, part, (train_sizes, "bfloat16", bf16_batch),
                               variants(args.bf16_variants), steps)
    elif part == "train_fp32":
      cases[part] = train_part(record, part, (train_sizes, "float32", fp32_batch),
                               variants(args.fp32_variants), steps)
    elif part == "grads":
      for name, case in cases.items():
        if case:
          grads_part(record, name, case, grad_batch)
    elif part == "profile":
      if cases.get("train_bf16"):
        profile_part(record, cases["train_bf16"], variants(args.profile_variants))
      if cases.get("train_fp32"):
        profile_part(record, cases["train_fp32"], variants(args.fp32_profile_variants))
  print()
  common.print_table(record.payload["rows"], COLUMNS, title=(
      f"probe_gpu9: train = images/s (train_lib.train_step, tutorial sizes), beam = captions/s "
      f"(decoding.search, lite0, beam 5); median; {common.machine_line(record.payload['machine'])}"))
  for error in record.payload["errors"]:
    log(f"error: {error['what']}: {error['error'][:300]}")
  if record.payload["skipped"]:
    log(f"skipped for the budget: {', '.join(record.payload['skipped'])}")
  record.save()
  log(f"done in {record.elapsed():.0f} s; wrote {record.json_path}")


if __name__ == "__main__":
  main()
