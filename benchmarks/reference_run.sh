#!/usr/bin/env bash
# Regenerates results/: the reference sweep, the denser sweep for the slopes, verify, and the figures.
# Cases already in results/reference.csv are not run again (--resume), so the second sweep
# only adds the sizes the first did not have. Takes about 25 minutes on a quiet 2-core CPU; timings
# are only as good as the machine is quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/reference.csv
effbench sweep --mech all --n 512,4096,32768 --repeats 3 --timeout 1800 --out "$out" --resume
effbench sweep --mech all --n 256,512,1024,2048,4096,8192,16384,32768 --repeats 3 --timeout 1800 --out "$out" --resume
# causal baselines, so the causal-only mechanisms (Transformer-XL, compressive) have a crossover too
effbench sweep --mech dense,sdpa --causal --n 256,512,1024,2048,4096,8192,16384,32768 --repeats 3 --timeout 1800 --out "$out" --resume
effbench verify --out results/verify.csv
effbench plot "$out" --out results/figures --format png,svg --budget 80GiB --verify results/verify.csv
