"""GPU tests of the triton backend (``pytest -m gpu``): kernels bit for bit against their
plain-PyTorch twins on fresh random data, FP4Linear triton vs reference per preset, and
torch.compile of a model with FP4Linear layers. Skipped without a CUDA GPU with FP8 (sm_89+).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    COLUMN_CASES,
    assert_same_bits,
    check_column_compensation,
    check_compact_residual,
    residual_beyond_e4m3,
    wide_values,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from fp4train import kernels  # noqa: E402

if not kernels.triton_available():
    pytest.skip("needs triton and an FP8-capable GPU (sm_89+)", allow_module_level=True)

import torch.nn as nn  # noqa: E402

from fp4train.kernels import dge as kdge  # noqa: E402
from fp4train.kernels import occ as kocc  # noqa: E402
from fp4train.kernels import quantize as kq  # noqa: E402
from fp4train.kernels import reference as ref  # noqa: E402
from fp4train.kernels.linear import scaled_mm_rowwise  # noqa: E402
from fp4train.linear import FP4Linear  # noqa: E402
from fp4train.recipe import Recipe  # noqa: E402


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fill every kernel output with 0xFF bytes (NaN in float32, e4m3fn and e5m2) first."""

    def empty_poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        t.view(torch.uint8).fill_(0xFF)
        return t

    monkeypatch.setattr(kq, "empty_output", empty_poisoned)


