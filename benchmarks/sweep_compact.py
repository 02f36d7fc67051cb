"""What keeping OCC's R by its nonzeros costs (session 14): the pieces at the 1.3B model's
layer inputs (8192 tokens × 2048 / 5632 features, R nonzero on ≈ 2% of the entries, as the
thresholds at α = 0.99 leave it), each timed as GPU time (CUDA-graph replay), and a whole
FP4Linear fp4-paper fwd+bwd eagerly with R kept compact and full width (wall time).

Usage: python benchmarks/sweep_compact.py
"""

import os
import time

import torch

from fp4train.bench import _gpu_ms, format_table
from fp4train.kernels import linear as klin
from fp4train.kernels import occ as kocc
from fp4train.linear import FP4Linear
from fp4train.train import parse_recipe


def wall_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in [(2048, 2048), (5632, 2048), (2048, 5632)]:
        m = 8192
        r = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        r[torch.rand(m, k, device="cuda", generator=g) < 0.98] = 0
        ends = kocc.count_nonzeros(r)
        nnz = int(ends[-1])
        vals, idx = kocc.pack_nonzeros(r, ends, nnz)
        base = dict(shape=f"{m}x{k}", nnz=nnz)
        cfg0 = dict(kocc.NZ_CONFIG)
        for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]:
            kocc.NZ_CONFIG.update(BLOCK=block, num_warps=warps)
            e = kocc.count_nonzeros(r)
            same = torch.equal(kocc.pack_nonzeros(r, e, nnz)[1], idx)
            for what, fn in [
                ("count", lambda r=r: kocc.count_nonzeros(r)),
                ("pack", lambda r=r, e=e, c=nnz: kocc.pack_nonzeros(r, e, c)),
            ]:
                rows.append(dict(base, what=f"{what} {block} w{warps} same={same}",
                                 ms=_gpu_ms(fn)))  # fmt: skip
        kocc.NZ_CONFIG.clear()
        kocc.NZ_CONFIG.update(cfg0)
        for what, fn in [
            ("count (blocks + cumsum)", lambda r=r: kocc.count_nonzeros(r)),
            ("pack", lambda r=r, e=ends, c=nnz: kocc.pack_nonzeros(r, e, c)),
            (
                "unpack (zeros + scatter)",
                lambda v=vals, i=idx, s=r.shape: kocc.unpack_nonzeros(v, i, s),
            ),
            ("torch.count_nonzero", lambda r=r: torch.count_nonzero(r)),
        ]:
            rows.append(dict(base, what=what, ms=_gpu_ms(fn)))
        # a whole layer, eagerly: R compact vs full width
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16().requires_grad_()
        dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        for rec in ("fp4-paper", "fp4-paper[occ.compensation=e4m3]"):
            layer = FP4Linear(k, n, bias=False, device="cuda", recipe=parse_recipe(rec))
            for compact in (True, False):
                klin.COMPACT_RESIDUAL = compact

                def step(layer=layer, x=x, dy=dy):
                    layer(x).backward(dy)

                ms = wall_ms(step)
                kept = "compact" if compact else "full"
                rows.append(dict(base, what=f"{rec} fwd+bwd, R {kept}", ms=ms))
            klin.COMPACT_RESIDUAL = True
    print(format_table(rows))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
