#!/usr/bin/env bash
# Produce the README's GPU figures on a lent H100/H200 (see ../shared/gpu/README.md for setup).
# Stage "train": self-distill data, then train each head family for $MIN minutes.
# Stage "bench": export each family and bench it against plain decoding.
# Usage: bash scripts/gpu_figures.sh train|bench WORKDIR PROMPTS BENCH_PROMPTS
set -euo pipefail
stage=$1; W=$2; P=$3; B=$4
MIN=${MIN:-1.5}; N=${N:-1536}; NEW=${NEW:-128}; MODEL=${MODEL:-smollm2-135m}
g() { python3 -m graft "$@"; }
mkdir -p "$W"
if [ "$stage" = train ]; then
  [ -f "$W/data.jsonl" ] && [ "$(wc -l < "$W/data.jsonl")" -ge "$N" ] || \
    g distill-data "$MODEL" --prompts "$P" --out "$W/data.jsonl" --num-samples "$N" --max-new-tokens 256 --batch-size 256
  for fam in ${FAMILIES:-medusa blockwise meta-mtp deepseek-mtp}; do
    g add-heads "$MODEL" --heads "$fam" --num-heads 4 --out "$W/$fam" --force
    g train "$W/$fam" --data "$W/data.jsonl" --config "recipes/$fam.yaml" --max-minutes "$MIN" 2>&1 | tr '\r' '\n' | grep -v "^train" | tail -2
  done
else
  first=1
  for fam in ${FAMILIES:-medusa blockwise meta-mtp deepseek-mtp}; do
    g export "$W/$fam" --out "$W/$fam-export" --force
    base=nodraft; [ $first = 1 ] && base=eager,static,nodraft; first=0
    g bench "$W/$fam-export" --prompts "$B" --max-new-tokens "$NEW" --baselines "$base" --json "$W/bench-$fam.json" 2>&1 | tr '\r' '\n' | grep -v "^bench"
  done
fi
