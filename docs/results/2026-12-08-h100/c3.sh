#!/usr/bin/env bash
# call 3: join the model, install the wheels, start s2.sh (trainings, the user's repro, trained soak)
cp .gpu/p3/* .gpu/data/* /tmp/g/
cat /tmp/g/smol.part.* > /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/g/*.whl 2>&1 | tail -2
mkdir -p /tmp/w
MIN=${MIN:-7} setsid nohup bash /tmp/gpx/s2.sh > /tmp/w/s2.log 2>&1 < /dev/null &
sleep 20; cat /tmp/w/status; echo ---; cat /tmp/qc/check.md 2>/dev/null
