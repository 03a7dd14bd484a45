#!/usr/bin/env bash
# The GPU check: run it on a GPU before a change to the engine lands. One command, phases in order:
#   1. tests/test_cuda.py: float32 identity of the graph and compiled engines, every family
#   2. per family (eagle x6, deepseek-mtp x4, blockwise/medusa/meta-mtp x4): heads grafted and
#      trained $MIN minutes on $DATA, then a bf16 soak over the whole $BENCH (the default engine,
#      fused where Triton runs; --tree auto; chained families --tree dynamic too) and over prompts long enough to reach
#      the context window's last position: no fault may happen
#   3. per family, float32, the first $F32_PER prompts of each category: graft's output must be
#      identical to transformers' greedy `generate` (`identical` in the bench report)
#   4. compute-sanitizer memcheck of a short generation, every family x {fused, graph, static}, the
#      families of an engine side by side: 0 errors
# A table goes to stdout and $W/check.md (for docs/benchmarks.md); logs and reports under $W.
#
#   bash benchmarks/gpu_check.sh MODEL DATA BENCH [WORKDIR]
#
# QUICK=1: no model to carry and no training, for a short lease. MODEL is then a shape folder (a
# model's config and tokenizer: `python benchmarks/random_backbone.py shape smollm2-135m DIR` on any
# machine, 3.4 MB); a backbone of that shape with random weights is built on the GPU, every family
# grafted untrained and forced to $QUICK_TREE-node trees (chained families also a 64-node dynamic
# tree). The memchecks come first (about 2 minutes on an H100, the CUDA tests beside them), then
# phases 2 and 3 over BENCH and the long prompts. DATA is unused (give -). Random weights say
# nothing about acceptance, only whether the steps index where they should. About 15 minutes for
# the five families on a card of its own (FAMILIES picks fewer):
#   QUICK=1 bash benchmarks/gpu_check.sh DIR - scripts/data/bench_prompts.jsonl
#
# Settings by environment: MIN (training minutes), FAMILIES, F32_PER, LONG_NEW (new tokens after the
# long prompts), TRAIN_ARGS (more `graft train` options; a CPU dry run of this script: MIN=0.2
# LONG_NEW=4 TRAIN_ARGS="--seq-len 128 --batch-size 2 --max-steps 6" and a bench file of 4 prompts).
#
# It takes about ($MIN + 4) minutes per family. On a lent machine whose calls end after 10 minutes,
# start it in the background (setsid nohup bash benchmarks/gpu_check.sh ... &) and poll $W/check.md.
set -uo pipefail  # no -e: a failed phase is a row of the table, not the end of the check
MODEL=$1; DATA=$2; BENCH=$3; W=${4:-/tmp/gpu-check}
MIN=${MIN:-3}; F32_PER=${F32_PER:-4}; LONG_NEW=${LONG_NEW:-1000}; TRAIN_ARGS=${TRAIN_ARGS:-}; FAMILIES=(${FAMILIES:-eagle deepseek-mtp blockwise medusa meta-mtp})
QUICK=${QUICK:-0}; QUICK_TREE=${QUICK_TREE:-128}
declare -A K=([eagle]=6)  # draft depth per family; 4 where unset
export PYTHONUNBUFFERED=1 GRAFT_CACHE=$W/cache
mkdir -p $W/logs
g() { python3 -m graft "$@"; }
row() { echo "| $1 | $2 | $3 |" | tee -a $W/check.md; }
verdict() {  # log rc: the last meaningful line, or the fault
  local log=$1 rc=$2
  if [ "$rc" = 0 ]; then tr '\r' '\n' < $log | grep -E "^tau|ERROR SUMMARY|passed|failed|skipped" | tail -1
  else echo "**rc=$rc**: $(tr '\r' '\n' < $log | grep -E "Error|error|fault|failure" | tail -1 | cut -c1-160)"; fi
}
: > $W/check.md
row "check" "family" "result"
row "---" "---" "---"
if [ "$QUICK" = 1 ]; then
  python3 benchmarks/random_backbone.py build "$MODEL" $W/random-backbone > $W/logs/random-backbone.log 2>&1
  MODEL=$W/random-backbone
  python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $W/logs/cuda-tests.log 2>&1 &
  TESTS=$!
