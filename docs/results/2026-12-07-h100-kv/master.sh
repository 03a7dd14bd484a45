#!/usr/bin/env bash
# #32 + GPU check. distill-data's rate at the automatic batch (75 s over the pool), then eagle x6 A (KL) vs
# B (KL + HASS top-10 CE) trained MIN minutes side by side on the shared answers, the CUDA tests and a soak of
# every family (fused engine, now the CUDA default) beside the training; then each benched alone.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code GRAFT_CACHE=/tmp/w/cache TORCHINDUCTOR_CACHE_DIR=/tmp/ind
cd /tmp/code
S=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; P=/tmp/g/prompts.jsonl; W=/tmp/w; L=$W/logs
MIN=${MIN:-6}; PC=${PC:-4}
mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $W/status; }
ph() {
  local n=$1; shift
  st "start $n"
  "$@" > $L/$n.log 2>&1; local rc=$?
  st "end $n rc=$rc"; tr '\r' '\n' < $L/$n.log | grep -v "it/s\]$\|s/it\]$\|Loading\|Converting" | tail -5 | sed 's/^/    /' >> $W/status
  return 0
}
nvidia-smi -L >> $W/status
[ "${STEPKV:-0}" = 1 ] && ph step_kv timeout 90 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families blockwise,eagle --sizes 0,64 --context 300 --new 128 --profile --json $L/step_kv.jsonl
grep -E "kernels, |^(none|eagle|blockwise) " $L/step_kv.log >> $W/status
[ "${RATE:-60}" != 0 ] && ph rate timeout ${RATE:-60} python3 -m graft distill-data $S --prompts $P --out $W/rate.jsonl --max-new-tokens 256
tr '\r' '\n' < $L/rate.log | grep -E "prompt/s|batch" | tail -3 >> $W/status
ph add_a timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/ea --force &
ph add_b timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/eb --force &
ph add_c timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/ec --force
wait
ph train_a timeout $((MIN*60+240)) python3 -m graft train $W/ea --data $D --config recipes/eagle.yaml --max-minutes $MIN &
ph train_b timeout $((MIN*60+240)) python3 -m graft train $W/eb --data $D --config recipes/eagle.yaml --max-minutes $MIN --topk 10 &
ph train_c timeout $((MIN*60+240)) python3 -m graft train $W/ec --data $D --config recipes/eagle.yaml --max-minutes $MIN --align &
sleep 60
: # cuda tests: in check.sh
ph soak timeout 150 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,deepseek-mtp,blockwise,medusa,meta-mtp \
  --sizes 0,128 --context 2000 --new 300 --json $L/soak.jsonl
wait
ph bench_b timeout 200 python3 -m graft bench $W/eb --prompts $B --per-category $PC --max-new-tokens 256 --baselines nodraft --json $L/bench_b.json &
ph bench_c timeout 200 python3 -m graft bench $W/ec --prompts $B --per-category $PC --max-new-tokens 256 --baselines nodraft --json $L/bench_c.json &
ph bench_a timeout 200 python3 -m graft bench $W/ea --prompts $B --per-category $PC --max-new-tokens 256 --baselines nodraft --json $L/bench_a.json
wait
ph repro_fused timeout 200 python3 -m graft bench $W/ea --prompts /tmp/gpx/repro.jsonl --max-new-tokens 256 --baselines nodraft,static --json $L/repro_fused.json
ph repro_graph timeout 200 python3 -m graft bench $W/ea --prompts /tmp/gpx/repro.jsonl --max-new-tokens 256 --baselines nodraft,static --engine graph --json $L/repro_graph.json
cp $W/ea/metrics.jsonl $L/metrics_a.jsonl; cp $W/eb/metrics.jsonl $L/metrics_b.jsonl; cp $W/ec/metrics.jsonl $L/metrics_c.jsonl
python3 /tmp/code/benchmarks/curve.py $W/ea $W/eb $W/ec > $L/curve.txt 2>&1
st "ALL DONE"
