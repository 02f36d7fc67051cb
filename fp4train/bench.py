"""Speed and memory benchmarks of the triton backend (``fp4train bench ...``), on one GPU.

- ``linear``:  FP4Linear fwd+bwd per recipe vs ``nn.Linear`` in bf16, same run, same inputs.
- ``quant``:   each quantize kernel's bandwidth (bytes read + written) vs a same-size copy.
- ``profile``: where the time of one FP4Linear fwd+bwd goes, kernel by kernel.
- ``host``:    cProfile of the Python/launch side of a tiny FP4Linear fwd+bwd.
- ``step``:    tokens/s and peak memory of a full training step (fwd + bwd + AdamW) of a
               LLaMA model per recipe, bf16 autocast.
- ``memory``:  what autograd saves for backward in one forward pass of a LLaMA model per
               recipe, by dtype (parameters excluded); also on the CPU (reference backend).

Times are medians of ``triton.testing.do_bench`` (which clears L2 between runs) over rotating
inputs. Each command prints a table; ``--results FILE`` appends it, with date and device, to a
markdown file (benchmarks/RESULTS.md).

Examples::

    fp4train bench linear                      # the four LLaMA-7B shapes, M = 8192 tokens
    fp4train bench linear --shapes 4096x4096 --recipes fp8 fp4-dge
    fp4train bench quant --results benchmarks/RESULTS.md
    fp4train bench quant --shapes 4096x4096 11008x4096   # X [M, K], W [N, K], dY [M, N]
    fp4train bench step --models 125m 1.3b --batch 4 --seq 2048
    fp4train bench memory --models 1.3b --recipes bf16 fp4-dge "fp4-dge[act_save=e4m3]"
    fp4train bench all
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = [
    "bench_linear",
    "bench_quant",
    "profile_linear",
    "bench_step",
    "saved_activations",
    "main",
]

DEFAULT_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))
# "fp4-paper" on Gaussian data (every column holds outliers) and on data whose outliers sit
# in 3% of the channels, as in LLM activations ("+chan")
DEFAULT_RECIPES = ("fp8", "fp4-dge", "fp4-paper", "fp4-paper+chan")


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("fp4train bench: needs a CUDA GPU (FP8 tensor cores, sm_89+)")


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _median_ms_graphed(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: GPU time without host launch overhead.

    NaN when ``fn`` cannot be captured (a host sync).
    """
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # capture fails on host syncs; the caller reports NaN, not a crash
        torch.cuda.synchronize()
        return float("nan")


