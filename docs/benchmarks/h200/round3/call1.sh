#!/bin/bash
# Issue 8, GPU round 3 (branch gpu8): probe, beam search bench, full fine-tuning, command buffers.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( ${BUDGET:-365} - $(el) )); }
C=$PWD/.carry/gpu8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $C/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/gpu8 && tar xzf $C/gpu8.tgz -C /tmp/gpu8
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv
run() {  # run DIR LIMIT python-args...
  local dir=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then echo "=== [$(el)s] skipped (no time): $*"; return; fi
  echo "=== [$(el)s] ($dir) XLA_FLAGS=${XLA_FLAGS:-} $* (limit ${limit}s)"
  (cd "$dir" && timeout "$limit" python3 "$@") 2>&1 | grep -v -E "^[IW][0-9]{4} |UserWarning|load_state_dict|^  warnings.warn"
  echo "=== [$(el)s] rc=${PIPESTATUS[0]}"
}
collect() { mkdir -p $OUT/results; cp /tmp/gpu8/bench/results/*.json $OUT/results/ 2>/dev/null; }
mkdir -p $OUT/probe
OUT=$OUT/probe run /tmp/gpu8 125 $C/probe.py
B="bench/beam_search.py --beam_sizes=1,5 --dtypes=bfloat16 --repeats=20 --methods=flaxcap,torch_batched"
F256=$(python3 $C/choose.py $OUT/probe/probe.json 256); F1=$(python3 $C/choose.py $OUT/probe/probe.json 1)
echo "flags chosen: b256 [$F256] b1 [$F1]"
if [ "$F256" = "$F1" ]; then
  run /tmp/gpu8 50 $B --batch_sizes=1,256 $F256 --output=beam_search_gpu8
else
  run /tmp/gpu8 40 $B --batch_sizes=256 $F256 --output=beam_search_gpu8_b256
  run /tmp/gpu8 35 $B --batch_sizes=1 $F1 --output=beam_search_gpu8_b1
fi
collect
run /tmp/gpu8 $(( $(left) - 5 )) bench/training.py --parts=full --full_batch_sizes=128 --dtypes=bfloat16 --steps=5 --output=training_full_b128_bf16
collect
mkdir -p $OUT/probe_cmdbuf
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE \
  PROBE_PARTS=search PROBE_CHAIN=short PROBE_BATCHES=1,256 OUT=$OUT/probe_cmdbuf run /tmp/gpu8 $(( $(left) )) $C/probe.py
echo "done [$(el)s]"
