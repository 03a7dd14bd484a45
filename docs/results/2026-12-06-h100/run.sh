#!/usr/bin/env bash
# Diagnosis of the graph engine's fault. Runs in the background; phases write /tmp/w/status.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
M=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; W=/tmp/w; L=$W/logs
R=.gpu/s/repro.jsonl
rm -rf $W/status $L; mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $W/status; }
q() { tr '\r' '\n' | grep --line-buffered -Ev "Loading weights|Writing model|Converting|it/s\]$|s/it\]$|^bench:|^train" ; }
ph() {  # name timeout cmd...
  local n=$1 t=$2; shift 2
  st "start $n"
  timeout $t "$@" > $L/$n.log 2>&1; local rc=$?
  st "end $n rc=$rc"; tr '\r' '\n' < $L/$n.log | grep -v "it/s\]$" | tail -4 | sed 's/^/    /' >> $W/status
  return 0
}
g() { python3 -m graft "$@"; }
ph addheads 120 python3 -m graft add-heads $M --heads eagle --num-heads 6 --out $W/e --force
ph train 300 python3 -m graft train $W/e --data $D --config recipes/eagle.yaml --max-minutes 3
(cd $W && tar czf $W/eagle6.tgz e/graft.json e/heads.safetensors e/metrics.jsonl 2>/dev/null)
export GRAFT_CACHE=$W/cache
ph B_repro_static 200 python3 -m graft bench $W/e --prompts $R --max-new-tokens 256 --baselines nodraft,static --json $L/B.json
ph C_repro_nodraft 120 python3 -m graft bench $W/e --prompts $R --max-new-tokens 256 --baselines nodraft --json $L/C.json
ph G_memcheck_static 180 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate $W/e --prompt "Draft a short email to a colleague." --max-new-tokens 16 --engine static --tree-size 24
ph E_soak_auto 240 python3 -m graft bench $W/e --prompts $B --max-new-tokens 256 --baselines nodraft --per-category 30 --json $L/E.json
ph H_memcheck_graph 180 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate $W/e --prompt "Draft a short email to a colleague." --max-new-tokens 16 --engine graph --tree-size 24
ph D_repro_nocudnn 150 python3 .gpu/s/nocudnn.py bench $W/e --prompts $R --max-new-tokens 256 --baselines nodraft,static --json $L/D.json

ph F_soak_dynamic 150 python3 -m graft bench $W/e --prompts $B --max-new-tokens 256 --baselines nodraft --per-category 15 --tree dynamic --json $L/F.json
st "ALL DONE"