@pytest.fixture
def gen():
    """(a fresh CUDA generator, its seed for failure messages)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    return torch.Generator(device="cuda").manual_seed(seed), seed


def _twin(fn, *args, **kwargs):
    """Run a reference twin on the CPU, where torch's division is IEEE (on CUDA, tensor / scalar
    multiplies by the rounded reciprocal, so ``absmax_scale`` differs there by an ulp)."""

    def cpu(a):
        return a.cpu() if isinstance(a, torch.Tensor) else a

    out = fn(*map(cpu, args), **{k: cpu(v) for k, v in kwargs.items()})
    return tuple(o.cuda() for o in out)


def _assert_same(got, want, what, seed):
    assert_same_bits(got, want, f"{what} (seed {seed})")


@pytest.mark.parametrize("strategy", ["two-walk", "resident"])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
@pytest.mark.parametrize("shape", [(1000, 1040), (64, 11008), (40, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_bit_exact(fmt, shape, dtype, strategy, gen, monkeypatch):
    g, seed = gen
    monkeypatch.setattr(kq, "ROW_STRATEGY", strategy)
    x = wide_values(*shape, g, dtype)
    got = kq.quantize_rows(x, fmt, store_q=True, store_qt=True)
    want = _twin(ref.quantize_rows, x, fmt, store_q=True, store_qt=True)
    for name, a, b in zip(("q", "scale", "q_t"), got[:3], want[:3], strict=True):
        _assert_same(a, b, f"{fmt} {name}", seed)


def test_direct_launches_equal_the_reference(gen):
    """fp4train.kernels.launch's direct launches (after a first JIT launch per key): aligned,
    then a misaligned view (a different specialization, which must not reuse the aligned
    kernel), then aligned again from the cache, and one row (an int equal to 1); dY's three
    kernels twice. Each equals the reference bit for bit."""
    from fp4train.kernels import launch as kl

    assert kl.FAST_LAUNCH
    g, seed = gen
    base = wide_values(300, 1041, g)
    aligned, misaligned = base[:, :1040].contiguous(), base[:, 1:]
    assert misaligned.data_ptr() % 16 != 0
    for what, x in (("aligned", aligned), ("misaligned", misaligned), ("again", aligned),
                    ("one row", aligned[:1]), ("misaligned again", misaligned)):  # fmt: skip
        got = kq.quantize_rows(x, "e2m1", store_q=True, store_qt=True)
        want = _twin(ref.quantize_rows, x, "e2m1", store_q=True, store_qt=True)
        for name, a, b in zip(("q", "scale", "q_t"), got[:3], want[:3], strict=True):
            _assert_same(a, b, f"{what}: {name}", seed)
    s_w = torch.rand(1040, device="cuda", generator=g) + 0.01
    s_x = torch.rand(300, device="cuda", generator=g) * 3
    want = _twin(ref.quantize_rowwise_and_colwise, aligned, "e5m2", "e5m2", s_w, s_x)
    for i in range(2):
        got = kq.quantize_rowwise_and_colwise(aligned, "e5m2", "e5m2", s_w, s_x)
        for name, a, b in zip(("q_row", "s_row", "q_col_t", "s_col"), got, want, strict=True):
            _assert_same(a, b, f"dY call {i}: {name}", seed)


def test_quantize_dy_both_operands_bit_exact(gen):
    g, seed = gen
    dy = wide_values(777, 2064, g)
    s_w = torch.rand(2064, device="cuda", generator=g) + 0.01
    s_x = torch.rand(777, device="cuda", generator=g) * 3
    got = kq.quantize_rowwise_and_colwise(dy, "e5m2", "e5m2", s_w, s_x)
    want = _twin(ref.quantize_rowwise_and_colwise, dy, "e5m2", "e5m2", s_w, s_x)
    for name, a, b in zip(("q_row", "s_row", "q_col_t", "s_col"), got, want, strict=True):
        _assert_same(a, b, f"dY {name}", seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_traced_quantizers_equal_the_kernels(dtype, gen):
    """Under torch.compile FP4Linear quantizes with ``kernels.traced`` (tensor ops Inductor can
    fuse into the producer): compiled by Inductor they must give the kernels' bits."""
    import torch._dynamo

    from fp4train.kernels import traced

    g, seed = gen
    torch._dynamo.reset()
    x = wide_values(1000, 1040, g, dtype)
    for fmt in ("e2m1", "e4m3"):
        f = torch.compile(lambda x, fmt=fmt: traced.quantize_rows(x, fmt, store_qt=True))
        got, want = f(x), kq.quantize_rows(x, fmt, store_qt=True)
        for name, a, b in zip(("q", "scale", "q_t"), got[:3], want[:3], strict=True):
            _assert_same(a, b, f"compiled {fmt} {name}", seed)
    xb = x.bfloat16()
    lo, hi = torch.tensor([-3.0], device="cuda"), torch.tensor([2.0], device="cuda")
    f = torch.compile(lambda x: traced.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True))
    want = kq.quantize_rows(xb, "e2m1", lo=lo, hi=hi, store_qt=True)
    for name, a, b in zip(("q", "scale", "q_t", "resid"), f(xb), want, strict=True):
        _assert_same(a, b, f"compiled clamped {name}", seed)
    xo = xb.clone()
    xo[3, 5], xo[10, 7] = 900.0, -2000.0  # beyond 448 · scale: a residual
    f = torch.compile(lambda x: traced.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True,
                                                     outliers_e4m3=True))  # fmt: skip
    want = kq.quantize_rows(xo, "e2m1", lo=lo, hi=hi, store_qt=True, outliers_e4m3=True)
    for name, a, b in zip(("q", "scale", "q_t", "resid"), f(xo), want, strict=True):
        _assert_same(a, b, f"compiled clamped, outliers in E4M3, {name}", seed)
    s_w = torch.rand(1040, device="cuda", generator=g) + 0.01
    s_x = torch.rand(1000, device="cuda", generator=g) * 3
    f = torch.compile(lambda d: traced.quantize_rowwise_and_colwise(d, "e5m2", "e5m2", s_w, s_x))
    got, want = f(xb), kq.quantize_rowwise_and_colwise(xb, "e5m2", "e5m2", s_w, s_x)
    for name, a, b in zip(("q_row", "s_row", "q_col_t", "s_col"), got, want, strict=True):
        _assert_same(a, b, f"compiled dY {name}", seed)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_occ_thresholds_and_clamp_bit_exact(granularity, gen):
    g, seed = gen
    # 2048 x 4096 > 2**22 elements: the tensor-wide threshold comes from the strided sample
    x = torch.randn(2048, 4096, device="cuda", generator=g)
    x[:, :40] *= 30  # outlier channels
    x = x.bfloat16()
    # unsampled too (1000 x 4096 < 2**22: ~1000 programs meet at one arrival counter), and
    # each many times: a race in the last program's selection would show in some repeat
    for xs in (x[:1000], x):
        lo_r, hi_r = _twin(ref.occ_thresholds, xs, 0.99, granularity)
        for i in range(20):
            lo, hi = kocc.occ_thresholds(xs, 0.99, granularity)
            assert torch.equal(lo, lo_r) and torch.equal(hi, hi_r), f"seed {seed}, repeat {i}"
    got = kq.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True)
    want = _twin(ref.quantize_rows, x, "e2m1", lo=lo_r, hi=hi_r, store_qt=True)
    for name, a, b in zip(("q", "scale", "q_t", "resid"), got, want, strict=True):
        _assert_same(a, b, f"clamped X {name}", seed)
    # compensation "e4m3": the outliers on the E4M3 grid, a few beyond its range
    x[7, 100], x[900, 3000], x[1500, 4095] = 4000.0, -9000.0, 300.0
    lo, hi = kocc.occ_thresholds(x, 0.99, granularity)
    got = kq.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True, outliers_e4m3=True)
    want = _twin(ref.quantize_rows, x, "e2m1", lo=lo, hi=hi, store_qt=True, outliers_e4m3=True)
    for name, a, b in zip(("q", "scale", "q_t", "resid"), got, want, strict=True):
        _assert_same(a, b, f"clamped X, outliers in E4M3, {name}", seed)
    assert 0 < int(got[3].sum()) <= 3, f"{int(got[3].sum())} columns beyond E4M3's range"
    order, n = kocc.order_columns(got[3])
    packed = kocc.gather_columns(x, order, n, scale=got[1])
    _assert_same(packed, residual_beyond_e4m3(x, got[1])[2], "the residual beyond E4M3, packed",
                 seed)  # fmt: skip


