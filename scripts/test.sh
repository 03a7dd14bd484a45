#!/usr/bin/env bash
# Run graft's test suite (installs what it needs on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
"$PY" -m pytest -p no:cacheprovider "$@"
