#!/usr/bin/env bash
# GPU benchmark of dpjax (and Opacus, when torch + opacus are installed), offline.
#
#   bash benchmarks/device_check.sh            # from the repository root
#
# Assumes jax[cuda] is installed in the current Python (or in a wheel folder, see below).
# Runs the paper's shape (224 px, batch 128) and the CPU comparison shape (64 px, batch 16);
# writes JSON to $OUT (or benchmarks/results/) and the tables to stdout. No network needed.
# Budget: at most 7.5 minutes (timeouts below); each row is a fresh process, compiles dominate.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# Offline installs from a carried wheel folder, when there is one and jax is missing.
WHEELS="${WHEELS:-.whl}"
if ! "$PYTHON" -c 'import jax' 2>/dev/null && [ -d "$WHEELS" ]; then
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" -q 'jax[cuda12]' || \
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" -q "$WHEELS"/*.whl
fi
if ! "$PYTHON" -c 'import dpjax' 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'

# Most important rows first; each row is its own process, stopped after --row_timeout, and the
# JSON is rewritten after every row, so an overrun loses only the rows not yet measured.
# `timeout` keeps the whole script inside the 8-minute budget even if something hangs.
ROWS_224=nonprivate,dpsgd,torch_nonprivate,opacus,dpsgd_microbatch,dpsgd_vmap_microbatch,ldp_perturb,dpsgd_frozen_bn,nonprivate_frozen_bn,ldp_step,eval,input_pipeline
timeout 320 "$PYTHON" -m benchmarks.run --image_size=224 --batch_size=128 --iters=10 --warmup=2 \
  --rows="$ROWS_224" --row_timeout=150 --out="$RESULTS/gpu_resnet18_224px_b128.json" \
  || echo "224 px run ended with status $?"
timeout 110 "$PYTHON" -m benchmarks.run --image_size=64 --batch_size=16 --iters=20 --warmup=2 \
  --rows=nonprivate,dpsgd,torch_nonprivate,opacus,dpsgd_vmap,ldp_perturb --row_timeout=60 \
  --out="$RESULTS/gpu_resnet18_64px_b16.json" || echo "64 px run ended with status $?"
ls -l "$RESULTS"
