#!/usr/bin/env bash
# The GPU check's last families: CUDA tests beside memcheck of blockwise, medusa, meta-mtp x {static, graph}
# (random-weight SmolLM2-shaped backbone, untrained heads, forced 128-node tree), all in parallel.
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/p3/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GRAFT_CACHE=/tmp/gc
W=$OUT/mc; mkdir -p $W
nvidia-smi -L > $W/card.txt; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $W/card.txt
timeout 220 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $W/cuda-tests.log 2>&1 &
python3 benchmarks/random_backbone.py build .gpu/q/tmpl /tmp/rb > $W/rb.log 2>&1
P=()
for fam in blockwise medusa meta-mtp; do
  python3 -m graft add-heads /tmp/rb --heads $fam --num-heads 4 --out /tmp/h-$fam --force > $W/$fam-add.log 2>&1 &
  P+=($!)
done; wait "${P[@]}"
for fam in blockwise medusa meta-mtp; do for eng in static graph; do
  timeout 200 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate /tmp/h-$fam \
    --prompt "Write a short email." --max-new-tokens 16 --engine $eng --tree-size 128 > $W/$fam-memcheck-$eng.log 2>&1 &
done; done
wait
for fam in blockwise medusa meta-mtp; do for eng in static graph; do
  echo "| memcheck, $eng engine, --tree-size 128 | $fam | $(grep 'ERROR SUMMARY' $W/$fam-memcheck-$eng.log || tail -1 $W/$fam-memcheck-$eng.log) |"
done; done | tee $W/check.md
echo "| tests/test_cuda.py | all | $(tail -1 $W/cuda-tests.log) |" | tee -a $W/check.md
