"""The quantizers FP4Linear uses under torch.compile (``fp4train.kernels.traced``) against
the Triton kernels, on one GPU.

``exact``: each traced quantizer compiled by Inductor vs the kernel on [8192, 4096] data:
elements that differ (0 expected) and times, then RMSNorm fused with the quantization vs
RMSNorm followed by the kernel. ``step``: the 1.3B training step compiled, bf16, fp4-dge with
the traced quantizers, fp4-dge with the kernels (``FP4TRAIN_COMPILE_KERNELS=1``); each compile
takes minutes. Usage: python benchmarks/bench_compile_quant.py [exact|step|all]
"""

import os
import sys
import time

import torch

from fp4train.bench import _median_ms, bench_step
from fp4train.kernels import quantize as kq
from fp4train.kernels import traced

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _wide(m, k, dtype):
    x = torch.randn(m, k, device="cuda")
    x = x * torch.exp2(torch.randint(-6, 6, (m, k), device="cuda").float())
    x[1, :5] = torch.tensor([0.25, 0.75, 1.25, 5.0, 6.0])  # E2M1 ties
    return x.to(dtype)


def _differ(got, want) -> list[str]:
    out = []
    for a, b in zip(got, want, strict=True):
        if a.dtype in FP8:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        out.append(f"{int((a != b).sum())}/{a.numel()}")
    return out


def exact(m: int = 8192, k: int = 4096) -> None:
    for dtype, fmt in [(torch.bfloat16, "e2m1"), (torch.float32, "e2m1"), (torch.bfloat16, "e4m3")]:
        x = _wide(m, k, dtype)
        f = torch.compile(lambda x, fmt=fmt: traced.quantize_rows(x, fmt, store_qt=True))
        kern = lambda x=x, fmt=fmt: kq.quantize_rows(x, fmt, store_qt=True)  # noqa: E731
        t_c, t_k = _median_ms(lambda f=f, x=x: f(x)), _median_ms(kern)
        diff = _differ(f(x)[:3], kern()[:3])
        print(f"rows {dtype} {fmt}: differ {diff}, compiled {t_c:.3f} ms, kernel {t_k:.3f} ms")
    dy = _wide(m, k, torch.bfloat16)
    s_w, s_x = torch.rand(k, device="cuda") + 0.01, torch.rand(m, device="cuda") * 3
    f = torch.compile(lambda d: traced.quantize_rowwise_and_colwise(d, "e5m2", "e5m2", s_w, s_x))
    kern = lambda: kq.quantize_rowwise_and_colwise(dy, "e5m2", "e5m2", s_w, s_x)  # noqa: E731
    t_c, t_k = _median_ms(lambda: f(dy)), _median_ms(kern)
    diff = _differ(f(dy), kern())
    print(f"dY both operands: differ {diff}, compiled {t_c:.3f} ms, kernel {t_k:.3f} ms")
    w = torch.rand(k, device="cuda") + 0.5

    def norm(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w).bfloat16()

    fused = torch.compile(lambda x: traced.quantize_rows(norm(x), "e2m1", store_qt=True))
    norm_c = torch.compile(norm)
    xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    then = lambda: kq.quantize_rows(norm_c(xb), "e2m1", store_qt=True)  # noqa: E731
    t_f, t_t, t_n = (_median_ms(fn) for fn in (lambda: fused(xb), then, lambda: norm_c(xb)))
    print(
        f"RMSNorm + quantize: fused {t_f:.3f} ms, norm then kernel {t_t:.3f} ms, norm alone "
        f"{t_n:.3f} ms"
    )


def step() -> None:
    for recipe, kernels in [("bf16", "0"), ("fp4-dge", "0"), ("fp4-dge", "1")]:
        os.environ["FP4TRAIN_COMPILE_KERNELS"] = kernels
        torch._dynamo.reset()
        t = time.time()
        bench_step(models=("1.3b",), recipes=(recipe,), compile=True)
        print(f"  ^ FP4TRAIN_COMPILE_KERNELS={kernels}, {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("exact", "all"):
        exact()
    if which in ("step", "all"):
        step()