@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 5632), (torch.float32, 2048)])
def test_e4m3_saved_activations_match_the_reference_quantizer(dtype, width, gen):
    """act_save=e4m3's quantizer on the GPU (SwiGLU's bf16 inputs, RMSNorm's float32 ones)."""
    from fp4train import model as fmodel
    from fp4train.formats import E4M3
    from fp4train.quantize import quantize

    g, seed = gen
    a = (torch.randn(3, 37, width, device="cuda", generator=g) * 4).to(dtype)
    q, s = fmodel._e4m3_rows(a)  # the Triton path on the GPU
    want = quantize(a.cpu(), E4M3, "row", nonfinite="propagate")
    assert q.shape == a.shape and s.shape == (3, 37, 1), f"seed {seed}"
    assert torch.equal(s.cpu(), want.scale), f"seed {seed}"
    assert torch.equal(q.cpu().float(), want.data.float()), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_adamw_fused_matches_eager(dtype, gen):
    """Each step from the same parameter and states (the fused run is re-synced to the eager
    one after every step, so one-step differences cannot compound)."""
    from fp4train.optim import LowPrecisionAdamW

    g, seed = gen
    p0 = (torch.randn(2048, 5632 + 40, device="cuda", generator=g) * 0.02).to(dtype)
    grads = [torch.randn(p0.shape, device="cuda", generator=g) * 10.0**k for k in (-3, -1, -4)]
    pe, pf = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    oe = LowPrecisionAdamW([pe], lr=1e-3, fused=False)
    of = LowPrecisionAdamW([pf], lr=1e-3, fused=True)
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: the last bit may round either way
    for i, gr in enumerate(grads):
        pe.grad, pf.grad = gr.to(dtype), gr.to(dtype).clone()
        oe.step()
        of.step()
        a, b = pf.detach().float(), pe.detach().float()
        assert ((a - b).abs() <= b.abs() * tol + 1e-9).all(), f"step {i} p (seed {seed})"
        se, sf = oe.state[pe], of.state[pf]
        for name in ("exp_avg", "sqrt_exp_avg_sq"):
            a, b = sf[name].float(), se[name].float()
            differ = a != b
            # CUDA's eager step divides by a Python scalar through its reciprocal and contracts
            # multiply-adds: a last-bit difference may move a value one grid step
            n = int(differ.sum())
            assert n <= a.numel() // 100, f"step {i} {name}: {n} differ (seed {seed})"
            assert (((a - b).abs() <= b.abs() * 0.13 + 1e-7) | ~differ).all(), f"{name} {seed}"
            torch.testing.assert_close(sf[name + "_scale"], se[name + "_scale"], rtol=1e-5, atol=0)
        with torch.no_grad():
            pf.copy_(pe)
        of.state[pf] = {k: v.clone() for k, v in se.items()}


