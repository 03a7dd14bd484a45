#!/usr/bin/env bash
set -e
cp .gpu/x05/* /tmp/g/
cd /tmp/g && cat b.* | tar xzf - && rm b.* && sha256sum -c SHA256SUMS && cd - >/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/g/*.whl 2>&1 | tail -2
rm -rf /tmp/code && mkdir -p /tmp/code /tmp/w && cp -r graft tests recipes benchmarks scripts pyproject.toml .gpu /tmp/code/ 2>/dev/null || true
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
setsid nohup bash /tmp/code/.gpu/s2/master.sh > /tmp/w/master.log 2>&1 < /dev/null &
sleep 5; cat /tmp/w/status 2>/dev/null
