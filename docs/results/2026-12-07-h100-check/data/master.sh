#!/usr/bin/env bash
# #32: more on-policy data at equal training minutes. The whole prompts.jsonl pool distilled on the card
# (the shared 12,288 greedy answers resumed to all 19,779, then 12,288 sampled answers at T=0.8), then
# eagle x6 trained MIN minutes on the shared answers (A) and on everything (B), side by side on the card
# (equal conditions), benched alone. The CUDA tests run beside the distillation (the GPU check).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code GRAFT_CACHE=/tmp/w/cache
cd /tmp/code
S=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; P=/tmp/g/prompts.jsonl; W=/tmp/w; L=$W/logs
MIN=${MIN:-7}; PC=${PC:-4}
mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $W/status; }
ph() {  # name cmd...  (the command carries its own timeout)
  local n=$1; shift
  st "start $n"
  "$@" > $L/$n.log 2>&1; local rc=$?
  st "end $n rc=$rc"; tr '\r' '\n' < $L/$n.log | grep -v "it/s\]$\|s/it\]$\|Loading\|Converting" | tail -4 | sed 's/^/    /' >> $W/status
  return 0
}
nvidia-smi -L >> $W/status
ph cuda_tests timeout 600 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py &
cp $D $W/greedy.jsonl
ph distill_greedy timeout 300 python3 -m graft distill-data $S --prompts $P --out $W/greedy.jsonl --max-new-tokens 256 --batch-size 128
if [ "${SAMPLED:-0}" = 1 ]; then
  ph distill_sampled timeout 420 python3 -m graft distill-data $S --prompts $P --out $W/sampled.jsonl --num-samples 12288 --temperature 0.8 --seed 1 --max-new-tokens 256 --batch-size 128
fi
touch $W/sampled.jsonl
wc -l $W/greedy.jsonl $W/sampled.jsonl >> $W/status
cat $W/greedy.jsonl $W/sampled.jsonl > $W/big.jsonl
ph add_a timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/ea --force
ph add_b timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/eb --force
ph train_a timeout $((MIN*60+240)) python3 -m graft train $W/ea --data $D --config recipes/eagle.yaml --max-minutes $MIN &
ph train_b timeout $((MIN*60+240)) python3 -m graft train $W/eb --data $W/big.jsonl --config recipes/eagle.yaml --max-minutes $MIN
wait
(cd $W && tar czf $W/heads-meta.tgz ea/graft.json ea/metrics.jsonl eb/graft.json eb/metrics.jsonl 2>/dev/null)
ph bench_b timeout 300 python3 -m graft bench $W/eb --prompts $B --per-category $PC --max-new-tokens 256 --baselines nodraft --json $L/bench_b.json
ph bench_a timeout 300 python3 -m graft bench $W/ea --prompts $B --per-category $PC --max-new-tokens 256 --baselines nodraft --json $L/bench_a.json
(cd $W && tail -n +12289 greedy.jsonl | gzip -c > greedy-rest.jsonl.gz; python3 /tmp/code/benchmarks/curve.py ea eb > curve.txt 2>&1; cp curve.txt logs/)
st "ALL DONE"
