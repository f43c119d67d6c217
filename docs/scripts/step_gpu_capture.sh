#!/usr/bin/env bash
# The captured step on a GPU (#27) as one command, from the root of a copy of the repository (not
# installed), within 8 minutes: first the CUDA tests of tests/optim/test_cuda.py (CUDA-graph replay
# and torch.compile(mode="reduce-overhead") against the eager step, no sync; at most TEST_SECONDS,
# default 200), then `bench-step --device cuda` of the captured step ("TVLARS graph", "LAMB graph")
# against SGD(foreach=True), SGD(fused=True), the eager steps and lightly's LARS on layers8,
# layers32, lm, resnet50 and vit_b_16 (at most BENCH_SECONDS, default 240; rows are written after
# each set, so a cut run keeps what it measured). Everything goes to $OUT (default
# bench-step-gpu): cuda_tests.log, step_cuda.md/.png and step_cuda.log, from which
# docs/benchmarks/step_gpu.md is written (name the card, the torch build and the commit).
set -uo pipefail
out=${OUT:-bench-step-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/env.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/env.txt" || true

timeout "${TEST_SECONDS:-200}" python -m pytest -q -p no:cacheprovider tests/optim/test_cuda.py \
    2>&1 | tail -40 | tee "$out/cuda_tests.log"

optimizers=("SGD foreach" "SGD fused" "TVLARS" "TVLARS graph" "LAMB" "LAMB graph")
if python -c "import lightly" 2>/dev/null; then
    optimizers+=("lightly LARS")
else
    echo "lightly is not installed: no lightly LARS rows (pip install lightly)" | tee -a "$out/env.txt"
fi
timeout "${BENCH_SECONDS:-240}" python -m lightning_tvlars.bench.step --device cuda \
    --sets layers8 layers32 lm resnet50 vit_b_16 --optimizers "${optimizers[@]}" \
    --repeats "${REPEATS:-30}" --out "$out" 2>&1 | tee "$out/step_cuda.log"
ls -l "$out"
