#!/usr/bin/env bash
# One device call (about 6 min on an H100): what session 9 changed and could not time.
# The 1.3B step compiled per block (bf16, fp4-dge and fp4-paper; fp4-dge also with the Triton
# kernels under compile instead of the traced quantizers), the exactness check of the traced
# quantizers, the memory table with act_save now dropping W's FP8 copy, and the row-block
# quantize sweep over wide rows (sweep_rowblock.py). Summaries under $OUT.
# Usage: bash benchmarks/compile_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 FP4TRAIN_CACHE=/tmp/fp4cache PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_model.py \
  -k "compiled_traced or torch_compile or triton_matches_reference or compile" 2>&1 | tail -3 \
  | tee "$OUT/gpu_tests.txt"
timeout 60 python3 benchmarks/bench_compile_quant.py exact 2>&1 | grep -v Warn | grep "differ\|RMSNorm" \
  | tee "$OUT/compile_quant.txt"
timeout 150 python3 -m fp4train bench step --models 1.3b --compile --recipes bf16 fp4-dge fp4-paper \
  "fp4-dge[act_save=e4m3]" --optimizers adamw adamw-lp 2>&1 | grep "^|" | tee "$OUT/step_compiled.txt"
FP4TRAIN_COMPILE_KERNELS=1 timeout 60 python3 -m fp4train bench step --models 1.3b --compile \
  --recipes fp4-dge 2>&1 | grep "^step" | tee "$OUT/step_compiled_kernels.txt"
timeout 120 python3 -m fp4train bench step --models 1.3b --recipes bf16 "fp8[act_save=e4m3]" \
  "fp4-dge[act_save=e4m3]" "fp4-paper[act_save=e4m3]" --optimizers adamw-lp 2>&1 | grep "^|" \
  | tee "$OUT/step_memory.txt"
timeout 90 python3 benchmarks/sweep_rowblock.py 2>&1 | tail -45 | tee "$OUT/sweep_rowblock.md"
