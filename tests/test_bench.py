"""bench/: the pieces bench/run_all.py relies on (the scripts themselves are run by run_all, not here)."""

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_torch_reference_agrees_with_flaxcap():
  pytest.importorskip("torch")
  done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "torch_reference.py")],
                        capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "torch reference agrees with flaxcap" in done.stdout


def test_run_all_preload_starts_no_jax_backend():
  pytest.importorskip("torch")
  code = ("from bench import run_all; run_all._preload(); "
          "from jax._src import xla_bridge; assert not xla_bridge._backends; print('ok')")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                        cwd=REPO_ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")


def test_default_image_needs_neither_jax_nor_torch(tmp_path, monkeypatch):
  from bench import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(common, "FLICKR8K_IMAGES", tmp_path / "absent")
  path = common.default_image()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    assert image.size == (500, 375)
  assert common.default_image() == path  # written once


def test_gpu_call_keeps_a_variant_only_when_it_beats_main_by_more_than_mains_drift():
  from bench import choose_gpu9  # pylint: disable=g-import-not-at-top

  def rows(part, **vs_main):
    return [{"part": part, "variant": name, "rate": 100.0 * ratio, "vs_main": ratio}
            for name, ratio in dict(main=1.0, **vs_main).items()]

  beam = rows("beam256", main_again=0.97, kernel=1.05, stop_while=1.02)  # drift 3%
  assert choose_gpu9.choose(beam, "beam256") == "--candidate_top_k=kernel"
  assert choose_gpu9.choose(rows("beam256", main_again=0.97, kernel=1.02), "beam256") == ""
  assert choose_gpu9.choose(rows("beam1", kernel_w4=2.0), "beam1") == ""  # no flag can ask for it
  both = rows("train_bf16", main_again=1.01, recompute=1.10, pad8=1.08)
  assert choose_gpu9.choose(both, "train_bf16") == "--recompute_attention --pad_columns_to=8"
  one = rows("train_fp32", main_again=1.01, recompute=1.10, pad8=1.0)
  assert choose_gpu9.choose(one, "train_fp32") == "--recompute_attention"
  assert choose_gpu9.choose(beam, "train_fp32") == ""  # the part was skipped: the defaults
  rounded = rows("train_fp32", main_again=1.0, bf16_features=1.2, late_grad=1.1)
  assert choose_gpu9.choose(rounded, "train_fp32") == "--late_projected_grad"  # float32 only
  assert choose_gpu9.choose(rows("train_bf16", main_again=1.0, late_grad=1.1),
                            "train_bf16") == "--late_projected_grad"


def test_time_calls_warms_up_for_warmup_s_before_timing():
  import time  # pylint: disable=g-import-not-at-top
  from bench import common  # pylint: disable=g-import-not-at-top
  calls = []

  def call():
    calls.append(time.perf_counter())
    time.sleep(0.002)
    return len(calls)

  timing = common.time_calls(call, repeats=3, warmup=1)
  assert len(calls) == 4 and len(timing.times_s) == 3 and timing.result == 4
  calls.clear()
  timing = common.time_calls(call, repeats=3, warmup=1, warmup_s=0.05)
  assert len(timing.times_s) == 3 and timing.result == len(calls)
  first_timed = calls[-3]
  assert first_timed - calls[0] >= 0.05  # the timed calls start only after warmup_s of calls
  assert len(calls) > 4
  calls.clear()
  common.time_calls(call, repeats=2, warmup=0, warmup_s=0.05)  # no warm-up asked: none
  assert len(calls) == 2


def _flag_names(module: str) -> set[str]:
  """The absl flags `bench.<module>` defines (a process each: the bench scripts share names)."""
  code = f"from bench import {module}; from absl import flags; print(' '.join(flags.FLAGS))"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                        cwd=REPO_ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return set(done.stdout.split())


def test_the_gpu_calls_flags_exist_and_ask_for_the_probes_options():
  """Every flag choose_gpu9 hands bench/beam_search.py or bench/training.py is one that script
  defines, and a beam variant's flags ask for the `Decoder` and search options the probe timed it
  with."""
  pytest.importorskip("torch")
  from bench import choose_gpu9, probe_gpu9  # pylint: disable=g-import-not-at-top
  for table, module in ((choose_gpu9.BEAM, "beam_search"), (choose_gpu9.TRAIN, "training")):
    defined = _flag_names(module)
    for variant, text in table.items():
      for token in text.split():
        name = token[2:].split("=")[0]
        assert name in defined or (name.startswith("no") and name[2:] in defined), (variant, token)
  for variant, text in choose_gpu9.BEAM.items():
    assert variant in probe_gpu9.BEAM_VARIANTS, variant
    for option, value in probe_gpu9.BEAM_DECODER_OPTIONS.get(variant, {}).items():
      assert (f"--{option}" if value is True else f"--{option}={value}") in text.split(), variant
    if probe_gpu9.BEAM_SEARCH_OPTIONS.get(variant, {}).get("project_context") is False:
      assert "--project_context=off" in text.split(), variant
  flag_of = {"late_projected_grad": "--late_projected_grad", "score_vjp": "--score_vjp",
             "late_weight_grad": "--late_weight_grad",
             "recompute_attention": "--recompute_attention",
             "pad_columns_to": "--pad_columns_to={}", "feature_dtype": "--feature_dtype=bfloat16",
             "score_kernel": "--score_kernel", "approx_tanh": "--approx_tanh"}
  for variant, text in choose_gpu9.TRAIN.items():
    for option, value in probe_gpu9.TRAIN_VARIANTS[variant].items():
      if option in flag_of:
        flag = flag_of[option].format(value)
        assert (flag if value is not False else f"--no{flag[2:]}") in text.split(), variant


