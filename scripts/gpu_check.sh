#!/usr/bin/env bash
# GPU checks on a CUDA box, with the package installed as in README "Installing on a GPU machine":
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: gpu-check-<date>)
# Runs the `gpu` tests (CUDA against the CPU: counts, cells, nvJPEG pixels and scores), the whole
# suite (device "auto" picks CUDA, so every scoring test runs on the GPU) and `pathology bench
# --device cuda` on the 20000 x 15000 synthetic slide with one worker per core, and a cohort of 8
# links to it (two slides per GPU). A/B: PATHOLOGY_SLIDES_PER_GPU=1 (one slide per GPU, as before
# 2026-11-24) or PATHOLOGY_GPU_SWITCH_INTERVAL=0 (no GIL switch-interval change) bash
# scripts/gpu_check.sh OUT_B. Logs and the bench JSON go to OUT_DIR; the exit status is 1 if
# any step failed.
set -uo pipefail
out=${1:-gpu-check-$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
py=${PYTHON:-python}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.__version__)" \
    | tee -a "$out/gpu.txt" || exit 1
"$py" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.txt" || status=1
"$py" -m pytest -q tests 2>&1 | tee "$out/suite.txt" || status=1
"$py" -m pathology bench --size 20000x15000 --device cuda --workers "$(nproc)" \
    --cohort 8 --json "$out/bench.json" 2>&1 | tee "$out/bench.txt" || status=1
echo "logs in $out/"
exit "$status"
