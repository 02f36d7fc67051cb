#!/usr/bin/env bash
# Two device calls (each under 10 minutes on an H100). `tests`: GPU tests and the 125M
# BF16-vs-FP4 comparison (with --with-backends also triton vs reference). `bench`: the layer
# benchmark (eager and CUDA-graph replay) and the 1.3B training step with both optimizers and
# E4M3-saved activations (the memory table), eager and as one CUDA graph. Summaries under $OUT.
# Usage: bash benchmarks/gpu_session.sh tests [--with-backends] | bench
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 FP4TRAIN_CACHE=/tmp/fp4cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
export PYTHONPATH=$PWD  # run from the tree (an editable install there did not reach benchmarks/*.py)
MODE=${1:-}
if [[ "$MODE" != "tests" && "$MODE" != "bench" ]]; then
  echo "usage: bash benchmarks/gpu_session.sh tests [--with-backends] | bench" >&2; exit 2
fi
if [[ "$MODE" == "tests" ]]; then
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 230 python3 -m fp4train compare --model 125m --recipes "bf16,fp4-paper" --max-steps 300 \
  --batch-size 8 --seq-len 1024 --lr 6e-4 --eval-every 100 --eval-batches 10 --log-every 10 \
  --ckpt-every 1000 --no-progress --out "$OUT/cmp125m" 2>&1 | tail -12 | tee "$OUT/compare.txt"
cp "$OUT"/cmp125m/compare.png "$OUT"/compare125m.png; cp "$OUT"/cmp125m/compare.md "$OUT"/compare125m.md
rm -rf "$OUT"/cmp125m
if [[ "${2:-}" == "--with-backends" ]]; then
  timeout 110 python3 -m fp4train compare --model 125m --recipes "fp4-paper,fp4-paper[backend=reference]" \
    --max-steps 60 --batch-size 8 --seq-len 1024 --lr 6e-4 --eval-every 60 --eval-batches 5 \
    --log-every 10 --ckpt-every 1000 --no-progress --out "$OUT/backends" 2>&1 | tail -8 | tee "$OUT/backends.txt"
  cp "$OUT"/backends/compare.md "$OUT"/backends.md; rm -rf "$OUT"/backends
fi
exit 0
fi
timeout 100 python3 -m fp4train bench linear --cuda-graph --recipes fp8 fp4-dge 2>&1 | tail -20 | tee "$OUT/bench_linear_graph.txt"
timeout 60 python3 -m fp4train bench linear --recipes fp4-paper fp4-paper+chan 2>&1 | tail -14 | tee "$OUT/bench_linear_occ.txt"
timeout 170 python3 -m fp4train bench step --models 1.3b --recipes bf16 fp8 fp4-dge fp4-paper \
  "fp8[act_save=e4m3]" "fp4-dge[act_save=e4m3]" "fp4-paper[act_save=e4m3]" \
  --optimizers adamw adamw-lp 2>&1 | grep "^|" | tee "$OUT/bench_step.txt"
timeout 60 python3 -m fp4train bench step --models 1.3b --cuda-graph --recipes bf16 fp4-dge fp4-paper \
  2>&1 | grep "^|" | tee "$OUT/bench_step_graph.txt"