def _gpu_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn``: replayed from a CUDA graph, or launched eagerly if capture fails."""
    ms = _median_ms_graphed(fn)
    return _median_ms(fn) if math.isnan(ms) else ms


def _rotating(make: Callable[[], torch.Tensor], n: int) -> Callable[[], torch.Tensor]:
    """A function returning one of ``n`` pre-made tensors in turn."""
    pool = [make() for _ in range(n)]
    state = [0]

    def nxt() -> torch.Tensor:
        state[0] = (state[0] + 1) % n
        return pool[state[0]]

    return nxt


def _activations(m: int, k: int, dist: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, device="cuda", generator=gen)
    if dist == "chan":  # a few channels 20x larger, as LLM activations have
        idx = torch.randperm(k, device="cuda", generator=gen)[: max(k * 3 // 100, 1)]
        x[:, idx] *= 20
    return x.to(torch.bfloat16)


def _split_recipe(spec: str) -> tuple[str, str]:
    name, _, dist = spec.partition("+")
    return name, dist or "gaussian"


def bench_linear(
    shapes=DEFAULT_SHAPES,
    recipes=DEFAULT_RECIPES,
    m: int = 8192,
    rotate: int = 3,
    cuda_graph: bool = False,
) -> list[dict]:
    """FP4Linear fwd+bwd time per (shape, recipe) vs bf16 ``nn.Linear``, in one run.

    ``recipes`` are preset names, optionally with ``[key=value,...]`` overrides and ``+chan``
    (activations with outlier channels instead of Gaussian), e.g.
    ``"fp4-paper[occ.compensation=columns]+chan"``. Returns one row per (shape, recipe) with
    ms, TFLOP/s (6·M·K·N per fwd+bwd) and speed-up over bf16. ``cuda_graph`` adds ``graph_ms`` and
    ``graph_speedup``: the same fwd+bwd replayed from a CUDA graph (bf16 too), i.e. the GPU
    time without Python and launch overhead (NaN where capture fails).
    """
    from fp4train.linear import FP4Linear
    from fp4train.train import parse_recipe

    _require_cuda()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in shapes:
        flops = 6 * m * k * n
        base = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        results = {}
        for spec in ("bf16", *recipes):
            name, dist = _split_recipe(spec)
            xs = _rotating(lambda k=k, d=dist: _activations(m, k, d, gen).requires_grad_(), rotate)
            dys = _rotating(
                lambda n=n: torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen),
                rotate,
            )
            if name == "bf16":
                layer = base
            else:
                recipe = parse_recipe(name).replace(backend="triton")
                layer = FP4Linear(k, n, bias=False, device="cuda", recipe=recipe)
                with torch.no_grad():
                    layer.weight.copy_(base.weight.float())

            def fwd_bwd(layer=layer, xs=xs, dys=dys):
                x = xs()
                y = layer(x)
                torch.autograd.grad(y, (x, layer.weight), dys())

            ms = _median_ms(fwd_bwd)
            results[spec] = ms
            row = dict(
                shape=f"{m}x{k}x{n}",
                recipe=spec,
                ms=ms,
                tflops=flops / ms / 1e9,
                speedup=results["bf16"] / ms,
            )
            if cuda_graph:
                gms = _median_ms_graphed(fwd_bwd)
                results[spec + ":graph"] = gms
                row.update(graph_ms=gms, graph_speedup=results["bf16:graph"] / gms)
            rows.append(row)
        del base
        torch.cuda.empty_cache()
    return rows


def _copy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def bench_quant(m: int = 8192, k: int = 4096, n: int = 4096) -> list[dict]:
    """Bandwidth of each quantize kernel at an [m, k] activation / [n, k] weight / [m, n] dY,
    as a fraction of a same-size device copy's (bytes read + written). ``ms`` is the GPU time,
    replayed from a CUDA graph (a kernel's bandwidth, without the host's launch time, which on
    a slow host exceeds a small kernel's); ``eager_ms`` the same calls launched one by one."""
    from fp4train.kernels import dge as kdge
    from fp4train.kernels import occ as kocc
    from fp4train.kernels import quantize as kq

    _require_cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = _rotating(lambda: _activations(m, k, "gaussian", gen), 3)
    w = _rotating(lambda: torch.randn(n, k, device="cuda", generator=gen) * 0.02, 3)
    dy = _rotating(lambda: torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16), 3)
    s_w = torch.rand(n, device="cuda", generator=gen) + 0.5
    s_x = torch.rand(m, device="cuda", generator=gen) + 0.5
    lo = torch.tensor([-2.5], device="cuda")
    hi = torch.tensor([2.5], device="cuda")
    dw = _rotating(lambda: torch.randn(n, k, device="cuda", generator=gen).bfloat16(), 3)
    # bytes: each input read once and each output written once (the floor)
    cases = [
        (
            "X bf16 -> e2m1 per row, both layouts",
            lambda: kq.quantize_rows(x(), "e2m1", store_qt=True),
            m * k * (2 + 2) + 4 * m,
        ),
        (
            "X bf16 -> e2m1 per row, both layouts, OCC clamp",
            lambda: kq.quantize_rows(x(), "e2m1", lo=lo, hi=hi, store_qt=True),
            m * k * (2 + 2 + 2) + 4 * m,  # and the bf16 residual R
        ),
        (
            "W fp32 -> e2m1 per row, both layouts",
            lambda: kq.quantize_rows(w(), "e2m1", store_qt=True),
            n * k * (4 + 2) + 4 * n,
        ),
        (
            "dY bf16 -> e5m2 per row (s_w folded) + per col (s_x folded, transposed)",
            lambda: kq.quantize_rowwise_and_colwise(dy(), "e5m2", "e5m2", s_w, s_x),
            m * n * (2 + 2) + 8 * (m + n),
        ),
        (
            "DGE: dW bf16, W fp32 -> dW fp32",
            lambda: kdge.dge_weight_grad(dw(), w(), s_w, "e2m1", 5.0, 3.0),
            n * k * (2 + 4 + 4),
        ),
        (
            "OCC thresholds (tensor, 1M sample)",
            lambda: kocc.occ_thresholds(x(), 0.99, "tensor"),
            2 * (m * k) // 32,
        ),
        ("OCC thresholds (per row)", lambda: kocc.occ_thresholds(x(), 0.99, "row"), 2 * m * k),
    ]
    copy = _copy_gbps(m * k * 2)
    rows = [
        dict(
            kernel="copy (bf16, same bytes as X)",
            ms=2 * m * k * 2 / copy / 1e6,
            gbps=copy,
            pct_copy=100.0,
            eager_ms=float("nan"),
        )
    ]
    for name, fn, nbytes in cases:
        eager = _median_ms(fn)
        ms = _gpu_ms(fn)
        gbps = nbytes / ms / 1e6
        rows.append(dict(kernel=name, ms=ms, gbps=gbps, pct_copy=100 * gbps / copy, eager_ms=eager))
    return rows


