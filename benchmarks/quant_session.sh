#!/usr/bin/env bash
# One device call (about 7 min on an H100): the quantize kernels after the cheaper rounding
# (session 10): the GPU tests (every kernel bit for bit against the reference), the two
# compiled-model tests that session 10's first call cut off, `bench quant`, and the knob sweep
# of the row-block kernel (sweep_rowblock.py). Summaries under $OUT.
# Usage: bash benchmarks/quant_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "^tests\|^  \|^$\|Warn" | tail -15 \
  | tee "$OUT/gpu_tests.txt"
timeout 60 python3 -m fp4train bench quant 2>&1 | grep "^|" | tee "$OUT/bench_quant.md"
timeout 150 python3 benchmarks/sweep_rowblock.py 2>&1 | tail -72 | tee "$OUT/sweep_rowblock.md"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py \
  -k compile_blocks_with_fp4 2>&1 | grep "Error\|passed\|failed" | tail -8 | tee "$OUT/compile_tests.txt"
timeout 100 python3 -m fp4train bench linear --recipes fp4-dge fp4-paper 2>&1 | grep "^|" \
  | tee "$OUT/bench_linear.md"
