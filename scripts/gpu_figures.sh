#!/usr/bin/env bash
# Produce the README's GPU figures on a lent H100/H200 (see ../shared/gpu/README.md for setup).
#   train:  self-distill data with the backbone, then train each head family for $MIN minutes
#   export: export each trained family
#   bench:  bench each export against plain decoding (baselines once, on the first family:
#           they do not depend on the heads)
# Usage: bash scripts/gpu_figures.sh train|export|bench WORKDIR PROMPTS BENCH_PROMPTS
set -euo pipefail
stage=$1; W=$2; P=$3; B=$4
MIN=${MIN:-1.5}; N=${N:-1536}; NEW=${NEW:-128}; MODEL=${MODEL:-smollm2-135m}
FAMILIES=${FAMILIES:-medusa blockwise meta-mtp deepseek-mtp}
g() { python3 -m graft "$@"; }
quiet() { tr '\r' '\n' | grep --line-buffered -v "^train\|^bench\|^distill\|Converting\|Loading weights\|Writing model"; }
mkdir -p "$W"
case "$stage" in
train)
  [ -f "$W/data.jsonl" ] && [ "$(wc -l < "$W/data.jsonl")" -ge "$N" ] || \
    g distill-data "$MODEL" --prompts "$P" --out "$W/data.jsonl" --num-samples "$N" --max-new-tokens 256 --batch-size 256
  for fam in $FAMILIES; do
    [ -f "$W/$fam/train_state.json" ] && continue
    g add-heads "$MODEL" --heads "$fam" --num-heads 4 --out "$W/$fam" --force 2>&1 | quiet
    g train "$W/$fam" --data "$W/data.jsonl" --config "recipes/$fam.yaml" --max-minutes "$MIN" 2>&1 | quiet
  done ;;
export)
  for fam in $FAMILIES; do g export "$W/$fam" --out "$W/$fam-export" --force 2>&1 | quiet; done ;;
bench)
  base=${BASELINES:-eager,static,nodraft}
  for fam in $FAMILIES; do
    g bench "$W/$fam-export" --prompts "$B" --max-new-tokens "$NEW" --baselines "$base" --json "$W/bench-$fam.json" 2>&1 | quiet
    base=""
  done ;;
esac
