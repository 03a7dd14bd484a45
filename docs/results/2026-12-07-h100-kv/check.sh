#!/usr/bin/env bash
# Session GPU check: QUICK gpu_check (every family, fused default, memcheck incl. fused) on main as is,
# and beside it the one-tensor KV cache (dc04196) in /tmp/kv: CUDA tests, kernel profile, long soak.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
Q=/tmp/qc; K=/tmp/kvr; mkdir -p $Q $K
nvidia-smi -L > /tmp/card.txt
(cd /tmp/code && PYTHONPATH=/tmp/code QUICK=1 bash benchmarks/gpu_check.sh /tmp/gpx/shape - scripts/data/bench_prompts.jsonl $Q > $Q/out.txt 2>&1; echo "QUICK DONE" >> $Q/out.txt) &
cd /tmp/kv; export PYTHONPATH=/tmp/kv
st() { echo "$(date +%T) $*" | tee -a $K/status; }
st start
timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $K/cuda_tests.log 2>&1; st "kv cuda tests rc=$?"
grep -E "^FAILED|^ERROR|passed|failed" $K/cuda_tests.log | tail -5 >> $K/status
for eng in fused; do
timeout 150 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,blockwise --sizes 0,64 --context 300 --new 128 --profile --json $K/prof.jsonl > $K/profile.log 2>&1; st "kv profile rc=$?"
done
grep -E "kernels|^(none|eagle|blockwise) " $K/profile.log | head >> $K/status
timeout 200 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,deepseek-mtp,blockwise,medusa,meta-mtp --sizes 0,128 --context 2000 --new 300 --json $K/soak.jsonl > $K/soak.log 2>&1; st "kv soak rc=$?"
tail -8 $K/soak.log >> $K/status
st "KV DONE"
wait
