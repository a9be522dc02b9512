#!/usr/bin/env bash
# Every GPU check and benchmark of fxoto in one run, for a session lent a GPU machine (the device
# tool): the CUDA tests (skipped on CPU-only CI, where their CPU twins run) and the GPU benchmark.
# Logs go under $OUT (or out/gpu).  On the device machine thop is missing: carry its wheel as the
# device tool's README shows (a .whl folder, `carry: [".whl"]`); this script installs it from there.
#
#   run: bash tools/gpu_checks.sh        (the checkout's root, PYTHONPATH=. and the machine's python3)
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -rs -k "cuda" tests/ 2>&1 | tee "$OUT/tests.txt"
python3 tools/bench_optimizer.py --device cuda --rounds 7 --steps 10 2>&1 | tee "$OUT/bench_optimizer.txt"
python3 tools/bench_optimizer.py --device cuda --rounds 7 --steps 10 --structures channels --models resnet50 vgg11_bn --variants sgd 2>&1 | tee "$OUT/bench_optimizer_channels.txt"
