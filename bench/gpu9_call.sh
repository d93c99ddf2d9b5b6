#!/bin/bash
# The next GPU session in ONE device call (one machine start): bench/probe_gpu9.py, then the winners
# (bench/choose_gpu9.py) as official rows with the torch reference of the same run.
#   run(command="bash bench/gpu9_call.sh", carry=[".whl"], timeout_s=600); then give_back.
# Rounds 1-4 ran on an H200 (the kind a plain run got), round 5 on the H100 the targets name:
# kind="nvidia-h100-x1" (530 s of the call; the fine-tuning row alone ~170 s: SKIP_FULL=1 drops it).
# Round 6 (prepared in session 24): SKIP_FULL=1 bash bench/gpu9_call.sh, since the fine-tuning target
# was met with its torch ratio in round 5; the time goes to the probe's new score-kernel, noproj and
# profile items, the train step's peak device memory (SKIP_MEMORY=1: not), and a second probe with
# XLA's GEMMs by cuBLAS (SKIP_CUBLAS=1: not).
# .whl holds ml_collections (configs/default.py and flaxcap/checkpoints.py import it; the device has none)
# and efficientnet_lite_pytorch (the torch reference of the fine-tuning row; 23 KB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0 efficientnet-lite-pytorch==0.1.0
# Comes back: $OUT/call.log, $OUT/probe_gpu9.json, $OUT/results.tgz (every JSON and profile): 3 files.
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
O=$OUT; P=${GPU9_DIR:-/tmp/gpu9}; mkdir -p $P; LOG=$O/call.log
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ${SITE:=/tmp/site} .whl/*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import ml_collections" 2>/dev/null || echo "WARNING: no ml_collections: beam_search.py/training.py fail (carry .whl)" | tee -a $LOG
export PYTHONUNBUFFERED=1
collect() { tar czf $O/results.tgz -C $P . 2>/dev/null; cp $P/probe_gpu9.json $O/ 2>/dev/null; }
run() {  # run LIMIT_S script args...: never past ${BUDGET:-575} s in all
  local limit=$1; shift
  local left=$(( ${BUDGET:-575} - $(el) )); [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "=== skipped (no time): $*" | tee -a $LOG; return; fi
  echo "=== [$(el)s] $* (limit ${limit}s)" | tee -a $LOG
  timeout "$limit" python3 "$@" 2>&1 | grep --line-buffered -v -E '^[IW][0-9]{4} |UserWarning|warnings.warn' >> $LOG
  echo "=== [$(el)s] rc=${PIPESTATUS[0]}" | tee -a $LOG; collect
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a $LOG
OUT=$P run ${PROBE_LIMIT:-330} bench/probe_gpu9.py ${PROBE_ARGS:-}
sed -n '/^probe_gpu9: train/,$p' $LOG | cut -c1-170
c() { python3 bench/choose_gpu9.py $P/probe_gpu9.json $1; }
B256=$(c beam256); B1=$(c beam1); T512=$(c train_bf16); T128=$(c train_fp32)
echo "chosen: b256 [$B256] b1 [$B1] train512 [$T512] train128 [$T128]" | tee -a $LOG
B="bench/beam_search.py --beam_sizes=5 --dtypes=bfloat16 ${BEAM_ARGS:-}"
if [ -n "${SKIP_B1:-}" ]; then  # SKIP_B1=1: the batch-256 row alone
  run 45 $B --batch_sizes=${BIG:-256} $B256 --output=$P/beam_search_gpu9_b${BIG:-256}.json
elif [ "$B256" = "$B1" ]; then
  run 70 $B --batch_sizes=1,${BIG:-256} $B256 --output=$P/beam_search_gpu9.json
else
  run 45 $B --batch_sizes=${BIG:-256} $B256 --output=$P/beam_search_gpu9_b${BIG:-256}.json
  run 40 $B --batch_sizes=1 $B1 --output=$P/beam_search_gpu9_b1.json
fi
if [ -n "${SKIP_TRAIN:-}" ]; then collect; echo "done [$(el)s] (SKIP_TRAIN)"; exit 0; fi
R="bench/training.py --parts=decoder --sizes=${SIZES:-tutorial} ${TRAIN_ARGS:-}"
run 75 $R --batch_sizes=${TB:-512} --dtypes=bfloat16 $T512 --output=$P/training_gpu9_bf16.json
run 60 $R --batch_sizes=${TS:-128} --dtypes=float32 $T128 --output=$P/training_gpu9_fp32.json
if [ -z "${SKIP_FULL:-}" ]; then  # Lite0 fine-tuned end to end at 224 px (compiles ~80 s); SKIP_FULL=1: not
  run 190 bench/training.py --parts=full --full_batch_sizes=${FB:-128} --dtypes=bfloat16 --steps=10 \
    --output=$P/training_gpu9_full.json
fi
if [ -z "${SKIP_MEMORY:-}" ]; then  # issue 8's memory row: peak device memory of a decoder train step
  # at batch 128 (tutorial sizes), flaxcap and torch, each a fresh process (last measured in round 3)
  run 80 bench/memory.py --memory_output=$P/memory_gpu9.json --rows=train_decoder_flaxcap_float32,\
train_decoder_torch_float32,train_decoder_flaxcap_bfloat16,train_decoder_torch_bfloat16
fi
if [ -z "${SKIP_CUBLAS:-}" ]; then  # a second probe with XLA's GEMMs by cuBLAS, not its Triton emitter
  # (a beam step's 29.6 and 23.4 us gemm_fusion kernels): probe_gpu9_cublas.json, its profile and HLO
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_triton_gemm=false" OUT=$P \
    run 90 bench/probe_gpu9.py ${PROBE_ARGS:-} --tag=cublas --parts=beam256,train_bf16 --budget_s=80 \
    --beam256_variants=main,scorek_approx --bf16_variants=main --beam_profile_variants=main
fi
grep -h -A30 -E '^(beam search from|train step \(fwd)' $LOG | grep -v '^--$' | cut -c1-170
echo "done [$(el)s]"
