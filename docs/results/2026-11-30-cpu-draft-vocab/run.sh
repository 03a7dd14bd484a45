set -e
for v in full dv8192; do
  opt=""; [ $v = dv8192 ] && opt="--draft-vocab 8192"
  python -m graft add-heads $GGUF --heads eagle --num-heads 4 --out $W/e-$v --force $opt 2>&1 | tail -1
  python -m graft train $W/e-$v --data $W/data.jsonl --config recipes/eagle.yaml     --max-steps 150 --max-minutes 0 --batch-size 4 --seq-len 256 --warmup 10 --eval-every 150 --save-every 150 --device cpu 2>&1     | tr '\r' '\n' | grep -E "^done|^draft|rror"
done
