#!/usr/bin/env bash
# The CUDA tests after the fix, then a short soak of every family (forced 129-node trees and
# dynamic 65-node ones, generations crossing buckets; graph engine, random-weight SmolLM2 shape).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/check3; mkdir -p $R
nvidia-smi -L | tee $R/card.txt
timeout 110 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $R/cuda_tests.log 2>&1; echo "cuda tests rc=$?" | tee -a $R/summary.txt
grep -E "^FAILED|passed|failed" $R/cuda_tests.log | tail -8 | tee -a $R/summary.txt
timeout 60 python3 benchmarks/step_cost.py --random-llama smollm2 --engine graph --families eagle,deepseek-mtp,blockwise,medusa,meta-mtp \
  --sizes 0,128 --context 2000 --new 300 --json $R/soak.jsonl 2>&1 | grep -v Warning | tee -a $R/summary.txt
