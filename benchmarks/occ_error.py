"""What each OCC compensation costs in accuracy: the relative error (Frobenius norm, against a
float64 product of the unquantized operands) of FP4Linear's output Y and weight gradient dW
(before DGE, whose factor is not an error) for fp4-occ without compensation, with the
paper's R·Wᵀ (``occ.compensation="dense"``; "columns" gives the same numbers) and with the
outliers on the E4M3 grid (``"e4m3"``), on Gaussian activations, activations with outlier
channels (3% of the channels 20x larger, as ``fp4train bench ... +chan``) and Student-t
(3 degrees of freedom) ones; also the monitor's SNR of the activation as the GEMM sees it.
The reference backend, so it runs on a CPU; one seed.

Usage: python benchmarks/occ_error.py [--m 1024 --k 1024 --n 1024]
"""

import argparse

import torch

from fp4train.bench import format_table
from fp4train.linear import reference_backward, reference_forward
from fp4train.monitor import activation_stats
from fp4train.recipe import Recipe

VARIANTS = {
    "no OCC (fp4-direct)": Recipe.preset("fp4-direct"),
    "clamp, no compensation": Recipe.preset("fp4-occ").replace(**{"occ.compensate": False}),
    "R·Wᵀ (paper)": Recipe.preset("fp4-occ"),
    "outliers in E4M3": Recipe.preset("fp4-occ").replace(**{"occ.compensation": "e4m3"}),
}


def activations(kind: str, m: int, k: int, g: torch.Generator) -> torch.Tensor:
    if kind == "student-t":
        x = torch.distributions.StudentT(3.0).sample((m, k))
    else:
        x = torch.randn(m, k, generator=g)
        if kind == "channels":
            x[:, torch.randperm(k, generator=g)[: k * 3 // 100]] *= 20
    return x.bfloat16()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k, generator=g) * 0.02
    dy = torch.randn(args.m, args.n, generator=g).bfloat16()
    rows = []
    for kind in ("gaussian", "channels", "student-t"):
        x = activations(kind, args.m, args.k, g)
        y_exact = x.double() @ w.double().t()
        dw_exact = dy.double().t() @ x.double()
        for name, recipe in VARIANTS.items():
            y, saved = reference_forward(x, w, recipe)
            _, dw = reference_backward(saved, dy, w, recipe, need_dx=False)
            stats = activation_stats(x, recipe)
            rows.append(
                dict(
                    data=kind,
                    compensation=name,
                    y_rel_err=((y.double() - y_exact).norm() / y_exact.norm()).item(),
                    dw_rel_err=((dw.double() - dw_exact).norm() / dw_exact.norm()).item(),
                    x_snr_db=stats["snr_db"],
                )
            )
    print(f"M x K x N = {args.m}x{args.k}x{args.n}, W ~ N(0, 0.02²), dY ~ N(0, 1)\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
