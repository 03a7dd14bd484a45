#!/usr/bin/env bash
# #29 (SmolLM2 eagle x6, forced 64/128-node trees, soak, long prompts, memcheck) and #33 (Gemma 3 270M figures),
# two lanes on one GPU; every bench holds one lock so that timings are not shared.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/code
cd /tmp/code
S=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf; G=/tmp/g/gemma-3-270m-q4_k_m.gguf
D=/tmp/g/distilled-smollm2.jsonl; B=/tmp/g/bench.jsonl; P=/tmp/g/prompts.jsonl; W=/tmp/w; L=$W/logs
R=.gpu/s2/repro.jsonl
SMIN=${SMIN:-4}; GMIN=${GMIN:-4}; GN=${GN:-1000}
mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $W/status; }
ph() {  # name cmd...  (the command carries its own timeout)
  local n=$1; shift
  st "start $n"
  "$@" > $L/$n.log 2>&1; local rc=$?
  st "end $n rc=$rc"; tr '\r' '\n' < $L/$n.log | grep -v "it/s\]$\|s/it\]$\|Loading\|Converting" | tail -5 | sed 's/^/    /' >> $W/status
  return 0
}
lk() { flock $W/bench.lock "$@"; }
smol() {
  export GRAFT_CACHE=$W/cache-smol
  ph s_add timeout 120 python3 -m graft add-heads $S --heads eagle --num-heads 6 --out $W/se --force
  ph s_train timeout $((SMIN*60+120)) python3 -m graft train $W/se --data $D --config recipes/eagle.yaml --max-minutes $SMIN
  (cd $W && tar czf $W/smol-eagle6.tgz se/graft.json se/heads.safetensors se/metrics.jsonl 2>/dev/null)
  ph s_repro_auto lk timeout 240 python3 -m graft bench $W/se --prompts $R --max-new-tokens 256 --baselines nodraft,static --json $L/s_repro_auto.json
  ph s_repro_64 lk timeout 200 python3 -m graft bench $W/se --prompts $R --max-new-tokens 256 --baselines nodraft --tree-size 64 --json $L/s_repro_64.json
  ph s_repro_128 lk timeout 200 python3 -m graft bench $W/se --prompts $R --max-new-tokens 256 --baselines nodraft,static --tree-size 128 --json $L/s_repro_128.json
  python3 .gpu/s2/long.py $S $B $W/long.jsonl > $L/long-prep.log 2>&1
  ph s_long_128 lk timeout 240 python3 -m graft bench $W/se --prompts $W/long.jsonl --no-chat --max-new-tokens 1000 --baselines "" --tree-size 128 --json $L/s_long_128.json
  ph s_soak_128 lk timeout 300 python3 -m graft bench $W/se --prompts $B --per-category 8 --max-new-tokens 256 --baselines "" --tree-size 128 --json $L/s_soak_128.json
  ph s_memcheck_graph_128 lk timeout 300 compute-sanitizer --tool memcheck --print-limit 10 python3 -m graft generate $W/se --prompt "Draft a professional email seeking your supervisor's feedback." --max-new-tokens 24 --engine graph --tree-size 128
  st "smol done"
}
gem() {
  export GRAFT_CACHE=$W/cache-gem
  ph g_distill timeout 330 python3 -m graft distill-data $G --prompts $P --out $W/gd.jsonl --num-samples $GN --max-new-tokens 256 --batch-size 64
  python3 .gpu/s2/clean.py $W/gd.jsonl >> $W/status 2>&1
  ph g_add_e timeout 120 python3 -m graft add-heads $G --heads eagle --num-heads 6 --draft-vocab 16384 --out $W/ge --force
  ph g_add_d timeout 120 python3 -m graft add-heads $G --heads deepseek-mtp --num-heads 4 --draft-vocab 16384 --out $W/gm --force
  ph g_train_d timeout $((GMIN*60+150)) python3 -m graft train $W/gm --data $W/gd.jsonl --config recipes/deepseek-mtp.yaml --max-minutes $GMIN &
  ph g_train_e timeout $((GMIN*60+150)) python3 -m graft train $W/ge --data $W/gd.jsonl --config recipes/eagle.yaml --max-minutes $GMIN
  wait
  (cd $W && tar czf $W/gemma-heads.tgz ge/graft.json ge/heads.safetensors ge/metrics.jsonl gm/graft.json gm/heads.safetensors gm/metrics.jsonl 2>/dev/null)
  ph g_bench_e lk timeout 300 python3 -m graft bench $W/ge --prompts $B --per-category 6 --max-new-tokens 256 --baselines nodraft --json $L/g_bench_e.json
  ph g_bench_d lk timeout 300 python3 -m graft bench $W/gm --prompts $B --per-category 4 --max-new-tokens 256 --baselines nodraft --json $L/g_bench_d.json
  ph g_f32_e lk timeout 240 python3 -m graft bench $W/ge --prompts $B --per-category 2 --max-new-tokens 64 --baselines eager,nodraft --dtype float32 --json $L/g_f32_e.json
  st "gemma done"
}
nvidia-smi -L >> $W/status
ph cuda_tests timeout 600 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_cuda.py &
smol &
[ -f $G ] && gem &
wait
st "ALL DONE"
