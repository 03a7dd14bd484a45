#!/usr/bin/env bash
# wait up to $1 s for master's ALL DONE; then the fused step's kernel profile, main vs one-tensor KV, back to back; tar logs to $OUT
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
end=$(( $(date +%s) + ${1:-400} ))
while [ $(date +%s) -lt $end ] && ! grep -q "ALL DONE" /tmp/w/status 2>/dev/null; do sleep 10; done
mkdir -p /tmp/pr
for v in code kv; do
  (cd /tmp/$v && PYTHONPATH=/tmp/$v timeout 120 python3 benchmarks/step_cost.py --random-llama smollm2 --engine fused --families eagle,blockwise --sizes 0,64 --context 300 --new 128 --profile --json /tmp/pr/$v.jsonl > /tmp/pr/$v.log 2>&1; echo "$v rc=$?" >> /tmp/pr/status)
done
cd /tmp && tar czf $OUT/all.tgz w/logs w/status w/master.log qc/check.md qc/out.txt qc/logs kvr pr card.txt 2>/dev/null
ls -la $OUT
echo "== master"; tail -c 2500 /tmp/w/status; echo "== prof"; cat /tmp/pr/status; grep -E "kernels, |^(none|eagle|blockwise) " /tmp/pr/*.log; echo "== quick"; cat /tmp/qc/check.md
