#!/usr/bin/env bash
# The whole graft pipeline on the embedded SmolLM2-135M-Instruct:
# add-heads -> distill-data -> train -> export -> generate -> bench.
# Sized for about six minutes on a 2-core CPU; larger when a GPU is present.
# Everything is written under runs/demo (override with DEMO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
graft() { "$PY" -m graft "$@"; }
D=${DEMO_DIR:-runs/demo}
FAM=${DEMO_HEADS:-blockwise}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NEW=256; STEPS=300; SEQ=512; BS=16; BENCH_NEW=128   # GPU
else
  NEW=96; STEPS=40; SEQ=128; BS=4; BENCH_NEW=48        # 2-core CPU
fi
mkdir -p "$D"
echo "== 1. graft $FAM heads onto the frozen backbone"
graft add-heads smollm2-135m --heads "$FAM" --num-heads 3 --out "$D/heads" --force
echo "== 2. let the backbone answer the training prompts itself (self-distillation data)"
graft distill-data smollm2-135m --prompts scripts/data/demo_prompts.jsonl --out "$D/data.jsonl" \
  --max-new-tokens "$NEW" --batch-size 12
echo "== 3. train the heads ($STEPS steps)"
graft train "$D/heads" --data "$D/data.jsonl" --max-steps "$STEPS" --seq-len "$SEQ" --batch-size "$BS" \
  --lr 2e-3 --warmup 4 --eval-every 20
echo "== 4. export one self-contained folder"
graft export "$D/heads" --out "$D/export" --force
echo "== 5. generate (greedy; stdout is the text, --stats goes to stderr)"
graft generate "$D/export" --prompt "Why do we have day and night?" --max-new-tokens 64 --stats
echo "== 6. bench against plain decoding on prompts the heads never saw"
graft bench "$D/export" --prompts scripts/data/bench_prompts.jsonl --max-new-tokens "$BENCH_NEW" \
  --baselines eager,nodraft --json "$D/bench.json" --plot "$D/bench.png" --force
"$PY" - "$D/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
sp = ", ".join(f"{v:.2f}x over {k}" for k, v in r["speedup"].items())
print(f"\nRESULT  tau {r['tau']:.2f} tokens per backbone forward; speedup {sp}; identical_rate {r['identical_rate']}")
print(f"        draft tree: {r['tree_nodes']} nodes ({r['tree_choice']})")
d = r["drafting"]
if d["drafted"]:
    print(f"        {d['drafted']} of {r['n_prompts']} generations drafted, {d['stopped']} of them stopped where the "
          "drafts did not pay")
PY