def test_dge_weight_grad_matches_reference(gen):
    g, seed = gen
    w = torch.randn(512, 1024, device="cuda", generator=g) * 0.02
    _, s_w, _, _ = kq.quantize_rows(w, "e2m1")
    dw = torch.randn(512, 1024, device="cuda", generator=g).bfloat16()
    got = kdge.dge_weight_grad(dw, w, s_w, "e2m1", 5.0, 3.0)
    (want,) = _twin(lambda *a: (ref.dge_weight_grad(*a),), dw, w, s_w, "e2m1", 5.0, 3.0)
    assert not torch.isnan(got).any()
    err = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert err < 1e-5, f"max relative error {err:.2e} (seed {seed})"


def test_scaled_mm_rowwise_takes_e5m2_times_e4m3(gen):
    g, seed = gen
    a = (torch.randn(64, 128, device="cuda", generator=g) * 100).to(torch.float8_e5m2)
    b = torch.randn(32, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    sa = torch.rand(64, device="cuda", generator=g)
    sb = torch.rand(32, device="cuda", generator=g)
    got = scaled_mm_rowwise(a, b, sa, sb).float()
    want = (a.float() * sa[:, None]) @ (b.float() * sb[:, None]).t()
    assert ((got - want).norm() / want.norm()).item() < 4e-3


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_ones_first_made_inside_a_capture_are_not_cached(gen):
    """scale_b None reads a cached vector of ones; one first made inside a CUDA-graph capture
    is filled only at replay, so it must not serve the eager calls after the capture."""
    from fp4train.kernels import linear as klin

    g, seed = gen
    a = torch.randn(64, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    b_t = torch.randn(80, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    sa = torch.rand(64, device="cuda", generator=g) + 0.5
    want = scaled_mm_rowwise(a, b_t, sa, None)  # warm-up, outside the capture
    klin._ONES.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = scaled_mm_rowwise(a, b_t, sa, None)
    assert not klin._ONES
    assert_same_bits(scaled_mm_rowwise(a, b_t, sa, None), want, f"eager after (seed {seed})")
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(captured, want, f"replayed (seed {seed})")


def test_scaled_mm_rowwise_accumulation(gen):
    """float32 GEMM outputs of E2M1-valued E4M3 x E5M2 operands at K = 4096 against float64
    sums: elementwise within float32's summation bound K·2**-24·(|A|·|B|) without
    ``fast_accum``; within 1e-2 relative (Frobenius) with it (the DeepSeek-V3 report measures
    up to 2% on single elements at this K). Prints both errors (pytest -s)."""
    g, seed = gen
    k = 4096
    a = (torch.randn(256, k, device="cuda", generator=g) * 1000).to(torch.float8_e5m2)
    _, _, b_t, _ = kq.quantize_rows(torch.randn(k, 512, device="cuda", generator=g), "e2m1",
                                    store_q=False, store_qt=True)  # fmt: skip
    sa = torch.rand(256, device="cuda", generator=g) + 0.5
    a64, b64 = a.double() * sa.double()[:, None], b_t.double()
    want = a64 @ b64.t()
    bound = k * 2.0**-24 * (a64.abs() @ b64.abs().t())
    errs = {}
    for fast in (False, True):
        got = scaled_mm_rowwise(a, b_t, sa, None, torch.float32, fast).double()
        errs[fast] = ((got - want).norm() / want.norm()).item()
        if not fast:
            bad = int(((got - want).abs() > bound).sum())
            assert bad == 0, f"{bad} sums beyond float32's bound (seed {seed})"
    print(f"relative error, float32 accumulation {errs[False]:.2e}, fast {errs[True]:.2e}")
    assert errs[True] < 1e-2, f"fast accumulation: relative error {errs[True]:.2e} (seed {seed})"


@pytest.mark.parametrize(
    "preset",
    [
        "fp8",
        "fp4-direct",
        "fp4-dge",
        "fp4-occ",
        "fp4-paper",
        "fp4-paper columns",
        "fp4-paper e4m3",
        "fp4-dge fast",
    ],
)
@pytest.mark.parametrize("occ_granularity", ["tensor", "row"])
def test_fp4linear_triton_matches_reference(preset, occ_granularity, gen):
    g, seed = gen
    name, _, variant = preset.partition(" ")
    recipe = Recipe.preset(name)
    if recipe.occ is None and occ_granularity == "row":
        pytest.skip("no OCC in this preset")
    if recipe.occ is not None:
        recipe = recipe.replace(**{"occ.granularity": occ_granularity})
    if variant in ("columns", "e4m3"):  # over the 8 outlier channels / in the FP8 operand
        recipe = recipe.replace(**{"occ.compensation": variant})
    if variant == "fast":  # fast accumulation: the reference sums in float32
        recipe = recipe.replace(fast_accum=True)
    x = torch.randn(3, 333, 512, device="cuda", generator=g)
    x[..., :8] *= 25
    x = x.bfloat16()
    dy = torch.randn(3, 333, 768, device="cuda", generator=g).bfloat16()
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        layer = FP4Linear(512, 768, device="cuda", recipe=recipe.replace(backend=backend))
        xb = x.clone().requires_grad_()
        y = layer(xb)
        y.backward(dy)
        out[backend] = (y, xb.grad, layer.weight.grad, layer.bias.grad)
    # the quantized operands are bit-identical; the GEMMs differ in accumulation order and
    # in rounding their output to bf16 (2**-9), the OCC compensation in bf16 operands
    for name, t, r in zip(("y", "dx", "dw", "db"), out["triton"], out["reference"], strict=True):
        assert t.dtype == r.dtype and t.shape == r.shape
        err = _rel(t, r)
        bound = 1e-2 if variant == "fast" else 6e-3
        assert err < bound, f"{preset}: {name} relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("case", list(COLUMN_CASES))
def test_occ_column_compensation_on_gpu(case, gen):
    """The column compensation's kernels on the tensor cores (``conftest.check_column_
    compensation``): outlier columns found and packed bit for bit; the forward within one bf16
    ulp of the float64 sum and the weight gradient within float32's summation bound."""
    g, seed = gen
    try:
        check_column_compensation(case, g, 1000, 512, 384)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from e


@pytest.mark.parametrize("compensation", ["dense", "columns", "e4m3"])
def test_occ_residual_compact_eagerly_full_under_graph_capture(compensation, gen):
    """Eagerly R is kept at its size (the host learns it through a queued copy); captured
    in a CUDA graph, nothing syncs and R stays full width: the same bits either way. Two
    layers, so dX flows through the first; backward from a scalar made inside the capture
    (``y.backward(dy)`` with dY from outside it fails: the legacy stream would wait on the
    capture, torch 2.11)."""
    g, seed = gen
    if compensation == "dense":
        check_compact_residual("cuda", g)
        v = torch.randn(1000, 700, device="cuda", generator=g).bfloat16()
        v[torch.rand(1000, 700, device="cuda", generator=g) < 0.98] = 0
        ends = kocc.count_nonzeros(v)
        vals, idx = kocc.pack_nonzeros(v, ends, int(ends[-1]))
        nz = v.reshape(-1).nonzero().reshape(-1)
        assert torch.equal(idx.long(), nz), f"packed indices (seed {seed})"
        assert_same_bits(kocc.unpack_nonzeros(vals, idx, v.shape), v, "unpacked R")
    recipe = Recipe.preset("fp4-paper").replace(**{"occ.compensation": compensation})
    torch.manual_seed(0)
    model = nn.Sequential(
        FP4Linear(512, 768, bias=False, device="cuda", recipe=recipe),
        FP4Linear(768, 512, bias=False, device="cuda", recipe=recipe),
    )
    x = torch.randn(1024, 512, device="cuda", generator=g)
    x[:, :8] *= 25
    x[5, 100] = 5e4  # beyond E4M3's range of its row: one residual column for "e4m3"
    x = x.bfloat16()
    dy = torch.randn(1024, 512, device="cuda", generator=g).bfloat16()

    def step():  # backward from a scalar: dY enters as the product's gradient, the same bits
        for p in model.parameters():
            p.grad = None
        y = model(x)
        (y.float() * dy.float()).sum().backward()
        return y

    # detached: a live graph from this eager step would keep the weights' AccumulateGrad
    # nodes, made on the legacy stream, into the capture (which then fails)
    want = tuple(t.detach() for t in (step(), *(p.grad for p in model.parameters())))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = model(x)
        (y.float() * dy.float()).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    got = (y, *(p.grad for p in model.parameters()))
    for what, a, b in zip(("y", "dW1", "dW2"), got, want, strict=True):
        assert_same_bits(a, b, f"{compensation} {what}, graph vs eager (seed {seed})")


@pytest.mark.parametrize("compensation", ["dense", "columns", "e4m3"])
def test_occ_forward_without_a_graph_keeps_no_residual(compensation, gen):
    """Under no_grad / inference_mode FP4Linear's OCC forward gives the same y bit for bit and
    leaves no residual pending (none is counted, copied to the host or packed later)."""
    from fp4train.kernels import linear as klin

    g, seed = gen
    recipe = Recipe.preset("fp4-paper").replace(
        **{"occ.compensation": compensation}, backend="triton"
    )
    layer = FP4Linear(1024, 512, bias=False, device="cuda", recipe=recipe)
    x = torch.randn(512, 1024, device="cuda", generator=g)
    x[:, :8] *= 20
    x = x.bfloat16()
    klin.pack_pending(wait=True)
    want = layer(x)
    klin.pack_pending(wait=True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = layer(x)
        assert not klin._pending, f"{compensation} {mode.__name__}: residual left pending"
        assert_same_bits(y, want.detach(), f"{compensation} {mode.__name__} y (seed {seed})")


def test_stochastic_rounding_unbiased_on_gpu(gen):
    g, seed = gen
    x = (torch.randn(256, 512, device="cuda", generator=g) * 3).bfloat16()
    q0, s, _, _ = kq.quantize_rows(x, "e2m1")
    u = x.float() / s[:256, None]
    lo = torch.floor(u * 2) / 2  # E2M1 grid below 2 has step 0.5: both neighbours there
    n, acc = 64, torch.zeros_like(u, dtype=torch.float64)
    for k in range(n):
        q, s2, _, _ = kq.quantize_rows(x, "e2m1", stochastic=True, seed=k)
        assert torch.equal(s2, s)
        v = q[:256].float()
        small = u.abs() < 2
        assert ((v == lo) | (v == lo + 0.5))[small].all(), f"seed {seed}"
        acc += v.double()
    assert (acc / n - u.double()).mean().abs() < 0.01, f"seed {seed}"
    recipe = Recipe.preset("fp4-dge").replace(rounding="stochastic", backend="triton")
    layer = FP4Linear(512, 256, bias=False, device="cuda", recipe=recipe)
    y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.weight.grad).all()


def test_triton_backend_rejects_what_it_cannot_run():
    recipe = Recipe.preset("fp4-paper").replace(fwd_granularity="tensor", backend="triton")
    layer = FP4Linear(64, 64, device="cuda", recipe=recipe)
    with pytest.raises(RuntimeError, match="row-wise only"):
        layer(torch.randn(4, 64, device="cuda"))
    assert kernels.check_supported(Recipe.preset("fp4-paper"), 64, 40) is not None


@pytest.mark.parametrize("preset", ["fp4-dge", "fp4-paper", "fp4-paper e4m3"])
def test_torch_compile_without_graph_breaks(preset, gen):
    import torch._dynamo

    g, seed = gen
    torch._dynamo.reset()
    name, _, variant = preset.partition(" ")
    recipe = Recipe.preset(name).replace(backend="triton")
    if variant:
        recipe = recipe.replace(**{"occ.compensation": variant})
    torch.manual_seed(0)
    # no elementwise op between the layers: inductor would fuse it without eager's bf16 rounding,
    # and FP4 quantization turns such last-bit differences into ~1% flips of grid values
    model = nn.Sequential(
        FP4Linear(256, 512, bias=False, device="cuda", recipe=recipe),
        FP4Linear(512, 256, bias=False, device="cuda", recipe=recipe),
    )
    x = torch.randn(4, 64, 256, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4, 64, 256, device="cuda", generator=g).bfloat16()
    eager_y = model(x)
    eager_y.backward(dy)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    y = compiled(x)
    y.backward(dy)
    assert _rel(y, eager_y) < 1e-6, f"seed {seed}"
    for p, g_eager in zip(model.parameters(), eager_grads, strict=True):
        assert _rel(p.grad, g_eager) < 1e-6, f"seed {seed}"
