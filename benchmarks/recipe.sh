#!/usr/bin/env bash
# The short training recipe, measured end to end on one GPU: the backbone answers the prompt pool
# for $DISTILL minutes (`graft distill-data --max-minutes`), heads are grafted and trained on those
# answers for $TRAIN minutes (`graft train --max-minutes`, the family's recipe), and `graft bench`
# decodes the first $PER prompts of every category of BENCH. Wall minutes of each phase are counted.
#
#   bash benchmarks/recipe.sh MODEL PROMPTS BENCH [WORKDIR]
#
# VARIANTS trains several runs on the same answers, side by side, each with its own extra
# `graft train` options, for figures with and without an option: "name:options;name:options", e.g.
#   VARIANTS="kl:;topk:--topk 10;align:--align" bash benchmarks/recipe.sh ...
# Side by side they share the GPU, so each trains fewer steps than it would alone: compare the
# variants of one run with each other, and time the recipe itself with one variant. `--tree auto`
# fits each variant's tree to its own accuracy and to step times taken while others may share the
# card, so variants can end up with trees of different sizes: for a with/without figure, bench them
# on one tree (BENCH_ARGS="--tree-size 64"); benchmarks/curve.py's held-out figures are printed too.
#
# Settings by environment: FAMILY (eagle), HEADS (draft depth; 6 for eagle, else 4), DISTILL (8),
# TRAIN (15), PER (8), NEW (new tokens per benched prompt, 256), DATA (an answers file to train on
# instead of distilling; DISTILL is then unused), TRAIN_ARGS (more options for every variant),
# DISTILL_ARGS (more distill-data options), BENCH_ARGS (more bench options). A CPU dry run, about 5 minutes:
#   DISTILL=0.5 TRAIN=0.5 PER=1 NEW=8 DISTILL_ARGS="--max-new-tokens 16 --num-samples 8" \
#   TRAIN_ARGS="--seq-len 64 --batch-size 2" VARIANTS="kl:;topk:--topk 10" \
#   bash benchmarks/recipe.sh smollm2-135m scripts/data/bench_prompts.jsonl scripts/data/bench_prompts.jsonl
# The table goes to stdout and $W/recipe.md; logs under $W/logs.
set -uo pipefail  # no -e: a failed phase is a row of the table
MODEL=$1; PROMPTS=$2; BENCH=$3; W=${4:-/tmp/graft-recipe}
FAMILY=${FAMILY:-eagle}; DISTILL=${DISTILL:-8}; TRAIN=${TRAIN:-15}; PER=${PER:-8}; NEW=${NEW:-256}
TRAIN_ARGS=${TRAIN_ARGS:-}; DISTILL_ARGS=${DISTILL_ARGS:-}; BENCH_ARGS=${BENCH_ARGS:-}; VARIANTS=${VARIANTS:-"kl:"}; DATA=${DATA:-}
[ "$FAMILY" = eagle ] && HEADS=${HEADS:-6} || HEADS=${HEADS:-4}
export PYTHONUNBUFFERED=1
mkdir -p $W/logs
g() { python3 -m graft "$@"; }
now() { date +%s; }
minutes() { python3 -c "print(f'{($2 - $1) / 60:.1f}')"; }
IFS=';' read -ra VS <<< "$VARIANTS"

if [ -z "$DATA" ]; then
  DATA=$W/answers.jsonl
  t0=$(now)
  g distill-data $MODEL --prompts $PROMPTS --out $DATA --max-new-tokens 256 --max-minutes $DISTILL --force $DISTILL_ARGS \
    > $W/logs/distill.log 2>&1 || echo "distill-data failed: $W/logs/distill.log" >&2
  DISTILLED=$(minutes $t0 $(now))
else
  DISTILLED="- (given)"
fi
ANSWERS=$(wc -l < $DATA 2>/dev/null || echo 0)

t0=$(now)
for v in "${VS[@]}"; do
  name=${v%%:*}; opts=${v#*:}
  ( g add-heads $MODEL --heads $FAMILY --num-heads $HEADS --out $W/$name --force > $W/logs/$name-add.log 2>&1 &&
    g train $W/$name --data $DATA --config recipes/$FAMILY.yaml --max-minutes $TRAIN $opts $TRAIN_ARGS \
      > $W/logs/$name-train.log 2>&1 ) &
done
wait
TRAINED=$(minutes $t0 $(now))

for v in "${VS[@]}"; do
  name=${v%%:*}
  g bench $W/$name --prompts $BENCH --per-category $PER --max-new-tokens $NEW --baselines nodraft $BENCH_ARGS \
    --json $W/$name-bench.json > $W/logs/$name-bench.log 2>&1
done

python3 - "$W" "$PER" "$DISTILLED" "$ANSWERS" "$TRAINED" "${VS[@]}" <<'EOF' | tee $W/recipe.md
import json, os, sys
w, per, distilled, answers, trained, *variants = sys.argv[1:]
r = None
print(f"distill-data: {distilled} min, {answers} answers; training (side by side): {trained} min")
print("| variant | options | steps | tau | tau by category | x nodraft | acceptance by depth |")
print("|---|---|---|---|---|---|---|")
for v in variants:
    name, opts = v.split(":", 1)
    try:
        r = json.load(open(os.path.join(w, f"{name}-bench.json")))
    except (OSError, ValueError):
        print(f"| {name} | {opts} | | failed: see {w}/logs/{name}-*.log | | | |")
        continue
    steps = "?"
    for line in open(os.path.join(w, name, "metrics.jsonl")):
        steps = json.loads(line).get("step", steps)
    cats = ", ".join(f"{c} {b['tau']:.2f}" for c, b in r["by_category"].items())
    acc = " ".join(f"{a:.2f}" for a in r["acceptance_by_depth"])
    print(f"| {name} | {opts or '-'} | {steps} | {r['tau']:.2f} | {cats} | {r['speedup'].get('nodraft', 0):.2f}x | {acc} |")
if r:
    print(f"{r['device']}, {r['dtype']}, {r['n_prompts']} prompts ({per} per category), {r['max_new_tokens']} new tokens")
EOF
python3 benchmarks/curve.py $(for v in "${VS[@]}"; do echo $W/${v%%:*}; done) 2>&1 | tee -a $W/recipe.md
