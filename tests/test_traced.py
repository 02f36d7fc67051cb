"""``fp4train.kernels.traced`` (the quantize kernels as tensor ops, for torch.compile) against
the plain-PyTorch twins of the kernels (``fp4train.kernels.reference``, written with the
reference quantizer ``fp4train.quantize``): the same bits, eager and compiled on the CPU.
(The GPU tests compare the compiled version with the Triton kernels themselves.)"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_bits, wide_values

pytest.importorskip("triton")  # traced imports the kernels' constants

from fp4train.kernels import reference as ref  # noqa: E402
from fp4train.kernels import traced  # noqa: E402


def _wide(m, k, seed, dtype=torch.bfloat16):
    return wide_values(m, k, torch.Generator().manual_seed(seed), dtype)


def _assert_same(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_same_bits(a, b, f"{what}[{i}]")


@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_matches_twin(fmt, dtype):
    x = _wide(37, 96, 0, dtype)  # 37 rows: padded to 48
    col = torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5
    for kw in ({}, {"col_scale": col}):
        got = traced.quantize_rows(x, fmt, store_q=True, store_qt=True, **kw)
        want = ref.quantize_rows(x, fmt, store_q=True, store_qt=True, **kw)
        _assert_same(got, want, f"{fmt} {dtype} {list(kw)}")


@pytest.mark.parametrize("per_row", [False, True])
def test_clamped_rows_and_residual_match_twin(per_row):
    x = _wide(40, 64, 2)
    lo, hi = torch.tensor([-1.5]), torch.tensor([2.0])
    if per_row:
        lo, hi = -torch.rand(40) * 2, torch.rand(40) * 2
    got = traced.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True)
    want = ref.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True)
    _assert_same(got, want, "clamped")
    assert got[3].abs().gt(0).any()  # the residual is not empty
    # outliers on the E4M3 grid (x spans many binades: several columns hold a part beyond
    # E4M3's range, columns 3 and 9 among them)
    x = x.clone()
    x[5, 3], x[7, 9] = 2000.0, -1500.0
    got = traced.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True, outliers_e4m3=True)
    want = ref.quantize_rows(x, "e2m1", lo=lo, hi=hi, store_qt=True, outliers_e4m3=True)
    _assert_same(got, want, "clamped, outliers in E4M3")
    assert got[3].dtype == torch.int32 and got[3][[3, 9]].tolist() == [1, 1]


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_dy_operands_match_twin(need):
    dy = _wide(50, 160, 3)
    g = torch.Generator().manual_seed(4)
    s_w, s_x = torch.rand(160, generator=g) + 0.01, torch.rand(50, generator=g) * 3
    got = traced.quantize_rowwise_and_colwise(dy, "e5m2", "e4m3", s_w, s_x, *need)
    want = ref.quantize_rowwise_and_colwise(dy, "e5m2", "e4m3", s_w, s_x, *need)
    _assert_same(got, want, f"dY need={need}")


def test_compiled_matches_twin():
    """Inductor (C++ on the CPU) keeps the bits: the divisions run in float64."""
    import torch._dynamo

    torch._dynamo.reset()
    x = _wide(48, 64, 5)
    f = torch.compile(lambda x: traced.quantize_rows(x, "e2m1", store_qt=True), fullgraph=True)
    _assert_same(f(x)[:3], ref.quantize_rows(x, "e2m1", store_qt=True)[:3], "compiled rows")
    s_w, s_x = torch.rand(64) + 0.01, torch.rand(48) * 3
    f = torch.compile(traced.quantize_rowwise_and_colwise, fullgraph=True)
    _assert_same(
        f(x, "e5m2", "e5m2", s_w, s_x),
        ref.quantize_rowwise_and_colwise(x, "e5m2", "e5m2", s_w, s_x),
        "compiled dY",
    )
