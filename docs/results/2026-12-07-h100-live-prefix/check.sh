#!/usr/bin/env bash
# The GPU check of the live-prefix engine without the model (one call, <= 10 min): step cost with
# attention over the live prefix against the whole cache (alone on the card), then the CUDA tests
# and memcheck of the graph engine across buckets side by side.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/check; mkdir -p $R
nvidia-smi -L | tee $R/card.txt; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a $R/card.txt
for mode in "" --whole-cache; do
  timeout 100 python3 benchmarks/step_cost.py --random-llama smollm2 --engine graph --families eagle,blockwise \
    --sizes 0,64 --context 300 --new 500 $mode --json $R/smollm2.jsonl 2>&1 | grep -v Warning | tee -a $R/cost.log
done
timeout 330 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $R/cuda_tests.log 2>&1 &
timeout 330 compute-sanitizer --tool memcheck --print-limit 10 python3 -c "
import graft.engine as e; e.SPAN_UNIT = 16
import sys; sys.path.insert(0, 'benchmarks')
import step_cost
step_cost.main(['--random-llama', 'smollm2', '--engine', 'graph', '--families', 'eagle,deepseek-mtp,blockwise', '--sizes', '0,64', '--context', '40', '--new', '40'])
" > $R/memcheck.log 2>&1; echo "memcheck rc=$?" | tee -a $R/cost.log
wait
grep -E "ERROR SUMMARY|^none|^eagle|^blockwise|^deepseek" $R/memcheck.log | tail -8 | tee -a $R/cost.log
tail -3 $R/cuda_tests.log | tee -a $R/cost.log
