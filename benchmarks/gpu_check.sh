#!/usr/bin/env bash
# `make gpu-check`: the GPU check on a bare GPU box, from the working tree, offline.
# Installs the wheels `make gpu-wheels` put in .gpu-carry/wheels into a private folder (no build
# step: the project runs from the tree with PYTHONPATH=.), then runs benchmarks/gpu_check.py
# under a hard time limit; its JSON is rewritten after every measurement, so a cut-short run
# still returns what it measured ($OUT/gpu_check.json when OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${GPU_CHECK_SITE:-/tmp/knn-defense-gpu-site}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-215}"
if ! ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  echo ".gpu-carry/wheels is empty: run 'make gpu-wheels' on a machine with a package index first" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .gpu-carry/wheels/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the workers' allocator settings (pipeline/runtime/ray_runner.py WORKER_ENV)
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 THP_MEM_ALLOC_ENABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT --kill-after=10 "$LIMIT_S" python3 benchmarks/gpu_check.py "$@"