def profile_linear(
    k: int = 4096, n: int = 4096, m: int = 8192, recipe: str = "fp4-dge"
) -> list[dict]:
    """GPU time of each kernel of one FP4Linear fwd+bwd (triton backend), each replayed from a
    CUDA graph, and the host (Python + launch) time of a whole fwd+bwd on a tiny layer, where
    the GPU idles.
    ``recipe``: a spec as for :func:`bench_linear` (overrides, ``+chan``)."""
    from fp4train.kernels import dge as kdge
    from fp4train.kernels import linear as klin
    from fp4train.kernels import occ as kocc
    from fp4train.kernels import quantize as kq
    from fp4train.train import parse_recipe

    _require_cuda()
    name, dist = _split_recipe(recipe)
    r = parse_recipe(name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = _activations(m, k, dist, gen)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    dy = torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)
    fx, fw = r.fwd_x.format, r.fwd_w.format
    fdy, fdy2 = r.dgrad_dy.format, r.wgrad_dy.format
    lo = hi = None
    if r.occ is not None:
        lo, hi = kocc.occ_thresholds(x, r.occ.alpha, r.occ.granularity)
    out8 = r.occ is not None and r.occ.compensate and r.occ.compensation == "e4m3"
    q_x, s_x, q_x_t, resid = kq.quantize_rows(x, fx, lo=lo, hi=hi, store_qt=True,
                                              outliers_e4m3=out8)  # fmt: skip
    q_w, s_w, q_w_t, _ = kq.quantize_rows(w, fw, store_qt=True)
    q_dy, s_dy, q_dy2_t, s_dy2 = kq.quantize_rowwise_and_colwise(dy, fdy, fdy2, s_w, s_x)
    dw32 = klin.scaled_mm_rowwise(q_dy2_t, q_x_t, s_dy2, None, torch.float32)
    steps = []
    if r.occ is not None:
        steps.append(
            ("OCC thresholds", lambda: kocc.occ_thresholds(x, r.occ.alpha, r.occ.granularity))
        )
    steps += [
        ("quantize X (both layouts)" + (", outliers in E4M3" if out8 else ""),
         lambda: kq.quantize_rows(x, fx, lo=lo, hi=hi, store_qt=True, outliers_e4m3=out8)),
        ("quantize W (both layouts)", lambda: kq.quantize_rows(w, fw, store_qt=True)),
        ("fwd GEMM (_scaled_mm)", lambda: klin.scaled_mm_rowwise(q_x, q_w, s_x, s_w)),
    ]  # fmt: skip
    if r.occ is not None and r.occ.compensate:
        y = klin.scaled_mm_rowwise(q_x, q_w, s_x, s_w)
        if r.occ.compensation in ("columns", "e4m3"):
            # e4m3: resid flags the columns holding a part beyond E4M3's range, gathered from x
            src, find, scale = (
                (x, kocc.order_columns, s_x) if out8 else (resid, kocc.outlier_columns, None)
            )
            what = "OCC order + gather beyond E4M3" if out8 else "OCC outlier columns + pack R"
            pack = lambda: kocc.gather_columns(src, *find(resid), scale=scale,
                                               zero_rest=r.act_save is not None)  # fmt: skip
            order, cnt = find(resid)
            r_c = pack()
            steps += [
                (what, pack),
                (f"OCC fwd compensation ({int(cnt)}/{k} columns)",
                 lambda: kocc.occ_compensate_columns(y, r_c, w, order, cnt)),
                ("OCC wgrad compensation (columns)",
                 lambda: kocc.occ_compensate_columns_wgrad(dw32, dy, r_c, order, cnt)),
            ]  # fmt: skip
        else:
            steps += [
                (f"OCC fwd compensation ({int((resid != 0).sum()) / resid.numel():.2%} "
                 "nonzero)", lambda: kocc.occ_compensate(y, resid, w)),
                ("OCC wgrad compensation", lambda: kocc.occ_compensate_wgrad(dw32, dy, resid)),
            ]  # fmt: skip
    steps += [
        ("quantize dY (both operands)",
         lambda: kq.quantize_rowwise_and_colwise(dy, fdy, fdy2, s_w, s_x)),
        ("dgrad GEMM (_scaled_mm)", lambda: klin.scaled_mm_rowwise(q_dy, q_w_t, s_dy, None)),
        ("wgrad GEMM (_scaled_mm, fp32 out)",
         lambda: klin.scaled_mm_rowwise(q_dy2_t, q_x_t, s_dy2, None, torch.float32)),
    ]  # fmt: skip
    if r.dge is not None:
        steps.append(("DGE pass", lambda: kdge.dge_weight_grad(dw32, w, s_w, fw, 5.0, 3.0)))
    rows = [dict(step=name, ms=_gpu_ms(fn)) for name, fn in steps]
    total = sum(r_["ms"] for r_ in rows)
    for r_ in rows:
        r_["pct"] = 100 * r_["ms"] / total
    rows.append(dict(step="sum of the kernels", ms=total, pct=100.0))
    for spec in ("bf16", name):
        rows.append(dict(step=f"host time of a fwd+bwd, {spec}, 64x256x256 layer",
                         ms=_host_ms(spec), pct=float("nan")))  # fmt: skip
    return rows


