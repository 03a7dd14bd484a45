#!/usr/bin/env bash
# Two H200s. GPU 1: the CUDA tests twice (a capture failed once in the last run). GPU 0: step costs, the code before
# this session's drafting change (old) and after (new), alternately, random-weight SmolLM2 and 8B shapes.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/w/*.whl
W=$OUT; date +%T
( export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:.
  for i in 1 2; do timeout 200 python3 -m pytest -p no:cacheprovider -q --tb=short tests/test_cuda.py > $W/cuda-tests-$i.log 2>&1
    echo "tests $i: $(tail -1 $W/cuda-tests-$i.log)"; done ) &
export CUDA_VISIBLE_DEVICES=0
q() { grep --line-buffered -E "^(none|blockwise|medusa|random|[a-z-]+ [0-9]+-node)"; }
for code in new old new old; do
  p=.; [ $code = old ] && p=.gpu/old3
  echo "## $code smollm2"; PYTHONPATH=/tmp/site:$p timeout 100 python3 benchmarks/step_cost.py --random-llama smollm2 \
    --families blockwise,medusa --num-heads 4 --sizes 0,64 --new 64 --json $W/step-$code.jsonl 2>&1 | q
done
for code in new old; do
  p=.; [ $code = old ] && p=.gpu/old3
  echo "## $code 8b"; PYTHONPATH=/tmp/site:$p timeout 120 python3 benchmarks/step_cost.py --random-llama 8b \
    --families blockwise --num-heads 4 --sizes 0,64 --new 48 --json $W/step-$code.jsonl 2>&1 | q
done
echo "## new smollm2 profile"; PYTHONPATH=/tmp/site:. timeout 100 python3 benchmarks/step_cost.py --random-llama smollm2 \
    --families blockwise --num-heads 4 --sizes 0,64 --new 64 --profile 2>&1 | grep -E "kernels|draft|verify" | head -12
date +%T; wait; date +%T
