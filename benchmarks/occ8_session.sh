#!/usr/bin/env bash
# Three device calls (under 10 min each on an H100): OCC with its outliers on the E4M3 grid
# (occ.compensation="e4m3", session 13, written and tested on the CPU only).
#   bash benchmarks/occ8_session.sh          the GPU tests (quantize kernels and FP4Linear
#       triton vs reference, bit for bit where the math is the same; torch.compile), the layer
#       benchmark of fp4-dge, fp4-paper (dense compensation), e4m3 and the column compensation
#       on Gaussian and outlier-channel (+chan) activations, eager and as a CUDA graph, and
#       e4m3 by kernel
#   bash benchmarks/occ8_session.sh --train  the 1.3B eager step (bf16, fp4-dge, fp4-paper,
#       e4m3), then 125M for 300 steps: bf16, fp4-paper and its e4m3 variant, one seed
#   bash benchmarks/occ8_session.sh --compact  all GPU tests, R by its nonzeros: the pieces by
#       launch config (sweep_compact.py), the persistent column kernels in the layer benchmark,
#       e4m3 by kernel, the quantize kernels (OCC thresholds in two launches), the 1.3B eager
#       step with R compact (deferred) and full width
#   bash benchmarks/occ8_session.sh --kernels  GPU tests of R kept by its nonzeros and under
#       graph capture (session 14), what keeping R compact costs (sweep_compact.py), the 1.3B
#       eager step bf16 / fp4-paper, dY's launches by config (sweep_dy.py, the tile pass in
#       either row order), the quantize kernels, the 1.3B step as one CUDA graph
#   bash benchmarks/occ8_session.sh --verify, then --layer, then --extra: --compact in three
#       calls (a machine taken back mid-call returns nothing)
# Summaries under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E8="fp4-paper[occ.compensation=e4m3]"
COLS="fp4-paper[occ.compensation=columns]"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
verify() {  # the GPU tests, the quantize kernels
  timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests_full.log" | grep -v "^tests\|^  \|^$\|Warn" | tail -15 \
    | tee "$OUT/gpu_tests.txt"
  timeout 50 python3 -m fp4train bench quant 2>&1 | grep "^|" | tee "$OUT/quant.md"
}
layer() {  # the 1.3B step with R compact / full, the layer
  timeout 70 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-paper 2>&1 \
    | grep "^|" | tee "$OUT/step.md"
  FP4TRAIN_FULL_RESIDUAL=1 timeout 45 python3 -m fp4train bench step --models 1.3b \
    --recipes fp4-paper 2>&1 | grep "^|" | tee "$OUT/step_full_residual.md"
  timeout 70 python3 -m fp4train bench linear --cuda-graph --shapes 4096x4096 8192x8192 \
    --recipes fp4-dge "$E8" "$COLS+chan" 2>&1 | grep "^|" | tee "$OUT/bench_linear.md"
}
extra() {  # e4m3 by kernel, the compact pieces by config
  timeout 45 python3 -m fp4train bench profile --recipes "$E8" 2>&1 | grep "^|\|^#" \
    | tee "$OUT/profile.md"
  timeout 80 python3 benchmarks/sweep_compact.py 2>&1 | grep "^|" | tee "$OUT/sweep_compact.md"
}
if [[ " $* " == *" --verify "* ]]; then verify; exit 0; fi
if [[ " $* " == *" --layer "* ]]; then layer; exit 0; fi
if [[ " $* " == *" --extra "* ]]; then extra; exit 0; fi
if [[ " $* " == *" --compact "* ]]; then verify; layer; extra; exit 0; fi
if [[ " $* " == *" --kernels "* ]]; then
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k \
    "compact or stochastic or rejects or without_graph or dy" 2>&1 | tee "$OUT/gpu_tests_full.log" \
    | grep -v "^tests\|^  \|^$\|Warn" | tail -15 | tee "$OUT/gpu_tests.txt"
  timeout 80 python3 benchmarks/sweep_compact.py 2>&1 | grep "^|" | tee "$OUT/sweep_compact.md"
  timeout 75 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-paper 2>&1 \
    | grep "^|" | tee "$OUT/step.md"
  timeout 120 python3 benchmarks/sweep_dy.py 2>&1 | grep "^|" | tee "$OUT/sweep_dy.md"
  timeout 60 python3 -m fp4train bench quant 2>&1 | grep "^|" | tee "$OUT/quant.md"
  timeout 100 python3 -m fp4train bench step --models 1.3b --cuda-graph --recipes bf16 fp4-dge \
    "$E8" 2>&1 | grep "^|" | tee "$OUT/step_graph.md"
  exit 0
fi
if [[ " $* " == *" --train "* ]]; then
  timeout 130 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp4-dge fp4-paper "$E8" \
    2>&1 | grep "^|" | tee "$OUT/step.md"
  # R kept full width for backward (as before session 14), for the cost of the compact one
  FP4TRAIN_FULL_RESIDUAL=1 timeout 70 python3 -m fp4train bench step --models 1.3b \
    --recipes bf16 fp4-paper "$E8" 2>&1 | grep "^|" | tee "$OUT/step_full_residual.md"
  timeout 380 python3 -m fp4train compare --model 125m --recipes "bf16,fp4-paper,$E8" \
    --max-steps 300 --batch-size 8 --seq-len 1024 --lr 6e-4 --eval-every 100 --eval-batches 10 \
    --log-every 10 --ckpt-every 1000 --no-progress --out "$OUT/cmp" 2>&1 \
    | tail -8 | tee "$OUT/compare.txt"
  cp "$OUT"/cmp/compare.md "$OUT"/cmp/compare.png "$OUT"/ 2>/dev/null; rm -rf "$OUT"/cmp
  exit 0
fi
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests_full.log" | grep -v "^tests\|^  \|^$\|Warn" | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 180 python3 -m fp4train bench linear --cuda-graph --recipes fp4-dge fp4-paper "$E8" \
  "$E8+chan" "$COLS+chan" 2>&1 | grep "^|" | tee "$OUT/bench_linear.md"
for r in "$E8" "$E8+chan"; do
  timeout 55 python3 -m fp4train bench profile --recipes "$r" 2>&1 | grep "^|\|^#" \
    | tee -a "$OUT/profile.md"
done
