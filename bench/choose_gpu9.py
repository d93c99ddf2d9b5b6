"""Flags for bench/beam_search.py and bench/training.py from a probe_gpu9 JSON (the fastest variant
that the bench scripts can express, if it beats main by more than main's own drift).

    python3 bench/choose_gpu9.py $OUT/probe_gpu9.json beam256   # -> e.g. --candidate_top_k=kernel ...
"""
import json
import sys

BEAM = {"main": "", "flat": "--candidate_top_k=flat", "kernel": "--candidate_top_k=kernel", "rounds": "--candidate_top_k=rounds",
        "chunks_barrier": "--candidate_top_k=chunks_barrier", "stop_cond": "--early_stop=off,cond",
        "stop_while": "--early_stop=off,while", "stop_while4": "--early_stop=off,while --unroll=4",
        "stop_while+kernel": "--candidate_top_k=kernel --early_stop=off,while",
        "stop_while4+kernel": "--candidate_top_k=kernel --early_stop=off,while --unroll=4",
        "stop_while+chunks_barrier": "--candidate_top_k=chunks_barrier --early_stop=off,while",
        "pad8": "--pad_columns_to=8", "pad128": "--pad_columns_to=128",
        "stop_while+kernel+pad8": "--candidate_top_k=kernel --early_stop=off,while --pad_columns_to=8",
        "stop_while+kseg": "--candidate_top_k=kernel_segments --early_stop=off,while",
        "fused": "--fused_attention", "fused+pad8": "--fused_attention --pad_columns_to=8",
        "stop_while+fused": "--fused_attention --early_stop=off,while",
        "stop_while+kseg+fused": "--candidate_top_k=kernel_segments --early_stop=off,while "
                                 "--fused_attention",
        "scorek": "--score_kernel", "scorek_approx": "--score_kernel --approx_tanh",
        "scorek_approx+pad8": "--score_kernel --approx_tanh --pad_columns_to=8",
        "fused_approx": "--fused_attention --approx_tanh", "noproj": "--project_context=off",
        "scorek_approx+noproj": "--score_kernel --approx_tanh --project_context=off"}
TRAIN = {"main": "", "no_recompute": "--norecompute_attention", "recompute": "--recompute_attention", "pad8": "--pad_columns_to=8",
         "bf16_features": "--feature_dtype=bfloat16",
         "bf16_features+recompute": "--feature_dtype=bfloat16 --recompute_attention",
         "recompute+pad8": "--recompute_attention --pad_columns_to=8",
         "late_grad": "--late_projected_grad", "late_grad+pad8": "--late_projected_grad --pad_columns_to=8",
         "late_grad+bf16_features": "--late_projected_grad --feature_dtype=bfloat16",
         "score_vjp": "--recompute_attention --score_vjp",
         "score_vjp+late_grad": "--recompute_attention --score_vjp --late_projected_grad",
         "score_vjp+late_grad+pad8": "--recompute_attention --score_vjp --late_projected_grad "
                                     "--pad_columns_to=8",
         "score_vjp+late_grad+bf16_features": "--recompute_attention --score_vjp "
                                              "--late_projected_grad --feature_dtype=bfloat16",
         "score_vjp+late_grad+scorek_approx": "--recompute_attention --score_vjp "
                                              "--late_projected_grad --score_kernel --approx_tanh",
         "score_vjp+late_grads": "--recompute_attention --score_vjp --late_projected_grad "
                                 "--late_weight_grad",
         "score_vjp+late_grads+scorek_approx": "--recompute_attention --score_vjp "
                                               "--late_projected_grad --late_weight_grad "
                                               "--score_kernel --approx_tanh",
         "score_vjp+late_grads+bf16_features": "--recompute_attention --score_vjp "
                                               "--late_projected_grad --late_weight_grad "
                                               "--feature_dtype=bfloat16",
         "score_vjp+late_grads+scorek_approx+pad64": "--recompute_attention --score_vjp "
                                                     "--late_projected_grad --late_weight_grad "
                                                     "--score_kernel --approx_tanh "
                                                     "--pad_columns_to=64",
         "score_vjp+late_grads+scorek_approx+bf16_features": "--recompute_attention --score_vjp "
                                                             "--late_projected_grad "
                                                             "--late_weight_grad --score_kernel "
                                                             "--approx_tanh "
                                                             "--feature_dtype=bfloat16"}


def choose(rows, part):
  rows = [r for r in rows if r["part"] == part and r.get("rate")]
  main = next((r for r in rows if r["variant"] == "main"), None)
  if not main:
    return ""
  again = next((r for r in rows if r["variant"] == "main_again"), None)
  noise = abs(1 - again["vs_main"]) if again else 0.02
  table = BEAM if part.startswith("beam") else TRAIN
  # The fp32 target is a float32 step: variants that keep the features in bf16 are not its row.
  allowed = [r for r in rows if r["variant"] in table
             and not (part == "train_fp32" and "bf16_features" in r["variant"])]
  best = max(allowed, key=lambda r: r["rate"])
  if part.startswith("train") and best["variant"] != "main":  # both winners together if both won
    won = [r["variant"] for r in rows if r["variant"] in ("recompute", "pad8")
           and r.get("vs_main", 0) > 1 + noise]
    if best["variant"] in won and len(won) == 2:
      return "--recompute_attention --pad_columns_to=8"
  return table[best["variant"]] if best.get("vs_main", 1.0) > 1 + noise else ""


if __name__ == "__main__":
  try:
    print(choose(json.load(open(sys.argv[1]))["rows"], sys.argv[2]))
  except Exception as e:  # pylint: disable=broad-except  (no probe JSON: the library's defaults)
    print(f"choose_gpu9: {e!r}", file=sys.stderr)
