#!/usr/bin/env bash
# How many worker processes keep one GPU busiest with the accuracy benchmark's GPU preset.
#
# Twelve workers time-slicing an H200 finished about 8 runs a minute (99-105 s a run at batch
# 16384), while one run alone is bound by its host side (about 2.7 ms a step): this probe runs
# the preset for MINUTES (default 1) with each worker count in JOBS (default "1 3 12"), into
# separate folders under $OUT (default bench-jobs-probe), and prints the optimizer steps per
# second each reached. Run from the root of a copied checkout, with the data set in the cache
# (see bench_gpu.sh); extra arguments go to the benchmark (e.g. --quick --device cpu to try the
# script on a CPU). About 2 minutes per worker count.
set -euo pipefail
out=${OUT:-bench-jobs-probe}
mkdir -p "$out"
export LIGHTNING_TVLARS_CACHE=${LIGHTNING_TVLARS_CACHE:-.cache/data} MPLBACKEND=Agg
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for jobs in ${JOBS:-1 3 12}; do
    dir="$out/jobs-$jobs"
    rm -rf "$dir"
    start=$(date +%s.%N)
    python -m lightning_tvlars.bench --preset gpu --jobs "$jobs" --max-minutes "${MINUTES:-1}" \
        --out "$dir" --no-curves "$@" >"$dir.log" 2>&1
    end=$(date +%s.%N)
    python - "$dir" "$jobs" "$start" "$end" <<'EOF'
import csv, pathlib, sys

folder, jobs, start, end = pathlib.Path(sys.argv[1]), sys.argv[2], *map(float, sys.argv[3:])
rows = [row for path in folder.glob("*.csv") for row in csv.DictReader(open(path))]
steps = sum(int(row["steps"]) for row in rows)
seconds = end - start
print(f"jobs {jobs:>2}: {len(rows)} runs, {steps} steps in {seconds:.0f} s: "
      f"{steps / seconds:.0f} steps/s, {60 * len(rows) / seconds:.1f} runs/min")
EOF
done
