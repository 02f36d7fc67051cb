#!/usr/bin/env bash
# One device call (about 6 min on an H100): what session 9 changed and could not time.
# The 1.3B step compiled per block (bf16, fp4-dge and fp4-paper; fp4-dge also with the Triton
# kernels under compile instead of the traced quantizers), the exactness check of the traced
# quantizers, and the memory table with act_save now dropping W's FP8 copy. (Its row-block
# sweep moved to quant_session.sh.) Summaries under $OUT.
# Usage: bash benchmarks/compile_session.sh [1|2]   (1: tests, exactness, compiled step;
#        2: kernels under compile, memory table, sweep; no argument: both, which can pass the
#        device's 600 s per call)
set -uo pipefail
export PYTHONUNBUFFERED=1 FP4TRAIN_CACHE=/tmp/fp4cache PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PART=${1:-all}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
if [[ $PART != 2 ]]; then
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_model.py \
  -k "compiled_traced or torch_compile or triton_matches_reference or compile" 2>&1 | tail -3 \
  | tee "$OUT/gpu_tests.txt"
timeout 60 python3 benchmarks/bench_compile_quant.py exact 2>&1 | grep -v Warn | grep "differ\|RMSNorm" \
  | tee "$OUT/compile_quant.txt"
timeout 240 python3 -m fp4train bench step --models 1.3b --compile --recipes bf16 fp4-dge fp4-paper \
  "fp4-dge[act_save=e4m3]" 2>&1 | grep "^step\\|^|" | tee "$OUT/step_compiled.txt"
fi
if [[ $PART != 1 ]]; then
FP4TRAIN_COMPILE_KERNELS=1 timeout 60 python3 -m fp4train bench step --models 1.3b --compile \
  --recipes fp4-dge 2>&1 | grep "^step" | tee "$OUT/step_compiled_kernels.txt"
timeout 120 python3 -m fp4train bench step --models 1.3b --recipes bf16 "fp8[act_save=e4m3]" \
  "fp4-dge[act_save=e4m3]" "fp4-paper[act_save=e4m3]" --optimizers adamw-lp 2>&1 | grep "^step\\|^|" \
  | tee "$OUT/step_memory.txt"
fi
