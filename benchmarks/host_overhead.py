"""Host (Python + launch) time of each piece of FP4Linear's triton path, on tiny tensors.

At 8192x4096x4096 an fp4-dge fwd+bwd needs about 1.1 ms of GPU work but the host needs about
1.5 ms to issue it, so the layer is host-bound (benchmarks/NOTES.md). This times each piece
alone, in a loop over tiny tensors where the GPU idles: a Triton launch through its JIT
binder and through the compiled kernel's own launcher, torch ops, our launchers, the two
halves of the layer and the whole autograd fwd+bwd. Microseconds per call, medians of 5 runs,
with ``fp4train.kernels.launch``'s direct launches (``fast_us``) and with the JIT's (``jit_us``);
then a cProfile of the fp4-dge fwd+bwd, by cumulative time, to $OUT/host_profile.txt if $OUT is
set. Usage: python benchmarks/host_overhead.py
"""

import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import triton

from fp4train import kernels
from fp4train.bench import format_table
from fp4train.kernels import launch as kl
from fp4train.kernels import quantize as kq
from fp4train.kernels.dge import dge_weight_grad
from fp4train.kernels.linear import scaled_mm_rowwise
from fp4train.linear import FP4Linear
from fp4train.recipe import Recipe

DEV = "cuda"


def _us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def pieces() -> list[dict]:
    m, k, n = 64, 256, 256
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV)
    dy = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    src = torch.zeros(m, k, device=DEV, dtype=torch.uint8)
    dst = torch.zeros(k, m, device=DEV, dtype=torch.uint8)
    rows = []

    def add(what, fn):
        try:
            rows.append(dict(piece=what, us=_us(fn)))
        except Exception as e:  # a piece this torch/Triton cannot run: said, not raised
            rows.append(dict(piece=f"{what} ({type(e).__name__}: {str(e)[:80]})", us=float("nan")))

    add("torch.empty", lambda: torch.empty(m, k, device=DEV))
    add("torch add (one launch)", lambda: x + 1)
    add("triton launch via JIT (transpose)", lambda: kq.transpose_bytes(src, dst))
    grid = (triton.cdiv(m, 64), triton.cdiv(k, 64))
    ck = kq._transpose_kernel[grid](src, dst, m, k, BLOCK_R=64, BLOCK_C=64, num_warps=4)
    stream = torch.cuda.current_stream().cuda_stream
    meta = ck.launch_metadata(grid, stream, src, dst, m, k, 64, 64)

    def direct():
        ck.run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, meta, None, None,
               src, dst, m, k, 64, 64)  # fmt: skip

    add("triton launch via CompiledKernel.run (transpose)", direct)
    s_w = torch.rand(n, device=DEV) + 0.1
    s_x = torch.rand(m, device=DEV) + 0.1
    add("quantize_rows X bf16, both layouts", lambda: kq.quantize_rows(x, "e2m1", store_qt=True))
    add("quantize_rows W fp32, both layouts", lambda: kq.quantize_rows(w, "e2m1", store_qt=True))
    add("quantize_rowwise_and_colwise dY",
        lambda: kq.quantize_rowwise_and_colwise(dy, "e5m2", "e5m2", s_w, s_x))  # fmt: skip
    q_x, sx, _, _ = kq.quantize_rows(x, "e2m1")
    q_w, sw, _, _ = kq.quantize_rows(w, "e2m1")
    add("scaled_mm_rowwise", lambda: scaled_mm_rowwise(q_x, q_w, sx, sw))
    add("torch._scaled_mm", lambda: torch._scaled_mm(q_x, q_w.t(), scale_a=sx.reshape(-1, 1),
                                                     scale_b=sw.reshape(1, -1),
                                                     out_dtype=torch.bfloat16))  # fmt: skip
    dw = torch.randn(n, k, device=DEV)
    add("dge_weight_grad", lambda: dge_weight_grad(dw, w, sw, "e2m1", 5.0, 3.0))
    for name in ("fp4-dge", "fp4-paper"):
        rec = Recipe.preset(name).replace(backend="triton")
        add(f"check_supported ({name})", lambda rec=rec: kernels.check_supported(rec, k, n))
        add(f"linear_forward ({name})", lambda rec=rec: kernels.linear_forward(x, w, rec))
        _, saved = kernels.linear_forward(x, w, rec)
        add(
            f"linear_backward ({name})",
            lambda r=rec, s=saved: kernels.linear_backward(s, dy, w, r, 1, 1),
        )
        layer = FP4Linear(k, n, bias=False, device=DEV, recipe=rec)
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            add(f"FP4Linear forward, no grad ({name})", lambda f=layer: f(x))
        add(f"FP4Linear forward, grad on, no backward ({name})", lambda f=layer, xg=xg: f(xg))
        add(f"FP4Linear fwd+bwd ({name})",
            lambda f=layer, xg=xg: torch.autograd.grad(f(xg), (xg, f.weight), dy))  # fmt: skip
    lin = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    add("nn.Linear bf16 fwd+bwd", lambda: torch.autograd.grad(lin(xg), (xg, lin.weight), dy))

    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 1

        @staticmethod
        def backward(ctx, g):
            return g * 1

    add("identity autograd.Function fwd+bwd", lambda: torch.autograd.grad(Ident.apply(xg), xg, dy))
    # fp4-dge's backward run by the autograd engine (its device thread) instead of directly:
    # session 11 found the whole fwd+bwd ≈ 0.8 ms slower than the two halves called directly
    rec = Recipe.preset("fp4-dge").replace(backend="triton")
    _, saved = kernels.linear_forward(x, w, rec)

    class EngineBwd(Ident):
        @staticmethod
        def backward(ctx, g):
            kernels.linear_backward(saved, dy, w, rec, True, True)
            return g

    add("linear_backward (fp4-dge) from an autograd backward",
        lambda: torch.autograd.grad(EngineBwd.apply(xg), xg, dy))  # fmt: skip
    return rows


def profile(name: str = "fp4-dge", iters: int = 300) -> str:
    rec = Recipe.preset(name).replace(backend="triton")
    layer = FP4Linear(256, 256, bias=False, device=DEV, recipe=rec)
    x = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    for _ in range(20):
        torch.autograd.grad(layer(x), (x, layer.weight), dy)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        torch.autograd.grad(layer(x), (x, layer.weight), dy)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(60)
    return out.getvalue()


def main() -> None:
    fast = pieces()
    kl.FAST_LAUNCH = False
    try:
        jit = pieces()
    finally:
        kl.FAST_LAUNCH = True
    rows = [
        dict(piece=a["piece"], fast_us=a["us"], jit_us=b["us"])
        for a, b in zip(fast, jit, strict=True)
    ]
    print(format_table(rows))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "host_profile.txt"), "w") as f:
            f.write(profile())


if __name__ == "__main__":
    main()
