#!/usr/bin/env bash
# Dynamic trees for the chained families (needs two GPUs). GPU 1: deepseek-mtp x4 trained $MIN min.
# Meanwhile GPU 0: CUDA tests (dynamic trees in the graph engine), eagle (earlier heads) fitted vs dynamic 32/48,
# step costs (dynamic trees, 63/64-node trees, draft vocabulary). Then deepseek-mtp fitted / dynamic 32 / dynamic 48.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w
MIN=${MIN:-13}
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$" ; }
bench() {  # folder name [decode options]
  local f=$1 n=$2; shift 2
  python3 -m graft bench $f --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft --engine graph \
    --json $W/bench-$n.json "$@" 2>&1 | q > $W/bench-$n.log; date +%T; echo "== $n"; tail -9 $W/bench-$n.log
}
trainds() {
  python3 -m graft add-heads $M --heads deepseek-mtp --num-heads 4 --out $W/deepseek-mtp --force 2>&1 | tail -1
  python3 -m graft train $W/deepseek-mtp --data $D --config recipes/deepseek-mtp.yaml --max-minutes $MIN 2>&1 \
    | tr '\r' '\n' | grep -E "^done|rror" > $W/train-deepseek-mtp.log
  cp $W/deepseek-mtp/metrics.jsonl $W/train-deepseek-mtp-metrics.jsonl
}
step() { timeout $1 python3 benchmarks/step_cost.py "${@:2}" --engine graph --json $W/step.jsonl 2>&1 | q \
  | grep -E "^(none|eagle|deepseek|blockwise|medusa|meta)" | tee -a $W/step.log; }
date +%T; nvidia-smi -L
( export CUDA_VISIBLE_DEVICES=1; trainds ) &
export CUDA_VISIBLE_DEVICES=0
timeout 400 python3 -m pytest -p no:cacheprovider -v --tb=long tests/test_cuda.py > $W/cuda-tests.log 2>&1
grep -E "passed|failed" $W/cuda-tests.log | tail -3; date +%T
bench $W/eagle eagle-fitted
bench $W/eagle eagle-dyn32 --tree dynamic --tree-size 32
bench $W/eagle eagle-dyn48 --tree dynamic --tree-size 48
echo "## dynamic"; step 200 $M --families eagle,deepseek-mtp --num-heads 4 --sizes 0,16,32,48 --tree dynamic
echo "## fixed"; step 120 $M --families eagle,deepseek-mtp --num-heads 4 --sizes 0,32
echo "## tiles smollm2"; step 150 $M --families blockwise,eagle --num-heads 4 --sizes 0,31,32,63,64
echo "## tiles 8b"; step 200 --random-llama 8b --families blockwise --num-heads 4 --sizes 0,31,32,63,64,127,128 --new 48
echo "## draft vocab 8192"; step 150 $M --families medusa,eagle,deepseek-mtp --num-heads 4 --sizes 0,32 --draft-vocab 8192
date +%T; echo GPU0-DONE
wait
cat $W/train-deepseek-mtp.log; date +%T
( CUDA_VISIBLE_DEVICES=1 bench $W/deepseek-mtp ds-dyn32 --tree dynamic --tree-size 32 ) &
bench $W/deepseek-mtp ds-fitted
wait
bench $W/deepseek-mtp ds-dyn48 --tree dynamic --tree-size 48
cd $W && tar cf ds-heads.tar deepseek-mtp/graft.json deepseek-mtp/heads.safetensors && split -b 15000000 ds-heads.tar ds-heads.tar.part.
echo ALL-DONE
