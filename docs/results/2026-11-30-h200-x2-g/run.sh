#!/usr/bin/env bash
# Two H200s: what a draft vocabulary does to acceptance and speed. eagle x4, 3 minutes each, the same recipe,
# with the whole vocabulary (GPU 0) and with --draft-vocab 8192 (GPU 1), each benched on its own card.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$" ; }
run() {  # name [add-heads options]
  local n=$1; shift
  python3 -m graft add-heads $M --heads eagle --num-heads 4 --out $W/$n --force "$@" 2>&1 | tail -1
  python3 -m graft train $W/$n --data $D --config recipes/eagle.yaml --max-minutes 3 2>&1 \
    | tr '\r' '\n' | grep -E "^done|rror" > $W/train-$n.log
  python3 -m graft bench $W/$n --prompts $B --per-category 8 --max-new-tokens 256 --baselines nodraft --engine graph \
    --json $W/bench-$n.json 2>&1 | q > $W/bench-$n.log; date +%T; echo "== $n"; cat $W/train-$n.log; tail -9 $W/bench-$n.log
}
date +%T
( export CUDA_VISIBLE_DEVICES=1; run eagle-dv8192 --draft-vocab 8192 ) &
export CUDA_VISIBLE_DEVICES=0; run eagle-full
wait
