"""Sweep of OCC's column compensation (``fp4train.kernels.occ``, ``occ.compensation="columns"``)
at M = 8192, K = N = 4096 on activations with outlier channels (the +chan data of ``bench
linear``: 3% of the channels 20x larger; 122 outlier columns at the tensor-wise thresholds):
the outlier-column search, the packing of R with and without the zero fill, the two products
under each launch configuration (GPU time of a CUDA-graph replay; ``max_rel`` the largest
difference from the first configuration's (the default before session 11), relative to the
output's largest magnitude: a different summation order, not an error), and the dense cuBLAS
products they replace. Session 11's run chose the defaults (benchmarks/RESULTS.md).
Usage: python benchmarks/sweep_columns.py
"""

import torch

from fp4train.bench import _activations, _median_ms_graphed, format_table
from fp4train.kernels import occ as kocc
from fp4train.kernels import quantize as kq

FWD = [  # COLUMNS_FWD_CONFIG candidates
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8),
]
WGRAD = [  # COLUMNS_WGRAD_CONFIG candidates
    dict(BLOCK_N=128, BLOCK_K=64, BLOCK_M=64, num_warps=8),
    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=64, num_warps=4),
    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=128, num_warps=4),
    dict(BLOCK_N=64, BLOCK_K=32, BLOCK_M=128, num_warps=4),
    dict(BLOCK_N=32, BLOCK_K=64, BLOCK_M=128, num_warps=4),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def sweep(m: int = 8192, k: int = 4096, n: int = 4096) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dist in ("chan", "gaussian"):
        _sweep_data(dist, gen, m, k, n, rows)
    return rows


def _sweep_data(dist, gen, m, k, n, rows) -> None:
    x = _activations(m, k, dist, gen)
    lo, hi = kocc.occ_thresholds(x, 0.99, "tensor")
    resid = kq.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True)[3]
    order, cnt = kocc.outlier_columns(resid)
    c = int(cnt)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    y = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    dw = torch.randn(n, k, device="cuda", generator=gen)
    tag = f"{dist}, {c}/{k} columns"

    def add(step, fn, max_rel=float("nan"), tag=tag):
        rows.append(dict(data=tag, step=step, ms=_median_ms_graphed(fn), max_rel=max_rel))

    add("outlier_columns", lambda: kocc.outlier_columns(resid))
    for zero in (True, False):
        add(f"gather R, zero_rest={zero}",
            lambda z=zero: kocc.gather_columns(resid, order, cnt, zero_rest=z))  # fmt: skip
    r_c = kocc.gather_columns(resid, order, cnt)
    add("dense fwd: addmm (cuBLAS)", lambda: kocc.occ_compensate(y, resid, w))
    add("dense wgrad: dW += dYᵀ R (cuBLAS)",
        lambda: kocc.occ_compensate_wgrad(dw, dy, resid))  # fmt: skip
    cfg0 = dict(kocc.COLUMNS_FWD_CONFIG)
    try:
        want = None
        for cfg in FWD:
            kocc.COLUMNS_FWD_CONFIG = cfg
            got = kocc.occ_compensate_columns(y.clone(), r_c, w, order, cnt)  # in place
            want = got if want is None else want
            add(f"fwd {cfg}", lambda: kocc.occ_compensate_columns(y, r_c, w, order, cnt),
                _rel(got, want))  # fmt: skip
    finally:
        kocc.COLUMNS_FWD_CONFIG = cfg0
    cfg0 = dict(kocc.COLUMNS_WGRAD_CONFIG)
    try:
        want = None
        for cfg in WGRAD:
            kocc.COLUMNS_WGRAD_CONFIG = cfg
            got = kocc.occ_compensate_columns_wgrad(dw.clone(), dy, r_c, order, cnt) - dw
            want = got if want is None else want
            add(f"wgrad {cfg}",
                lambda: kocc.occ_compensate_columns_wgrad(dw, dy, r_c, order, cnt),
                _rel(got, want))  # fmt: skip
    finally:
        kocc.COLUMNS_WGRAD_CONFIG = cfg0


if __name__ == "__main__":
    print(format_table(sweep()))
