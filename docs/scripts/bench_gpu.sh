#!/usr/bin/env bash
# The accuracy benchmark's GPU preset as one command, from the root of a copy of the repository
# (not installed). The data set comes from the cache folder (generate it first, where mnist1d is
# installed: LIGHTNING_TVLARS_CACHE=.cache/data lightning-tvlars bench --preset gpu --prepare-data)
# and the results go to $OUT (default bench-gpu): accuracy_gpu.csv/.md/.png/_sharpness.png and
# the log. One call is one chunk: no run starts after MAX_MINUTES (default 5), the runs in flight
# finish (about 100 s at batch 16384 with 12 workers) and the report is written, so a chunk ends
# within 8 minutes. Run it again to resume (rows are kept): Barlow Twins at batch 16384 first.
set -euo pipefail
out=${OUT:-bench-gpu}
mkdir -p "$out"
export LIGHTNING_TVLARS_CACHE=${LIGHTNING_TVLARS_CACHE:-.cache/data} MPLBACKEND=Agg
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ls -l "$LIGHTNING_TVLARS_CACHE"/mnist1d-150000-seed42-corr0.25-iid0.06.npz
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'cuda', torch.cuda.is_available())"
python -m lightning_tvlars.bench --preset gpu --max-minutes "${MAX_MINUTES:-5}" --out "$out" \
    "$@" 2>&1 | tee "$out/accuracy_gpu.log"