def _tiny_fwd_bwd(recipe: str) -> Callable[[], object]:
    """fwd+bwd of a 64x256x256 layer (bf16 ``nn.Linear`` or FP4Linear on the triton path),
    warmed up: its wall time is Python and launch overhead, not GPU work."""
    from fp4train.linear import FP4Linear
    from fp4train.train import parse_recipe

    _require_cuda()
    if recipe == "bf16":
        layer = nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    else:
        rec = parse_recipe(recipe).replace(backend="triton")
        layer = FP4Linear(256, 256, bias=False, device="cuda", recipe=rec)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        return torch.autograd.grad(layer(x), (x, layer.weight), dy)

    for _ in range(10):
        fwd_bwd()
    torch.cuda.synchronize()
    return fwd_bwd


def profile_host(recipe: str = "fp4-dge", iters: int = 100, top: int = 25) -> str:
    """cProfile of the host side of fwd+bwd of a tiny FP4Linear: where the launch time goes."""
    import cProfile
    import io
    import pstats

    fwd_bwd = _tiny_fwd_bwd(recipe)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _host_ms(recipe: str, iters: int = 200) -> float:
    """Wall time per fwd+bwd of a tiny layer: Python and launch overhead, not GPU work."""
    import time

    fwd_bwd = _tiny_fwd_bwd(recipe)
    t = time.perf_counter()
    for _ in range(iters):
        fwd_bwd()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def _graphed_step(fwd, opt, idx):
    """The training step captured in one CUDA graph (PyTorch's whole-network capture recipe);
    returns its ``replay``, or None when capture fails (a host sync in the step)."""

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = fwd(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except Exception as e:  # reported as a NaN row
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.synchronize()
        return None
    return graph.replay


def bench_step(
    models=("125m", "1.3b"),
    recipes=("bf16", "fp4-dge", "fp4-paper"),
    batch: int = 4,
    seq: int = 2048,
    steps: int = 10,
    compile: bool = False,
    optimizers=("adamw",),
    cuda_graph: bool = False,
) -> list[dict]:
    """Tokens/s and peak memory of a training step (fwd + bwd + optimizer, bf16 autocast).

    ``optimizers``: ``"adamw"`` (torch's fused AdamW, float32 states) and/or ``"adamw-lp"``
    (:class:`fp4train.optim.LowPrecisionAdamW`: FP8 first moment, FP16 second).
    ``cuda_graph``: capture the whole step (fwd, bwd, fused AdamW with ``capturable=True``) in
    one CUDA graph and time its replays: the GPU time without Python and launch overhead.
    Needs ``"adamw"``; a step that cannot be captured (a host sync) gives a NaN row. (A
    stochastic-rounding recipe captures, but its Philox seeds are frozen in the graph.)
    ``compile``: each transformer block compiled (:func:`fp4train.model.compile_blocks`).
    """
    from fp4train.model import compile_blocks
    from fp4train.optim import LowPrecisionAdamW

    _require_cuda()
    for o in optimizers:
        if o not in ("adamw", "adamw-lp"):
            raise ValueError(f"optimizer must be adamw or adamw-lp, got {o!r}")
        if cuda_graph and o != "adamw":
            raise ValueError(f"cuda_graph needs the capturable fused AdamW ('adamw'), not {o!r}")
    rows = []
    for model_name in models:
        base_tps = None
        for name, opt_name in [(r, o) for r in recipes for o in optimizers]:
            model, cfg = _bench_model(model_name, name, torch.device("cuda"))
            fwd = compile_blocks(model) if compile else model
            if opt_name == "adamw":
                opt = torch.optim.AdamW(
                    model.parameters(), lr=1e-4, fused=True, capturable=cuda_graph
                )
            else:
                opt = LowPrecisionAdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, 32000, (batch, seq + 1), device="cuda")

            def step(fwd=fwd, opt=opt, idx=idx):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fwd(idx[:, :-1], idx[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ok = True
            if cuda_graph:
                replay = _graphed_step(fwd, opt, idx)
                ok = replay is not None
                step = replay if ok else (lambda: None)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / steps if ok else float("nan")
            tps = batch * seq / ms * 1e3
            base_tps = base_tps or tps
            rows.append(
                dict(
                    model=model_name,
                    recipe=name,
                    optimizer=opt_name,
                    ms=ms,
                    tokens_per_s=tps,
                    speedup=tps / base_tps,
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                )
            )
            r = rows[-1]
            print(
                f"step {model_name} {name} {opt_name}: {r['ms']:.1f} ms, "
                f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_gib']:.1f} GiB",
                flush=True,
            )
            del model, fwd, opt, step
            torch.cuda.empty_cache()
    return rows


def saved_activations(
    models=("1.3b",),
    recipes=("bf16", "fp4-dge", "fp4-paper"),
    batch: int = 4,
    seq: int = 2048,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Bytes autograd keeps for backward after one forward pass (with the loss), per model and
    recipe: the total, per token and layer, and by dtype. Parameters are excluded (saved by
    reference, no copy); autocast's bf16 copies of the weights count (they are real memory).
    Storages are counted once however many tensors view them.

    ``device`` defaults to the GPU (bf16 autocast, the triton backend) or else the CPU
    (float32, the reference backend, which keeps FP4 grid values in float32: its numbers
    show the model's activations, not the triton path's FP8 storage). Recipes may carry
    ``[key=value]`` overrides, e.g. ``"fp4-dge[act_save=e4m3]"``.
    """
    import collections

    dev = torch.device(device) if device is not None else _default_bench_device()
    rows = []
    for model_name in models:
        for spec in recipes:
            model, cfg = _bench_model(model_name, spec, dev)
            idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen: set[int] = set()
            by_dtype: collections.Counter = collections.Counter()

            def pack(t: torch.Tensor, seen=seen, by_dtype=by_dtype, params=params):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    by_dtype[str(t.dtype).removeprefix("torch.")] += t.untyped_storage().nbytes()
                return t

            autocast = torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                loss = model(idx[:, :-1], idx[:, 1:])
            for t in _deferred_residuals(loss):  # held on FP4Linear's context, not saved
                pack(t)
            del loss
            total = sum(by_dtype.values())
            rows.append(
                dict(
                    model=model_name,
                    recipe=spec,
                    saved_gib=total / 2**30,
                    kib_per_token_layer=total / (batch * seq * cfg.n_layers) / 1024,
                    **{f"{k}_gib": v / 2**30 for k, v in sorted(by_dtype.items())},
                )
            )
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    keys = sorted({k for r in rows for k in r if k.endswith("_gib") and k != "saved_gib"})
    first = ("model", "recipe", "saved_gib", "kib_per_token_layer")
    return [{**{k: r[k] for k in first}, **{k: r.get(k, 0.0) for k in keys}} for r in rows]


def _deferred_residuals(loss: torch.Tensor) -> list[torch.Tensor]:
    """The OCC residuals FP4Linear holds for backward outside ``save_for_backward`` (cut to
    their size later: ``fp4train.kernels.linear.DeferredResidual``), packed now."""
    try:
        from fp4train.kernels import linear as klin
    except ImportError:  # no triton: nothing deferred
        return []
    klin.pack_pending(wait=True)
    out, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        held = getattr(node, "deferred", None)
        if held is not None:
            held.pack()
            out += [t for t in (held.packed, held.idx) if t is not None]
        stack += [f for f, _ in node.next_functions]
    return out


def _bench_model(model_name: str, spec: str, dev: torch.device):
    """(LLaMA ``model_name`` with a 32k vocabulary, seed 0, built on ``dev``, converted to
    recipe ``spec`` — the triton backend on CUDA — unless ``spec`` is "bf16"; its config)."""
    from fp4train.convert import convert
    from fp4train.model import LLaMA, get_config
    from fp4train.train import parse_recipe

    torch.manual_seed(0)
    cfg = get_config(model_name, vocab_size=32000)
    with dev:  # initialise on the GPU: seconds, not a minute
        model = LLaMA(cfg)
    if spec != "bf16":
        recipe = parse_recipe(spec)
        convert(model, recipe.replace(backend="triton") if dev.type == "cuda" else recipe)
    return model, cfg


def _default_bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as a markdown table, floats with 3 significant digits."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def fmt(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _header(title: str) -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # `bench memory` runs without it
        triton_version = "absent"
    when = datetime.date.today().isoformat()
    return f"### {title}\n\n{when}, {dev}, torch {torch.__version__}, triton {triton_version}\n"


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        msg = f"shape must look like 4096x11008 (K x N), got {s!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return k, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fp4train bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("Examples::\n")[1],
    )
    p.add_argument("what", choices=["linear", "quant", "profile", "host", "step", "memory", "all"])
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_parse_shape,
        default=None,
        help="K x N of the layer (default: linear the LLaMA-7B shapes and 8192x8192; quant and "
        "profile 4096x4096, profile times the first shape given)",
    )
    p.add_argument("--tokens", type=int, default=8192, help="M, tokens per batch (8192)")
    p.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        help="recipes to time: presets or preset[key=value,...], e.g. "
        "'fp4-paper[occ.compensation=columns]' (+chan: activations with outlier channels, "
        "for linear and profile)",
    )
    p.add_argument(
        "--models", nargs="+", default=None, help="for step (125m 1.3b) and memory (1.3b)"
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per step (step, memory)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (step, memory)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="linear: also time each fwd+bwd replayed from a CUDA graph; step: capture the "
        "whole training step in a CUDA graph (no launch overhead; fused AdamW only)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each transformer block (step)"
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=["adamw"],
        choices=["adamw", "adamw-lp"],
        help="optimizers to time (step): torch's fused AdamW, fp4train's LowPrecisionAdamW",
    )
    p.add_argument("--results", default=None, help="append the tables to this markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fp4train bench``; returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.what != "memory":
        _require_cuda()
    out = []
    if args.what in ("linear", "all"):
        rows = bench_linear(
            args.shapes or DEFAULT_SHAPES,
            args.recipes or DEFAULT_RECIPES,
            m=args.tokens,
            cuda_graph=args.cuda_graph,
        )
        out.append(_header("FP4Linear fwd+bwd vs bf16 nn.Linear") + "\n" + format_table(rows))
    if args.what in ("quant", "all"):
        for k, n in args.shapes or [(4096, 4096)]:
            out.append(
                _header(f"quantize kernels vs copy bandwidth, M x K x N = {args.tokens}x{k}x{n}")
                + "\n"
                + format_table(bench_quant(m=args.tokens, k=k, n=n))
            )
    if args.what in ("profile", "all"):
        for r in args.recipes or ("fp4-dge", "fp4-paper"):
            k, n = (args.shapes or [(4096, 4096)])[0]
            out.append(
                _header(f"FP4Linear {recipe_name(r)} fwd+bwd by kernel, {args.tokens}x{k}x{n}")
                + "\n"
                + format_table(profile_linear(k, n, args.tokens, r))
            )
    if args.what == "host":
        for r in args.recipes or ("fp4-dge",):
            out.append(_header(f"host-side cProfile, {r} fwd+bwd of a 64x256x256 layer") + "\n"
                       + "```\n" + profile_host(r) + "```")  # fmt: skip
    if args.what in ("step", "all"):
        rows = bench_step(
            args.models or ["125m", "1.3b"],
            args.recipes or ("bf16", "fp4-dge", "fp4-paper"),
            args.batch,
            args.seq,
            compile=args.compile,
            optimizers=args.optimizers,
            cuda_graph=args.cuda_graph,
        )
        out.append(
            _header(
                f"training step, batch {args.batch} x seq {args.seq}"
                f"{', compiled' if args.compile else ''}"
                f"{', one CUDA graph per step' if args.cuda_graph else ''}"
            )
            + "\n"
            + format_table(rows)
        )
    if args.what == "memory":
        rows = saved_activations(
            args.models or ["1.3b"],
            args.recipes or ("bf16", "fp4-dge", "fp4-paper"),
            args.batch,
            args.seq,
        )
        out.append(
            _header(f"saved for backward, batch {args.batch} x seq {args.seq}")
            + "\n"
            + format_table(rows)
        )
    text = "\n\n".join(out) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


def recipe_name(spec: str) -> str:
    """A recipe spec without its ``+data`` suffix."""
    return _split_recipe(spec)[0]
