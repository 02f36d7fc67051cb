#!/usr/bin/env bash
# One device call (about 6 min on an H100): OCC's column compensation (session 10, written and
# tested on the CPU only). The GPU tests of the OCC kernels and of FP4Linear triton vs
# reference with occ.compensation=columns, then the layer benchmark and per-kernel profile of
# fp4-paper with dense vs column compensation on Gaussian and outlier-channel activations,
# and the 1.3B eager step; the GPU tests also cover the "resident" row strategy of
# fp4train.kernels.quantize, which `python benchmarks/sweep_rowblock.py` then times.
# Summaries under $OUT.
# Usage: bash benchmarks/occ_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
  -k "occ or triton_matches_reference or rows_bit_exact" 2>&1 | grep -v "^tests\|^  \|^$\|Warn" | tail -15 \
  | tee "$OUT/gpu_tests.txt"
COLS="fp4-paper[occ.compensation=columns]"
timeout 120 python3 -m fp4train bench linear --recipes fp4-dge fp4-paper "$COLS" fp4-paper+chan \
  "$COLS+chan" 2>&1 | grep "^|" | tee "$OUT/bench_linear.md"
for r in "fp4-paper+chan" "$COLS+chan" "$COLS"; do
  timeout 60 python3 -m fp4train bench profile --recipes "$r" 2>&1 | grep "^|\|^#" \
    | tee -a "$OUT/profile.md"
done
timeout 120 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-paper "$COLS" 2>&1 \
  | grep "^step\|^|" | tee "$OUT/step.md"
