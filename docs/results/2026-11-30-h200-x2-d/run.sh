#!/usr/bin/env bash
# deepseek-mtp with modules 2..K committing in their draft passes: the heads trained at 08:02 (S8), benched again.
# GPU 1: CUDA tests, then dynamic 32. GPU 0: step costs (fixed and dynamic), then the fitted tree.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; B=/tmp/g/bench.jsonl; W=/tmp/w
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$" ; }
bench() {  # folder name [decode options]
  local f=$1 n=$2; shift 2
  python3 -m graft bench $f --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft --engine graph \
    --json $W/bench-$n.json "$@" 2>&1 | q > $W/bench-$n.log; date +%T; echo "== $n"; tail -9 $W/bench-$n.log
}
step() { timeout $1 python3 benchmarks/step_cost.py "${@:2}" --engine graph --json $W/step.jsonl 2>&1 | q \
  | grep -E "^(none|eagle|deepseek|blockwise|medusa|meta)" | tee -a $W/step.log; }
date +%T
( export CUDA_VISIBLE_DEVICES=1
  timeout 400 python3 -m pytest -p no:cacheprovider -v --tb=long tests/test_cuda.py > $W/cuda-tests.log 2>&1
  grep -E "passed|failed" $W/cuda-tests.log | tail -3; date +%T
  bench $W/deepseek-mtp ds-dyn32 --tree dynamic --tree-size 32 ) &
export CUDA_VISIBLE_DEVICES=0
echo "## fixed"; step 120 $M --families deepseek-mtp --num-heads 4 --sizes 0,32
echo "## dynamic"; step 120 $M --families deepseek-mtp --num-heads 4 --sizes 0,32 --tree dynamic
bench $W/deepseek-mtp ds-fitted
wait
echo ALL-DONE
