#!/usr/bin/env bash
T=${1:-500}
for i in $(seq 1 $T); do grep -q "ALL DONE" /tmp/w/status 2>/dev/null && break; sleep 1; done
cat /tmp/w/status; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
cp /tmp/w/status $OUT/ 2>/dev/null; (cd /tmp/w && tar czf $OUT/logs.tgz logs master.log cache-smol cache-gem long.jsonl 2>/dev/null)
cp /tmp/w/*.tgz $OUT/ 2>/dev/null; true
