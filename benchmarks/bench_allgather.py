"""FSDP2 + FP4Linear: all-gather W then quantize it, or quantize each shard then all-gather FP8?

FSDP2 shards every weight [N, K] along dim 0 (output channels). FP4Linear's forward scales W per
output channel (``fwd_w``: row-wise), so each rank can quantize its own rows with exactly the
scales the full W would get, all-gather FP8 bytes (1 byte per weight instead of 4 for float32
or 2 for bf16 parameters) plus one float32 scale per row, and transpose the gathered FP8 for
dgrad. This script checks that both orders give the same bits (``q_w``, ``s_w``, ``q_w_t``)
and times them per weight shape of a model:

    A  all-gather float32 shards (FSDP2 today, no MixedPrecisionPolicy), quantize the full W
    A' all-gather bf16 shards (``param_dtype=bf16``), quantize
    B  quantize the shard (q and scale), all-gather FP8 bytes + scales, transpose q

Run under torchrun, one process per GPU (NCCL), or on CPU with gloo (``--device cpu``: the
reference quantizer; a correctness check, its times mean nothing)::

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_allgather.py --model 1.3b
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_allgather.py --device cpu --check
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from fp4train.distributed import _all_gather_single, init_from_env
from fp4train.model import get_config


def _quantizer(device: torch.device):
    if device.type == "cuda":
        from fp4train.kernels.quantize import quantize_rows
    else:
        from fp4train.kernels.reference import quantize_rows
    return quantize_rows


def _gather(shard: torch.Tensor, world: int) -> torch.Tensor:
    out = shard.new_empty((world * shard.shape[0], *shard.shape[1:]))
    _all_gather_single(out, shard.contiguous(), None, False)
    return out


def gather_then_quantize(shard: torch.Tensor, world: int, quantize_rows):
    """(q_w [N, K], s_w [N], q_w_t [K, N]) from the full W gathered in the shard's dtype."""
    q, s, q_t, _ = quantize_rows(_gather(shard, world), "e2m1", store_q=True, store_qt=True)
    return q, s, q_t


def quantize_then_gather(shard: torch.Tensor, world: int, quantize_rows):
    """The same three tensors: each rank quantizes its rows, FP8 bytes and scales gathered."""
    q, s, _, _ = quantize_rows(shard, "e2m1", store_q=True)
    n = shard.shape[0]
    q_full = _gather(q[:n].view(torch.uint8), world).view(q.dtype)
    s_full = _gather(s[:n], world)
    return q_full, s_full, q_full.t().contiguous()


def _shapes(model: str) -> list[tuple[str, int, int]]:
    c = get_config(model, vocab_size=32000)
    d, f = c.dim, c.ffn_dim
    return [("wqkv", 3 * d, d), ("wo", d, d), ("w13", 2 * f, d), ("w2", d, f)]


def _time_ms(fn, device: torch.device, iters: int = 20) -> float:
    times = []
    for _ in range(iters + 3):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[3:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1.3b")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--check", action="store_true", help="check the bits only (small shapes)")
    args = p.parse_args(argv)
    rank, world, _, device = init_from_env(args.device)
    qr = _quantizer(device)
    shapes = _shapes(args.model) if not args.check else [("small", 96, 64), ("odd", 48, 80)]
    rows = []
    for name, n, k in shapes:
        if n % world:
            raise ValueError(f"{name}: {n} rows do not split over {world} ranks")
        g = torch.Generator(device=device).manual_seed(1234 + rank)
        shard = torch.randn(n // world, k, device=device, generator=g) * 0.02
        a = gather_then_quantize(shard, world, qr)
        b = quantize_then_gather(shard, world, qr)
        for what, x, y in zip(("q_w", "s_w", "q_w_t"), a, b, strict=True):
            if x.dtype != torch.float32:
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            if not torch.equal(x, y):
                raise AssertionError(f"{name} {what}: the two orders differ (rank {rank})")
        if args.check:
            continue
        bf = shard.bfloat16()
        t_a = _time_ms(lambda shard=shard: gather_then_quantize(shard, world, qr), device)
        t_a16 = _time_ms(lambda bf=bf: gather_then_quantize(bf, world, qr), device)
        t_b = _time_ms(lambda shard=shard: quantize_then_gather(shard, world, qr), device)
        rows.append((name, n, k, t_a, t_a16, t_b))
    if rank == 0:
        print(f"same bits both ways: {', '.join(s[0] for s in shapes)} ({world} ranks, {device})")
        if rows:
            print(f"\n{args.model}, {world} ranks, ms per weight (median of 20)\n")
            print("| weight | N x K | A: gather fp32, quantize | A': gather bf16, quantize "
                  "| B: quantize, gather FP8 | A / B |")  # fmt: skip
            print("|---|---|---|---|---|---|")
            for name, n, k, t_a, t_a16, t_b in rows:
                print(f"| {name} | {n}x{k} | {t_a:.3f} | {t_a16:.3f} | {t_b:.3f} | "
                      f"{t_a / t_b:.2f} |")  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
