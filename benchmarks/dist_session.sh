#!/usr/bin/env bash
# One device call on 2 GPUs (about 5 min; the timeouts sum to 9, run it with timeout_s 600):
# the 125M model with fp4-paper, 200 steps at global batch 8 x 1024, same seed, on 1 GPU, on
# 2 GPUs with DDP, with FSDP2 and with FSDP2 reducing gradients in FP8; the all-gather order
# benchmark (bench_allgather.py); the DDP run's step-100 checkpoint resumed on 1 GPU to step
# 200. (The gloo tests run on the CPU.) Runs live in /tmp/dist_runs (checkpoints stay there and
# are deleted); summaries and logs go to $OUT. STEPS=120 bash benchmarks/dist_session.sh runs
# 120 steps (checkpoint and resume at 60) where device time is short.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 FP4TRAIN_CACHE=/tmp/fp4cache OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUNS=/tmp/dist_runs; rm -rf "$RUNS"; mkdir -p "$RUNS"
python3 -c "import torch; print(torch.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())" | tee "$OUT/dist_env.txt"
export PYTHONPATH=$PWD  # run from the tree (an editable install there did not reach benchmarks/*.py)
STEPS=${STEPS:-200}; HALF=$((STEPS / 2))
TRAIN=(train --model 125m --recipe fp4-paper --max-steps "$STEPS" --batch-size 8 --seq-len 1024
  --lr 6e-4 --seed 0 --eval-every "$STEPS" --eval-batches 10 --log-every 10 --no-progress)
TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m fp4train)

CUDA_VISIBLE_DEVICES=0 timeout -k 10 110 python3 -m fp4train "${TRAIN[@]}" --ckpt-every 1000 \
  --out "$RUNS/gpu1" 2>&1 | tail -n 8 | tee "$OUT/dist_gpu1.log"
# the DDP run keeps its step-HALF checkpoint (and the last step's) for the resume below
timeout -k 10 100 "${TORCHRUN[@]}" "${TRAIN[@]}" --parallel ddp --ckpt-every "$HALF" --keep-ckpts 2 \
  --out "$RUNS/ddp2" 2>&1 | tail -n 8 | tee "$OUT/dist_ddp2.log"
# resume the 2-GPU DDP checkpoint of step HALF on one GPU: as if the DDP run had stopped there
mkdir -p "$RUNS/ddp2_resume1/checkpoints"
cp "$RUNS/ddp2/checkpoints/step_$(printf %06d "$HALF").pt" "$RUNS/ddp2_resume1/checkpoints/latest.pt" \
  && cp "$RUNS/ddp2/metrics.jsonl" "$RUNS/ddp2_resume1/"
CUDA_VISIBLE_DEVICES=0 timeout -k 10 80 python3 -m fp4train "${TRAIN[@]}" --ckpt-every 1000 \
  --out "$RUNS/ddp2_resume1" --resume 2>&1 | tail -n 8 | tee "$OUT/dist_resume.log"

timeout -k 10 100 "${TORCHRUN[@]}" "${TRAIN[@]}" --parallel fsdp --ckpt-every 1000 \
  --out "$RUNS/fsdp2" 2>&1 | tail -n 8 | tee "$OUT/dist_fsdp2.log"
summary() {
python3 - "$RUNS" "$OUT" "$STEPS" <<'EOF' > "$OUT/dist_summary.md"
import json, statistics, sys
from pathlib import Path

runs, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
half = steps // 2
labels = {
    "gpu1": "1 GPU",
    "ddp2": "2 GPUs, DDP",
    "fsdp2": "2 GPUs, FSDP2",
    "fsdp2_fp8": "2 GPUs, FSDP2, FP8 reduce-scatter",
    "ddp2_resume1": f"DDP step {half} -> 1 GPU to {steps}",
}
print(f"125M fp4-paper, {steps} steps, global batch 8 x 1024, seed 0\n")
print(f"| run | train loss (last 20) | loss @{half} | loss @{steps} | val loss @{steps} | "
      "tokens/s (run) | tokens/s (median, steps > 20) |")
print("|---|---|---|---|---|---|---|")
for name, label in labels.items():
    d = runs / name
    try:
        final = json.loads((d / "eval.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError) as e:
        print(f"| {label} | failed: {type(e).__name__} | | | | | |")
        continue
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 20]
    print(f"| {label} | {final['train_loss']:.4f} | {loss.get(half, float('nan')):.4f} | "
          f"{loss.get(steps, float('nan')):.4f} | {final['val_loss']:.4f} | "
          f"{final['tokens_per_s']:,.0f} | {statistics.median(tps) if tps else 0:,.0f} |")
    for f in ("metrics.jsonl", "eval.json", "config.json"):
        if (d / f).is_file():
            (out / f"dist_{name}_{f}").write_text((d / f).read_text())
EOF
}
summary
# FSDP2 with its gradient reduce-scatter in FP8 (E5M2)
timeout -k 10 100 "${TORCHRUN[@]}" "${TRAIN[@]}" --parallel fsdp --set grad_comm=e5m2 \
  --ckpt-every 1000 --out "$RUNS/fsdp2_fp8" 2>&1 | tail -n 8 | tee "$OUT/dist_fsdp2_fp8.log"
# all-gather W then quantize, or quantize the shard then all-gather FP8 (the same bits)
timeout -k 10 50 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  benchmarks/bench_allgather.py --model 1.3b 2>&1 | tail -n 9 | tee "$OUT/dist_allgather.md"
summary; cat "$OUT/dist_summary.md"

du -sh "$RUNS" 2>/dev/null; rm -rf "$RUNS"
