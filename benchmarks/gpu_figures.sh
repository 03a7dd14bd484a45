#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine of one or more GPUs: distilled data, each head
# family trained, exported and benched against graft's loop without drafting and against
# transformers' generate.
#
#   distill: the backbone answers PROMPTS (split over the GPUs) -> $W/data.jsonl; DISTILL_S=s
#            stops it after s seconds, keeping the answers written so far
#   train:   each head family trained for at most $MIN minutes, one family per GPU in parallel
#            (ADD_ARGS: more add-heads options, e.g. "--draft-vocab 16384" for Gemma 3's 262k vocabulary)
#   bench:   export every family; bench each against graft's loop without drafting ($ENGINE),
#            and the first family ($BASE_ENGINE) against all baselines
#   figures: training throughput and peak memory (benchmarks/train_figures.py), on GPUs 1..
#
#   wait-train: wait for a train stage started in the background (setsid ... train ... &)
#
# Usage: bash benchmarks/gpu_figures.sh distill|train|wait-train|bench|figures WORKDIR [PROMPTS]
# A device call that may be cut off should set KEEP=$OUT: each bench result is copied there as
# soon as it is written.
set -uo pipefail  # no -e: one failed family must not stop the others
stage=$1; W=$2; P=${3:-}
MIN=${MIN:-5.5}; STEPS=${STEPS:-2000}; NEW=${NEW:-256}; PER_CAT=${PER_CAT:-8}; MODEL=${MODEL:-smollm2-135m}
FAMILIES=(${FAMILIES:-eagle deepseek-mtp blockwise medusa meta-mtp})
declare -A HEADS=([eagle]=6)  # draft depth per family; 4 where unset
BASELINES=${BASELINES:-eager,static,lookup,nodraft}
ENGINE=${ENGINE:-auto}; BASE_ENGINE=${BASE_ENGINE:-$ENGINE}
DISTILL_NEW=${DISTILL_NEW:-256}; TRAIN_ARGS=${TRAIN_ARGS:-}; ADD_ARGS=${ADD_ARGS:-}; SHAPE=${SHAPE:-llama3-8b}  # small values: a CPU dry run
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}  # NGPU=k: use the first k GPUs only
g() { python3 -m graft "$@"; }
quiet() { tr '\r' '\n' | grep --line-buffered -Ev "^(train|bench|distill|export)|Converting|Loading weights|Writing model|it/s\]$"; }
on() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$((gpu % NGPU)) "$@"; }
# KEEP=dir: copy each result there as it lands
keep() { if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$@" "$KEEP/" 2>/dev/null; fi; true; }
mkdir -p "$W"
case "$stage" in
distill)
  split -n "l/$NGPU" -d --additional-suffix=.jsonl "$P" "$W/prompts."
  i=0
  for part in "$W"/prompts.*.jsonl; do
    on $i timeout "${DISTILL_S:-0}" python3 -m graft distill-data "$MODEL" --prompts "$part" --out "$W/data.$i.jsonl" --max-new-tokens "$DISTILL_NEW" \
      --batch-size 512 2>&1 | quiet &
    i=$((i + 1))
  done
  wait
  cat "$W"/data.*.jsonl > "$W/data.jsonl"
  echo "distilled $(wc -l < "$W/data.jsonl") responses" ;;
train)
  i=0
  : > "$W/train.pids"
  for fam in "${FAMILIES[@]}"; do  # one family per GPU; several share a GPU where there are fewer
    (on $i g add-heads "$MODEL" --heads "$fam" --num-heads "${HEADS[$fam]:-4}" --out "$W/$fam" --force $ADD_ARGS >/dev/null 2>&1 &&
     on $i g train "$W/$fam" --data "$W/data.jsonl" --config "recipes/$fam.yaml" --max-steps "$STEPS" \
       --max-minutes "$MIN" $TRAIN_ARGS 2>&1 | quiet) &
    echo $! >> "$W/train.pids"
    i=$((i + 1))
  done
  wait ;;
wait-train)
  # For a train stage started in the background (setsid): returns once its families are done.
  # (Not `pgrep -f "graft train"`: that matches the shell running this very command line.)
  while read -r pid; do while kill -0 "$pid" 2>/dev/null; do sleep 5; done; done < "$W/train.pids"
  grep -h "^done:" "$W"/train.log 2>/dev/null || true ;;
bench)
  i=0
  for fam in "${FAMILIES[@]}"; do
    on $i g export "$W/$fam" --out "$W/$fam-export" --force 2>&1 | quiet &
    i=$((i + 1))
  done
  wait
  # Every family with $ENGINE against graft's loop without drafting, one after another on the
  # last GPU; the first family again with $BASE_ENGINE against every baseline on GPU 0 (the
  # baselines decode with the backbone alone, so one run of them serves all families). Each
  # timing runs alone on its GPU; with one GPU everything runs in turn. AFTER=figures follows.
  last=$((NGPU - 1))
  families() {
    for fam in "${FAMILIES[@]}"; do
      on $last g bench "$W/$fam-export" --prompts "$P" --per-category "$PER_CAT" --max-new-tokens "$NEW" --baselines nodraft \
        --engine "$ENGINE" --json "$W/bench-$fam.json" > "$W/bench-$fam.log" 2>&1
      keep "$W/bench-$fam.json"
    done
  }
  baselines() {
    [ -z "$BASELINES" ] && return
    on 0 g bench "$W/${FAMILIES[0]}-export" --prompts "$P" --per-category "$PER_CAT" --max-new-tokens "$NEW" \
      --baselines "$BASELINES" --engine "$BASE_ENGINE" --json "$W/bench-${FAMILIES[0]}-$BASE_ENGINE.json" \
      > "$W/bench-${FAMILIES[0]}-$BASE_ENGINE.log" 2>&1
    keep "$W/bench-${FAMILIES[0]}-$BASE_ENGINE.json"
  }
  if [ "$NGPU" -gt 1 ]; then families & baselines; wait; else families; baselines; fi
  if [ -n "${AFTER:-}" ]; then bash "$0" "$AFTER" "$W" "$P" > "$W/$AFTER.log" 2>&1; fi
  for f in "$W"/bench-*.log; do quiet < "$f"; done
  python3 benchmarks/bench_table.py "$W"/bench-*.json ;;
figures)
  # one after another on GPU 1 (GPU 0 where there is one)
  F=benchmarks/train_figures.py
  one=$((NGPU > 1 ? 1 : 0))
  on $one python3 $F memory --shape "$SHAPE" --family medusa --heads 4 --seq 2048 --json "$W/figures.jsonl" 2>&1 | tail -1
  on $one python3 $F memory --shape "$SHAPE" --family medusa --heads 4 --seq 2048 --shared-lm-head --json "$W/figures.jsonl" 2>&1 |
    tail -1
  for fam in ${THROUGHPUT-medusa blockwise}; do
    on $one python3 $F throughput --model "$MODEL" --family "$fam" --batch 32 --seq 512 --json "$W/figures.jsonl" \
      2>&1 | tail -1
  done
  # the opt-in compiled engine (torch.compile + CUDA graph) on the first family, without baselines
  if [ -n "$P" ]; then
    timeout "${COMPILED_S:-150}" env CUDA_VISIBLE_DEVICES=$one python3 -m graft bench "$W/${FAMILIES[0]}-export" \
      --prompts "$P" --per-category "$PER_CAT" --max-new-tokens "$NEW" --baselines nodraft --engine compiled \
      --json "$W/compiled-${FAMILIES[0]}.json" 2>&1 | quiet | tail -8
  fi ;;
esac
