#!/bin/bash
# Issue 8, GPU round 3, second call: the chunked top-k against the others, and the beam bench of the final code.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
C=$PWD/.carry/gpu8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $C/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/gpu8 && tar xzf $C/gpu8.tgz -C /tmp/gpu8
run() {  # run DIR LIMIT python-args...
  local dir=$1 limit=$2; shift 2
  echo "=== [$(el)s] ($dir) $* (limit ${limit}s)"
  (cd "$dir" && timeout "$limit" python3 "$@") 2>&1 | grep -v -E "^[IW][0-9]{4} |UserWarning|^  warnings.warn"
  echo "=== [$(el)s] rc=${PIPESTATUS[0]}"
}
mkdir -p $OUT/probe
OUT=$OUT/probe run /tmp/gpu8 50 $C/probe.py
run /tmp/gpu8 $(( ${BUDGET:-88} - $(el) )) bench/beam_search.py --batch_sizes=1,256 --beam_sizes=1,5 --dtypes=bfloat16 --repeats=20 --methods=flaxcap,torch_batched --output=beam_search_gpu8
tar czf $OUT/results.tgz -C /tmp/gpu8/bench results
echo "done [$(el)s]"
