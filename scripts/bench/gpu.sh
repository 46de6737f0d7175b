#!/usr/bin/env bash
# The whole GPU comparison in one call, under 8 minutes on one H100/H200: compute ceilings at
# batch 32 and 256, data ceilings for both backends, and fits for both (one run each).
#   pip install -e ".[dali]" && bash scripts/bench/gpu.sh [OUT_DIR]
# OUT_DIR (default gpu_bench/) gets bench_cuda.json, bench_cuda.md and gpu.txt (the card).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu_bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
python -c "import torch, nvidia.dali; print('torch', torch.__version__, 'DALI', nvidia.dali.__version__)" >> "$out/gpu.txt"
python scripts/bench/benchmark.py --device cuda --repeats 1 --time-budget 420 \
    --json "$out/bench_cuda.json" \
    --only ceiling_fp32 ceiling_fast ceiling_fp32_b256 ceiling_fast_b256 \
        data_ceiling data_ceiling_dali tutorial default fast dali fast_dali \
        default_b256 fast_dali_b256 \
    | tee "$out/bench_cuda.md"