else
  python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py > $W/logs/cuda-tests.log 2>&1
  row "tests/test_cuda.py" "all" "$(verdict $W/logs/cuda-tests.log $?)"
fi
python3 benchmarks/long_prompts.py "$MODEL" "$BENCH" $W/long.jsonl > $W/logs/long-prompts.log 2>&1
memchecks() {  # $1: the tree option; every family of an engine at once (memcheck is slow on the host)
  local engine fam pids
  for engine in fused graph static; do
    pids=()
    for fam in "${FAMILIES[@]}"; do
      timeout 600 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate $W/$fam \
        --prompt "Write a short email." --max-new-tokens 16 --engine $engine $1 > $W/logs/$fam-memcheck-$engine.log 2>&1 &
      pids+=($!)
    done
    for i in "${!FAMILIES[@]}"; do
      wait ${pids[$i]}
      row "memcheck, $engine engine" "${FAMILIES[$i]}" "$(verdict $W/logs/${FAMILIES[$i]}-memcheck-$engine.log $?)"
    done
  done
}
added=()  # every family's heads at once
for fam in "${FAMILIES[@]}"; do
  g add-heads $MODEL --heads $fam --num-heads ${K[$fam]:-4} --out $W/$fam --force > $W/logs/$fam-add.log 2>&1 &
  added+=($!)
done
wait "${added[@]}"
[ "$QUICK" = 1 ] && memchecks "--tree-size $QUICK_TREE"
for fam in "${FAMILIES[@]}"; do
  R=$W/$fam
  if [ "$QUICK" = 1 ]; then  # untrained heads draft only where a tree is forced
    trees=("--tree-size $QUICK_TREE"); [[ $fam == eagle || $fam == deepseek-mtp ]] && trees+=("--tree dynamic --tree-size 64")
  else
    g train $R --data $DATA --config recipes/$fam.yaml --max-minutes $MIN $TRAIN_ARGS > $W/logs/$fam-train.log 2>&1
    row "train $MIN min" "$fam" "$(tr '\r' '\n' < $W/logs/$fam-train.log | grep '^done' | cut -c1-120)"
    trees=("--tree auto"); [[ $fam == eagle || $fam == deepseek-mtp ]] && trees+=("--tree dynamic")
  fi
  for tree in "${trees[@]}"; do
    t=${tree//[- ]/}
    g bench $R --prompts $BENCH --max-new-tokens 256 --baselines "" $tree --json $W/$fam-soak-$t.json \
      > $W/logs/$fam-soak-$t.log 2>&1
    row "bf16 soak, all of the bench, $tree" "$fam" "$(verdict $W/logs/$fam-soak-$t.log $?)"
    g bench $R --prompts $W/long.jsonl --no-chat --max-new-tokens $LONG_NEW --baselines "" $tree \
      --json $W/$fam-long-$t.json > $W/logs/$fam-long-$t.log 2>&1
    row "bf16, prompts up to the context window's end, $tree" "$fam" "$(verdict $W/logs/$fam-long-$t.log $?)"
  done
  g bench $R --prompts $BENCH --per-category $F32_PER --max-new-tokens 128 --baselines eager,nodraft --dtype float32 \
    ${trees[0]} --json $W/$fam-f32.json > $W/logs/$fam-f32.log 2>&1
  rc=$?
  same=$(python3 -c "import json; p=json.load(open('$W/$fam-f32.json'))['per_prompt']; \
print(f\"{sum(x['identical'] for x in p)}/{len(p)} identical to transformers' generate\")" 2>/dev/null)
  row "float32 identity" "$fam" "${same:-$(verdict $W/logs/$fam-f32.log $rc)}"
done
[ "$QUICK" = 1 ] || memchecks "--tree auto"
if [ "$QUICK" = 1 ]; then
  wait $TESTS
  row "tests/test_cuda.py" "all" "$(verdict $W/logs/cuda-tests.log $?)"
fi
echo "card: $(nvidia-smi -L | head -1); $(python3 -c 'import torch; print("torch", torch.__version__)'); $(date -u +%F)" \
  | tee -a $W/check.md
