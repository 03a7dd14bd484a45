#!/usr/bin/env bash
# Two H200s. What #11 still lacks: (1) the parallel families per category against the loop without drafts
# (blockwise, medusa, meta-mtp x4, 7 min each), (2) why a 65-row verification costs more than one token's:
# the forward's matmuls alone per row count with cuBLAS and cuBLASLt, step costs under each, profiles, (3) CUDA tests.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w
MIN=${MIN:-7}
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$" ; }
bench() {  # folder name [decode options]
  local f=$1 n=$2; shift 2
  python3 -m graft bench $f --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft --engine graph \
    --json $W/bench-$n.json "$@" 2>&1 | q > $W/bench-$n.log; date +%T; echo "== $n"; tail -9 $W/bench-$n.log
}
train() {  # family
  python3 -m graft add-heads $M --heads $1 --num-heads 4 --out $W/$1 --force 2>&1 | tail -1
  python3 -m graft train $W/$1 --data $D --config recipes/$1.yaml --max-minutes $MIN 2>&1 \
    | tr '\r' '\n' | grep -E "^done|rror" > $W/train-$1.log
  cp $W/$1/metrics.jsonl $W/train-$1-metrics.jsonl
}
step() { echo "## step_cost ${*:2}" >> $W/step.log; timeout $1 python3 benchmarks/step_cost.py "${@:2}" --engine graph \
  --json $W/step.jsonl 2>&1 | q | grep -Ev "^\s*$" >> $W/step.log; }
date +%T
( export CUDA_VISIBLE_DEVICES=1; train blockwise; bench $W/blockwise blockwise; train medusa; bench $W/medusa medusa ) &
export CUDA_VISIBLE_DEVICES=0
step 150 --random-llama 8b --matmuls 1,17,33,65,129
step 100 $M --matmuls 1,17,33,65,129
step 200 --random-llama 8b --families blockwise --num-heads 4 --sizes 0,64 --new 48 --profile
step 150 --random-llama 8b --families blockwise --num-heads 4 --sizes 0,64 --new 48 --blas cublaslt
step 150 $M --families blockwise --num-heads 4 --sizes 0,64 --profile
step 100 $M --families blockwise --num-heads 4 --sizes 0,64 --blas cublaslt
grep -E "^(none|blockwise| +[0-9]+ )" $W/step.log; date +%T
timeout 300 python3 -m pytest -p no:cacheprovider -v --tb=long tests/test_cuda.py > $W/cuda-tests.log 2>&1
grep -E "passed|failed" $W/cuda-tests.log | tail -3; date +%T
train meta-mtp; bench $W/meta-mtp meta-mtp
wait
cat $W/train-*.log
echo ALL-DONE
