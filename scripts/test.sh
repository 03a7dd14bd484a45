#!/usr/bin/env bash
# Run graft's test suite (installs what it needs on first use). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast loop without the SmolLM2 tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The eagle3 export is checked by loading it with the `speculators` package, which pins other
# versions of graft's libraries: it gets an environment of its own (GRAFT_INTEROP=0 skips it).
INTEROP=${GRAFT_INTEROP_VENV:-.venv-interop}
if [ "${GRAFT_INTEROP:-1}" != 0 ] && [ ! -f "$INTEROP/.graft-ok" ]; then
  echo "creating $INTEROP (speculators, for the eagle3 interop test)" >&2
  # speculators asks for torchvision and torchaudio, which its eagle3 model never imports; with
  # them pip would swap the CPU torch for a 5 GB CUDA build. Its other requirements, as it states them.
  if python3 -m venv "$INTEROP" && "$INTEROP/bin/python" -m pip install -q --upgrade pip \
      && "$INTEROP/bin/python" -m pip install -q "torch==${GRAFT_TORCH:-2.13.0}" \
      && "$INTEROP/bin/python" -m pip install -q --no-deps "speculators==0.9.0" \
      && "$INTEROP/bin/python" -c 'from importlib.metadata import requires
print("\n".join(r for r in requires("speculators") if "extra ==" not in r and r.split("<")[0].split(">")[0].split("=")[0] not in ("torchvision", "torchaudio")))' >"$INTEROP/requirements.txt" \
      && "$INTEROP/bin/python" -m pip install -q -r "$INTEROP/requirements.txt" 2>"$INTEROP/pip.log"; then
    touch "$INTEROP/.graft-ok"
  else
    echo "warning: could not install speculators (see $INTEROP/pip.log if it exists); the eagle3 interop test will be skipped" >&2
  fi
fi
if [ -f "$INTEROP/.graft-ok" ]; then export GRAFT_INTEROP_PY="$(cd "$INTEROP" && pwd)/bin/python"; fi
"$PY" -m pytest -p no:cacheprovider "$@"
