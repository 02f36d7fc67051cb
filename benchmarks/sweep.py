"""Tuning sweep (how the configs in fp4train/kernels/quantize.py were chosen) and ceilings.

Times quantize_rows / quantize_rowwise_and_colwise under several block configs, and the GEMM
ceilings (bf16 mm, FP8 row-wise _scaled_mm with e4m3 and e5m2 A, with and without fast
accumulation), at M = 8192, K = N = 4096. Prints markdown tables; see benchmarks/NOTES.md.
"""

import itertools

import torch

from fp4train.bench import _copy_gbps, _median_ms, format_table
from fp4train.kernels import quantize as kq


def ceilings(m=8192, k=4096, n=4096):
    rows = [dict(op="copy (bf16 64 MiB)", ms=0.0, rate=_copy_gbps(m * k * 2), unit="GB/s")]
    a = torch.randn(m, k, device="cuda").bfloat16()
    b = torch.randn(n, k, device="cuda").bfloat16()
    ms = _median_ms(lambda: a @ b.t())
    rows.append(dict(op="bf16 mm", ms=ms, rate=2 * m * n * k / ms / 1e9, unit="TFLOP/s"))
    sa = torch.rand(m, 1, device="cuda")
    sb = torch.rand(1, n, device="cuda")
    b8 = b.to(torch.float8_e4m3fn)
    for a_dtype, fast in itertools.product((torch.float8_e4m3fn, torch.float8_e5m2), (False, True)):
        a8 = a.to(a_dtype)
        try:
            fn = lambda a8=a8, fast=fast: torch._scaled_mm(  # noqa: E731
                a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast
            )
            fn()
            ms = _median_ms(fn)
            rate = 2 * m * n * k / ms / 1e9
        except RuntimeError as e:
            ms, rate = float("nan"), str(e).splitlines()[0][:60]
        rows.append(
            dict(
                op=f"_scaled_mm rowwise {a_dtype} x e4m3 fast={fast}",
                ms=ms,
                rate=rate,
                unit="TFLOP/s",
            )
        )
    try:
        torch._scaled_mm(
            b8[:64], b8[:64].t(), scale_a=sa[:64], scale_b=sb[:, :64], out_dtype=torch.float32
        )
        f32 = "accepted"
    except RuntimeError as e:
        f32 = str(e).splitlines()[0][:80]
    rows.append(dict(op="_scaled_mm rowwise out_dtype=float32", ms=0.0, rate=f32, unit=""))
    return rows


def sweep(m=8192, k=4096, n=4096):
    x = torch.randn(m, k, device="cuda").bfloat16()
    w = torch.randn(n, k, device="cuda")
    dy = torch.randn(m, n, device="cuda").bfloat16()
    s_w = torch.rand(n, device="cuda") + 0.5
    s_x = torch.rand(m, device="cuda") + 0.5
    copy = _copy_gbps(m * k * 2)
    cases = [  # name, fn, bytes read + written once
        ("X bf16 both layouts", lambda: kq.quantize_rows(x, "e2m1", store_qt=True), m * k * 4),
        ("W fp32 both layouts", lambda: kq.quantize_rows(w, "e2m1", store_qt=True), n * k * 6),
        ("dY both operands",
         lambda: kq.quantize_rowwise_and_colwise(dy, "e5m2", "e5m2", s_w, s_x), m * n * 4),
    ]  # fmt: skip
    rows = []
    amax0, tile0 = dict(kq.AMAX_CONFIG), dict(kq.TILE_CONFIG)
    for amax in [
        dict(BLOCK_M=128, BLOCK_K=256, SUB_M=32, SUB_K=128, num_warps=8),
        dict(BLOCK_M=64, BLOCK_K=512, SUB_M=16, SUB_K=256, num_warps=8),
        dict(BLOCK_M=256, BLOCK_K=256, SUB_M=32, SUB_K=128, num_warps=8),
    ]:
        for tile in [dict(BLOCK_M=64, BLOCK_K=128, num_warps=8),
                     dict(BLOCK_M=64, BLOCK_K=64, num_warps=4),
                     dict(BLOCK_M=128, BLOCK_K=64, num_warps=8),
                     dict(BLOCK_M=32, BLOCK_K=256, num_warps=8)]:  # fmt: skip
            kq.AMAX_CONFIG.update(amax)
            kq.TILE_CONFIG.update(tile)
            for name, fn, nbytes in cases:
                ms = _median_ms(fn)
                rows.append(dict(
                    kernel=name,
                    amax=f"{amax['BLOCK_M']}x{amax['BLOCK_K']}/{amax['SUB_M']}x{amax['SUB_K']}",
                    tile=f"{tile['BLOCK_M']}x{tile['BLOCK_K']} w{tile['num_warps']}",
                    ms=ms,
                    pct_copy=100 * nbytes / ms / 1e6 / copy,
                ))  # fmt: skip
    kq.AMAX_CONFIG.update(amax0)
    kq.TILE_CONFIG.update(tile0)
    return rows


if __name__ == "__main__":
    print(format_table(ceilings()))
    print()
    print(format_table(sweep()))
