#!/usr/bin/env bash
# call 3 of the SmolLM2 route (p1, p2, then p3 + data + s3): join the GGUF, install wheels, start master.sh
set -e
cp .gpu/p3/* .gpu/data/* .gpu/s3/prompts.jsonl /tmp/g/
cat /tmp/g/smol.part.* > /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/g/*.whl 2>&1 | tail -2
rm -rf /tmp/code && mkdir -p /tmp/code /tmp/w && cp -r graft tests recipes benchmarks scripts pyproject.toml /tmp/code/ && mkdir -p /tmp/code/.gpu && cp -r .gpu/s3 /tmp/code/.gpu/ && rm /tmp/code/.gpu/s3/prompts.jsonl
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
setsid nohup bash /tmp/code/.gpu/s3/master.sh > /tmp/w/master.log 2>&1 < /dev/null &
sleep 5; cat /tmp/w/status 2>/dev/null