# A while loop of two kernels, as XLA prints compiled HLO: a reduction fusion reading a [4, 16] bf16
# loop input, and a fusion writing one row of a [20, 8] history in place (a dynamic-update-slice).
_LOOP_HLO = """
%fused_reduce (param_0.1: bf16[4,16]) -> f32[4] {
  %param_0.1 = bf16[4,16]{1,0} parameter(0)
  %convert.1 = f32[4,16]{1,0} convert(%param_0.1)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%convert.1, %constant.1), dimensions={1}, to_apply=%add
}

%fused_dus (param_0: f32[20,8], param_0.2: f32[8], param_2: s32[]) -> f32[20,8] {
  %param_0 = f32[20,8]{1,0} parameter(0)
  %param_0.2 = f32[8]{0} parameter(1)
  %bitcast.1 = f32[1,8]{1,0} bitcast(%param_0.2)
  %param_2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[20,8]{1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant.2)
}

%body (loop: (s32[], f32[20,8], bf16[4,16], f32[8])) -> (s32[], f32[20,8], bf16[4,16], f32[8]) {
  %loop = (s32[], f32[20,8]{1,0}, bf16[4,16]{1,0}, f32[8]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%loop), index=0
  %gte.1 = f32[20,8]{1,0} get-tuple-element(%loop), index=1
  %gte.2 = bf16[4,16]{1,0} get-tuple-element(%loop), index=2
  %gte.3 = f32[8]{0} get-tuple-element(%loop), index=3
  %input_reduce_fusion = f32[4]{0} fusion(%gte.2), kind=kInput, calls=%fused_reduce
  %loop_dynamic_update_slice_fusion = f32[20,8]{1,0} fusion(%gte.1, %gte.3, %gte.0), kind=kLoop, calls=%fused_dus
  ROOT %tuple.1 = (s32[], f32[20,8]{1,0}, bf16[4,16]{1,0}, f32[8]{0}) tuple(%gte.0, %loop_dynamic_update_slice_fusion, %gte.2, %gte.3)
}

ENTRY %main (input: (s32[], f32[20,8], bf16[4,16], f32[8])) -> (s32[], f32[20,8], bf16[4,16], f32[8]) {
  %input = (s32[], f32[20,8]{1,0}, bf16[4,16]{1,0}, f32[8]{0}) parameter(0)
  %copy.1 = (s32[], f32[20,8]{1,0}, bf16[4,16]{1,0}, f32[8]{0}) copy(%input)
  ROOT %while.1 = (s32[], f32[20,8]{1,0}, bf16[4,16]{1,0}, f32[8]{0}) while(%copy.1), condition=%cond, body=%body
}
"""


def test_gpu_aot_counts_a_loops_kernels_and_the_bytes_they_must_move():
  """bench/gpu_aot.py's reading of compiled HLO: 2 kernels an iteration; the reduction moves its
  [4, 16] bf16 input and [4] float32 output (144 bytes), the in-place row write its row, index and
  update (32 + 4 + 32 bytes), not the [20, 8] history it updates."""
  from bench import gpu_aot  # pylint: disable=g-import-not-at-top
  row = gpu_aot.kernel_row("beam256", "main", _LOOP_HLO)
  assert row["loop_kernel_counts"] == [2] and row["entry_kernels"] == 1
  assert gpu_aot.loop_bytes(_LOOP_HLO) == [4 * 16 * 2 + 4 * 4 + 8 * 4 + 4 + 8 * 4]
  listing = gpu_aot.loop_kernels(_LOOP_HLO)
  assert listing[0] == "while body body:" and len(listing) == 3
  assert "%loop_dynamic_update_slice_fusion" in listing[2] and "f32[20,8]" in listing[2]


def test_gpu_aot_says_how_to_get_the_gpu_compiler(monkeypatch):
  """Without jax's CUDA plugin the hint is to install it; with the plugin installed (it failed to
  start: no driver) the hint names the variable that lets it start without a GPU."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from bench import gpu_aot  # pylint: disable=g-import-not-at-top
  installed = set()
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
  assert "install jax's CUDA plugin" in gpu_aot._missing_compiler_hint()  # pylint: disable=protected-access
  installed.update({"jax_plugins", "jax_plugins.xla_cuda13"})
  hint = gpu_aot._missing_compiler_hint()  # pylint: disable=protected-access
  assert "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1" in hint and "install jax" not in hint
