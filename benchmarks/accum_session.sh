#!/usr/bin/env bash
# One device call (about 5 min on an H100): recipe.fast_accum. Its GPU tests (GEMM accumulation
# error against float64 sums; FP4Linear triton vs reference), the layer benchmark with and
# without it (eager and CUDA graph), the 1.3B eager step, and a 150-step 125M comparison of
# the loss. Summaries under $OUT.
# Usage: bash benchmarks/accum_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
  -k "accumulation or fast" 2>&1 | grep -v "^tests\|^  \|^$\|Warn" | tail -8 | tee "$OUT/gpu_tests.txt"
timeout 120 python3 -m fp4train bench linear --cuda-graph --recipes fp4-dge "fp4-dge[fast_accum=true]" \
  "fp8[fast_accum=true]" 2>&1 | grep "^|" | tee "$OUT/bench_linear.md"
timeout 80 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-dge "fp4-dge[fast_accum=true]" \
  2>&1 | grep "^|" | tee "$OUT/step.md"
timeout 150 python3 -m fp4train compare --model 125m --recipes "fp4-dge,fp4-dge[fast_accum=true]" \
  --max-steps 150 --batch-size 8 --seq-len 1024 --lr 6e-4 --eval-every 150 --eval-batches 10 \
  --log-every 10 --ckpt-every 1000 --no-progress --out "$OUT/cmp" 2>&1 | tail -6 | tee "$OUT/compare.txt"
cp "$OUT"/cmp/compare.md "$OUT"/compare.md 2>/dev/null; rm -rf "$OUT"/cmp
