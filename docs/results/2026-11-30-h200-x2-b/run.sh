#!/usr/bin/env bash
# One H200 pair. Phase 1: GPU 1 trains deepseek-mtp x4 for 14 min (re-measure after the fit's cache fix).
# GPU 0 meanwhile: CUDA tests; 8B training memory (medusa own LM heads in bf16) and throughput; like-for-like
# held-out acceptance at 600 steps: blockwise on a bf16 vs a 4-bit backbone, medusa's own LM heads bf16 vs fp32.
# Phase 2, host idle, GPU 0: deepseek-mtp bench (nodraft, static); eagle bench at --tree-size 64.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w
TF=benchmarks/train_figures.py; MIN=${MIN:-14}; STEPS=${STEPS:-600}
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$" ; }
short() {  # name recipe gpu [add-heads options...]: fixed-step training, for acceptance only
  local n=$1 r=$2 g=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g python3 -m graft add-heads $M --num-heads 4 --out $W/$n --force "$@" 2>&1 | tail -1
  CUDA_VISIBLE_DEVICES=$g python3 -m graft train $W/$n --data $D --config recipes/$r.yaml --max-steps $STEPS 2>&1 \
    | tr '\r' '\n' | grep -E "^done|rror" > $W/train-$n.log
  cp $W/$n/metrics.jsonl $W/train-$n-metrics.jsonl
}
date +%T; echo PHASE1
( export CUDA_VISIBLE_DEVICES=1
  python3 -m graft add-heads $M --heads deepseek-mtp --num-heads 4 --out $W/deepseek-mtp --force 2>&1 | tail -1
  python3 -m graft train $W/deepseek-mtp --data $D --config recipes/deepseek-mtp.yaml --max-minutes $MIN 2>&1 \
    | tr '\r' '\n' | grep -E "^done|rror" > $W/train-deepseek-mtp.log
  cp $W/deepseek-mtp/metrics.jsonl $W/train-deepseek-mtp-metrics.jsonl ) &
export CUDA_VISIBLE_DEVICES=0
timeout 300 python3 -m pytest -p no:cacheprovider -v --tb=long tests/test_cuda.py > $W/cuda-tests.log 2>&1
grep -E "passed|failed" $W/cuda-tests.log | tail -2; date +%T
echo MEMORY
for o in "" "--vocab-chunk 8192" "--shared-lm-head"; do
  timeout 240 python3 $TF memory --family medusa --heads 4 --seq 2048 $o --json $W/train-figures.jsonl 2>&1 | q | grep -v "^$" | tail -2
done; date +%T
echo THROUGHPUT
for o in "" "--vocab-chunk 8192"; do
  timeout 120 python3 $TF throughput --model $M --family medusa --batch 32 --seq 512 $o --json $W/train-figures.jsonl 2>&1 | q | tail -1
  timeout 240 python3 $TF throughput --shape llama3-8b --family blockwise --batch 1 --seq 2048 --4bit $o --json $W/train-figures.jsonl 2>&1 | q | tail -1
done
timeout 240 python3 $TF throughput --shape llama3-8b --family medusa --batch 1 --seq 2048 --4bit --json $W/train-figures.jsonl 2>&1 | q | tail -1
date +%T; echo ACCEPTANCE
short blockwise-bf16 blockwise 0 --heads blockwise &
short blockwise-4bit blockwise 0 --heads blockwise --load-in-4bit &
short medusa-bf16 medusa 0 --heads medusa &
short medusa-fp32 medusa 0 --heads medusa --lm-head-dtype float32 &
wait; date +%T; for f in $W/train-*.log; do echo "$f: $(cat $f)"; done
echo PHASE2-DS
python3 -m graft bench $W/deepseek-mtp --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft,static \
  --engine graph --json $W/bench-deepseek-mtp.json 2>&1 | q > $W/bench-ds.log; date +%T; tail -12 $W/bench-ds.log
echo PHASE2-EAGLE64
if [ -f $W/eagle/graft.json ]; then
python3 -m graft bench $W/eagle --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft --tree-size 64 \
  --engine graph --json $W/bench-eagle-64.json 2>&1 | q > $W/bench-eagle-64.log; date +%T; tail -10 $W/bench-eagle-64.log
fi
echo ALL-DONE
