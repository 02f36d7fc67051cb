#!/usr/bin/env bash
# One device call (about 7 min on an H100), session 11's: the GPU tests (every kernel bit for bit,
# the direct launches of fp4train.kernels.launch included), optionally the host time of each
# piece of FP4Linear with direct and JIT launches (benchmarks/host_overhead.py) and its
# cProfile, the quantize kernels (GPU time), the layer benchmark eager and as a CUDA graph (GPU
# time alone), fp4-dge and column-compensated fp4-paper by kernel, and the 1.3B step eager and
# as one CUDA graph. Summaries under $OUT.
# Usage: bash benchmarks/host_session.sh [--host] [--sweeps]
#   --host: also benchmarks/host_overhead.py; --sweeps: also sweep_rowblock.py (row
#   strategies), sweep_dy.py (dY's launches by config) and sweep_columns.py (about 3 min more)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | grep -v "^tests\|^  \|^$\|Warn" | tail -15 | tee "$OUT/gpu_tests.txt"
if [[ " $* " == *" --host "* ]]; then timeout 90 python3 benchmarks/host_overhead.py 2>&1 | grep "^|" | tee "$OUT/host.md"; fi
timeout 60 python3 -m fp4train bench quant 2>&1 | grep "^|" | tee "$OUT/quant.md"
timeout 60 python3 -m fp4train bench quant --shapes 11008x4096 2>&1 | grep "^|" | tee "$OUT/quant_11008.md"
timeout 150 python3 -m fp4train bench linear --cuda-graph --recipes fp8 fp4-dge fp4-paper \
  "fp4-paper[occ.compensation=columns]+chan" 2>&1 | grep "^|" | tee "$OUT/bench_linear.md"
for r in fp4-dge "fp4-paper[occ.compensation=columns]+chan"; do
  timeout 60 python3 -m fp4train bench profile --recipes "$r" 2>&1 | grep "^|\|^#" | tee -a "$OUT/profile.md"
done
timeout 120 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-dge fp4-paper 2>&1 \
  | grep "^|" | tee "$OUT/step.md"
timeout 90 python3 -m fp4train bench step --models 1.3b --cuda-graph --recipes bf16 fp4-dge 2>&1 \
  | grep "^|" | tee "$OUT/step_graph.md"
if [[ " $* " == *" --sweeps "* ]]; then
  timeout 150 python3 benchmarks/sweep_rowblock.py 2>&1 | grep "^|" | tee "$OUT/sweep_rowblock.md"
  timeout 120 python3 benchmarks/sweep_dy.py 2>&1 | grep "^|" | tee "$OUT/sweep_dy.md"
  timeout 120 python3 benchmarks/sweep_columns.py 2>&1 | grep "^|" | tee "$OUT/sweep_columns.md"
fi
