#!/usr/bin/env bash
# Regenerates results/: the reference sweep, the denser sweep for the slopes, verify, the figures, and the decode sweep.
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
# the same errors on all-MiniLM-L6-v2's q, k, v (needs the [real] extra), for the accuracy-vs-cost front
effbench verify --inputs minilm --out results/verify_minilm.csv
effbench plot "$out" --out results/figures --format png,svg --budget 80GiB --verify results/verify.csv --verify results/verify_minilm.csv
# decode: KV cache / state bytes and time per token after a context of N (its own file and figures)
dec=results/decode.csv
effbench sweep --phase decode --mech all --n 1024,2048,4096,8192,16384,32768,65536,131072,262144 --decode-steps 32 --timeout 1800 --out "$dec" --resume
effbench sweep --phase decode --mech dense,sdpa,local,sinks,linear --n 524288,1048576 --decode-steps 32 --timeout 1800 --out "$dec" --resume
effbench sweep --phase decode --mech dense,sdpa,local,sinks --kv-heads 1,2 --n 4096,32768,131072 --decode-steps 32 --timeout 1800 --out "$dec" --resume
effbench plot "$dec" --out results/figures/decode --format png,svg --budget 80GiB
# presets beside the published numbers (CPU: what runs; memory of every case through the estimate)
pre=results/presets
effbench estimate --preset flashattention-2022 --mode fwd+bwd --timeout 90 --out "$pre/flashattention-2022_estimate.csv"
effbench plot "$pre/flashattention-2022_estimate.csv" --against flashattention-2022
effbench sweep --preset flashattention-2022 --device cpu --n 128,256,512,1024 --repeats 3 --timeout 240 --out "$pre/flashattention-2022_cpu.csv" --resume
effbench plot "$pre/flashattention-2022_cpu.csv" --against flashattention-2022
effbench sweep --preset nystromformer-2021 --device cpu --repeats 3 --timeout 240 --out "$pre/nystromformer-2021_cpu.csv" --resume
effbench plot "$pre/nystromformer-2021_cpu.csv" --against nystromformer-2021
