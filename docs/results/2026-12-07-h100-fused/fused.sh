#!/usr/bin/env bash
# #31 item 4: the fused engine on a GPU. CUDA tests (fused included), then graph vs fused step cost on
# the SmolLM2 and 8B shapes (random weights), then kernels per step by --profile.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/ind
R=$OUT/fused; mkdir -p $R
S() { echo "$(date +%T) $*" | tee -a $R/summary.txt; }
nvidia-smi -L | tee $R/card.txt; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a $R/card.txt
S "cuda tests"
timeout 200 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $R/cuda_tests.log 2>&1; S "cuda tests rc=$?"
grep -E "^FAILED|^ERROR|passed|failed" $R/cuda_tests.log | tail -8 | tee -a $R/summary.txt
for eng in graph fused; do
  S "smollm2 $eng"
  timeout 150 python3 benchmarks/step_cost.py --random-llama smollm2 --engine $eng --families eagle,blockwise \
    --sizes 0,16,64 --context 300 --new 128 --json $R/smol.jsonl > $R/smol_$eng.log 2>&1; S "rc=$?"
  grep -v Warning $R/smol_$eng.log | tail -12 | tee -a $R/summary.txt
done
for eng in graph fused; do
  S "8b $eng"
  timeout 120 python3 benchmarks/step_cost.py --random-llama 8b --engine $eng --families eagle,blockwise \
    --sizes 0,64 --context 300 --new 64 --json $R/8b.jsonl > $R/8b_$eng.log 2>&1; S "rc=$?"
  grep -v Warning $R/8b_$eng.log | tail -10 | tee -a $R/summary.txt
done
S "profile"
timeout 120 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle --sizes 0,64 \
  --new 64 --profile > $R/profile_fused.log 2>&1; S "rc=$?"
timeout 60 python3 benchmarks/step_cost.py --random-llama smollm2 --engine graph --families eagle --sizes 0,64 \
  --new 64 --profile > $R/profile_graph.log 2>&1; S "rc=$?"
grep -iE "kernels|ms per step|step:" $R/profile_*.log | head -20 | tee -a $R/summary.txt
S done
