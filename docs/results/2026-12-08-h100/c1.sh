#!/usr/bin/env bash
# call 1: code to /tmp/code, part 1 to /tmp/g, the QUICK check (random backbone, memchecks of every family x
# fused/graph/static first, CUDA tests beside) in the background
mkdir -p /tmp/g /tmp/gpx && cp .gpu/p1/* /tmp/g/ && cp -r .gpx/* /tmp/gpx/
rm -rf /tmp/code && mkdir -p /tmp/code && cp -r graft tests recipes benchmarks scripts pyproject.toml /tmp/code/
nvidia-smi -L > /tmp/card.txt; cat /tmp/card.txt
(cd /tmp/code && export PYTHONPATH=/tmp/code TORCHINDUCTOR_CACHE_DIR=/tmp/ind && QUICK=1 setsid nohup bash benchmarks/gpu_check.sh /tmp/gpx/shape - scripts/data/bench_prompts.jsonl /tmp/qc > /tmp/qc.out 2>&1; echo "QUICK DONE" >> /tmp/qc.out) > /dev/null 2>&1 < /dev/null &
(cd /tmp/code && export PYTHONPATH=/tmp/code TORCHINDUCTOR_CACHE_DIR=/tmp/indp && timeout 200 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,blockwise --sizes 0,64 --context 300 --new 64 --profile > /tmp/prof.log 2>&1; timeout 200 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,blockwise --sizes 0,64 --context 300 --new 64 --profile --no-kernels > /tmp/prof0.log 2>&1; timeout 200 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,blockwise --sizes 0,64 --context 300 --new 64 --profile --native-gqa > /tmp/prof2.log 2>&1) > /dev/null 2>&1 < /dev/null &
sleep 5; ls /tmp/g; date
