#!/usr/bin/env bash
# One short lease: the CUDA tests beside a fault probe on a random-weight SmolLM2-shaped backbone
# (untrained eagle x6, forced 128-node and dynamic 64-node trees, graph engine, bf16, prompts to
# the context window's last slots), then compute-sanitizer memcheck over a short graph run.
set -u
# tmpl/: SmolLM2-135M-Instruct's config and tokenizer, saved from the GGUF on the CPU beforehand:
#   AutoConfig/AutoTokenizer.from_pretrained(dir, gguf_file=...).save_pretrained("tmpl")
# bench-slice.jsonl: the first 8 prompts of each bench.jsonl category (only their text is used,
# repeated until it fills the context window).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GRAFT_CACHE=/tmp/gc
L=$OUT; S=$L/status.txt
st() { echo "$(date +%T) $*" | tee -a $S; }
nvidia-smi -L > $L/card.txt; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.version.cuda)" >> $L/card.txt; cat $L/card.txt
(timeout 175 python3 -m pytest -p no:cacheprovider -o addopts="" -v -rA tests/test_cuda.py > $L/cuda-tests.log 2>&1; echo "$(date +%T) cuda-tests rc=$?" >> $S) &
st start build
python3 - > $L/build.log 2>&1 <<'PY'
import torch, transformers as tf
cfg = tf.AutoConfig.from_pretrained("docs/results/2026-12-07-h100/tmpl")
torch.manual_seed(0)
with torch.device("cuda"):
    m = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained("/tmp/rb"); tf.AutoTokenizer.from_pretrained("docs/results/2026-12-07-h100/tmpl").save_pretrained("/tmp/rb")
PY
st "build rc=$?"
python3 -m graft add-heads /tmp/rb --heads eagle --num-heads 6 --out /tmp/re --force > $L/add.log 2>&1; st "add-heads rc=$?"
python3 docs/results/2026-12-07-h100/long.py /tmp/rb docs/results/2026-12-07-h100/bench-slice.jsonl /tmp/long.jsonl > $L/long-prep.log 2>&1; st "long-prep rc=$?"
timeout 60 python3 -m graft bench /tmp/re --prompts /tmp/long.jsonl --no-chat --max-new-tokens 1000 --baselines "" --tree-size 128 --json $L/long-128.json > $L/long-128.log 2>&1; st "long-128 graph rc=$?"
timeout 45 python3 -m graft bench /tmp/re --prompts /tmp/long.jsonl --no-chat --max-new-tokens 1000 --baselines "" --tree dynamic --tree-size 64 --json $L/long-dyn.json > $L/long-dyn.log 2>&1; st "long-dyn64 graph rc=$?"
timeout 60 compute-sanitizer --tool memcheck --print-limit 20 python3 -m graft generate /tmp/re --prompt "Draft a professional email" --max-new-tokens 24 --tree-size 128 --engine graph > $L/memcheck-graph.log 2>&1; st "memcheck graph-128 rc=$?"
wait
tail -4 $L/cuda-tests.log; grep -E "PASSED|FAILED|ERROR" $L/cuda-tests.log | sort | uniq -c | sort -rn | head -30 | cut -c1-150
for f in long-128 long-dyn; do tr '\r' '\n' < $L/$f.log | grep -E "^tau|Error|error|fault" | tail -3; done
grep -E "ERROR SUMMARY|rror" $L/memcheck-graph.log | tail -3
cat $S
