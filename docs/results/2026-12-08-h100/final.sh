#!/usr/bin/env bash
# final GPU check on the code to submit (one-tensor KV re-landed): CUDA tests beside memcheck of every family x
# {static, graph, fused} (random SmolLM2-shaped backbone, untrained heads forced to 128-node trees), then the soak.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind GRAFT_CACHE=/tmp/f/cache PYTHONPATH=$PWD
F=/tmp/f; mkdir -p $F/logs; end=$(( $(date +%s) + ${1:-420} ))
st() { echo "$(date +%T) $*" | tee -a $F/status; }
nvidia-smi -L | tee -a $F/status
timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $F/logs/cuda-tests.log 2>&1 &
python3 benchmarks/random_backbone.py build .gpx/shape $F/rb > $F/logs/rb.log 2>&1; st "backbone rc=$?"
FAMS="eagle deepseek-mtp blockwise medusa meta-mtp"
P=(); for f in $FAMS; do k=4; [ $f = eagle ] && k=6
  python3 -m graft add-heads $F/rb --heads $f --num-heads $k --out $F/$f --force > $F/logs/$f-add.log 2>&1 & P+=($!); done; wait ${P[@]}; st "heads added"
for e in fused graph static; do
  [ $(date +%s) -gt $((end-90)) ] && { st "no time for $e"; continue; }
  P=(); for f in $FAMS; do
    timeout 240 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate $F/$f --prompt "Write a short email." \
      --max-new-tokens 16 --engine $e --tree-size 128 > $F/logs/$f-memcheck-$e.log 2>&1 & P+=($!)
  done; wait ${P[@]}
  for f in $FAMS; do st "memcheck $f $e: $(grep -h 'ERROR SUMMARY' $F/logs/$f-memcheck-$e.log || tail -1 $F/logs/$f-memcheck-$e.log)"; done
done
timeout $(( end - $(date +%s) > 30 ? end - $(date +%s) : 30 )) python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused \
  --families eagle,deepseek-mtp,blockwise,medusa,meta-mtp --sizes 0,128 --context 2000 --new 300 --json $F/soak.jsonl > $F/logs/soak.log 2>&1
st "soak rc=$?"; grep -v Warn $F/logs/soak.log | tail -7 >> $F/status
wait; st "cuda tests: $(tail -1 $F/logs/cuda-tests.log)"
cd /tmp && tar czf $OUT/final.tgz f/logs f/status f/soak.jsonl; cat $F/status
