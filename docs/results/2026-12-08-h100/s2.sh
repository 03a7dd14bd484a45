#!/usr/bin/env bash
# #29 on this card with trained heads: eagle x6 and deepseek-mtp x4 trained MIN minutes side by side (beside the
# QUICK check, as the user's training shared its card), then the user's repro (graph engine, --tree auto,
# baselines nodraft,static, 256 new) and the fused default, then a trained soak over a slice of bench.jsonl
# (graph and fused, --tree auto; --tree dynamic on fused), float32 identity, and a tau bench.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code GRAFT_CACHE=/tmp/w/cache TORCHINDUCTOR_CACHE_DIR=/tmp/ind2
cd /tmp/code
S=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w; L=$W/logs
MIN=${MIN:-10}; mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $W/status; }
ph() { local n=$1; shift; st "start $n"; "$@" > $L/$n.log 2>&1; local rc=$?
  st "end $n rc=$rc"; tr '\r' '\n' < $L/$n.log | grep -v "it/s\]$\|s/it\]$\|Loading\|Converting\|Warn" | tail -4 | sed 's/^/    /' >> $W/status; return 0; }
cat /tmp/card.txt >> $W/status
ph add_e timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/ea --force &
ph add_d timeout 120 python3 -m graft add-heads $S --heads deepseek-mtp --num-heads 4 --out $W/ds --force
wait
ph train_e timeout $((MIN*60+240)) python3 -m graft train $W/ea --data $D --config recipes/eagle.yaml --max-minutes $MIN &
ph train_d timeout $((MIN*60+240)) python3 -m graft train $W/ds --data $D --config recipes/deepseek-mtp.yaml --max-minutes $MIN
wait
ph repro_graph timeout 240 python3 -m graft bench $W/ea --prompts /tmp/gpx/repro.jsonl --max-new-tokens 256 --baselines nodraft,static --engine graph --json $L/repro_graph.json &
ph soak_ds_graph timeout 300 python3 -m graft bench $W/ds --prompts $B --per-category 10 --max-new-tokens 256 --baselines "" --engine graph --json $L/soak_ds_graph.json &
ph soak_ea_dyn timeout 300 python3 -m graft bench $W/ea --prompts $B --per-category 10 --max-new-tokens 256 --baselines "" --tree dynamic --json $L/soak_ea_dyn.json
wait
ph repro_fused timeout 240 python3 -m graft bench $W/ea --prompts /tmp/gpx/repro.jsonl --max-new-tokens 256 --baselines nodraft,static --json $L/repro_fused.json &
ph soak_ea_graph timeout 300 python3 -m graft bench $W/ea --prompts $B --per-category 10 --max-new-tokens 256 --baselines "" --engine graph --json $L/soak_ea_graph.json &
ph f32_ea timeout 300 python3 -m graft bench $W/ea --prompts $B --per-category 2 --max-new-tokens 128 --baselines eager,nodraft --dtype float32 --json $L/f32_ea.json &
ph f32_ds timeout 300 python3 -m graft bench $W/ds --prompts $B --per-category 2 --max-new-tokens 128 --baselines eager,nodraft --dtype float32 --json $L/f32_ds.json
wait
st "SOAK DONE"
ph tau_ea timeout 240 python3 -m graft bench $W/ea --prompts $B --per-category 6 --max-new-tokens 256 --baselines nodraft --json $L/tau_ea.json &
ph tau_ds timeout 240 python3 -m graft bench $W/ds --prompts $B --per-category 6 --max-new-tokens 256 --baselines nodraft --json $L/tau_ds.json
wait
cp $W/ea/metrics.jsonl $L/metrics_ea.jsonl; cp $W/ds/metrics.jsonl $L/metrics_ds.jsonl
python3 benchmarks/curve.py $W/ea $W/ds > $L/curve.txt 2>&1
st "ALL DONE"
