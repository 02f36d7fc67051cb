"""Helpers shared by the tests: training runs (CLI, monitor, parallel) and the kernel
checks (interpreter, traced quantizers, GPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fp4train.model import ModelConfig


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: micro models run fastest so, above all on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_micro_run(d: Path, words: list[str], n_lines: int, seed: int, **model: int) -> Path:
    """Write ``d``/text.txt (``n_lines`` seeded lines of 4–14 ``words``) and ``d``/micro.json
    (a ModelConfig of ``model``'s fields); return ``d``."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(words, k=rng.randint(4, 14))) for _ in range(n_lines)]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    ModelConfig(**model).to_json(d / "micro.json")
    return d


def wide_values(m: int, k: int, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """[m, k] random values over ~12 binades per row on ``gen``'s device, with zero rows and
    exact E2M1 ties once a row's max scales to 6 (row 1: 0.25, 0.75, 1.25, 5 and 6)."""
    x = torch.randn(m, k, device=gen.device, generator=gen)
    x = x * torch.exp2(torch.randint(-6, 6, (m, k), device=gen.device, generator=gen).float())
    x[:: max(m // 5, 1)] = 0.0
    x[1, :5] = torch.tensor([0.25, 0.75, 1.25, 5.0, 6.0])
    return x.to(dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Raise AssertionError unless ``got`` and ``want`` have the same dtype, shape and bits
    (FP8 compared as bytes), naming ``what`` and how many elements differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(
            f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
        )
    if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    n = int((got != want).sum())
    if n:
        raise AssertionError(f"{what}: {n} of {got.numel()} elements differ")


def residual_beyond_e4m3(x: torch.Tensor, scale: torch.Tensor):
    """Independent reference for OCC's e4m3 compensation: (r, cols, packed) for x [M, K] and
    its row scales (at least M): r = x − clamp(x, ±t), t = 448·scale (the float32 product),
    in float64; cols, the columns where r is nonzero, ascending; packed, r's columns cols
    rounded once to bf16, to the left of an [M, K] zero tensor (``gather_columns``' layout)."""
    t = (scale[: x.shape[0], None] * 448.0).double()
    r = x.double() - torch.minimum(torch.maximum(x.double(), -t), t)
    cols = (r != 0).any(0).nonzero().flatten()
    packed = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
    packed[:, : cols.numel()] = r[:, cols].bfloat16()
    return r, cols, packed


# the clamp bounds of check_column_compensation's three cases, for x with three outlier
# channels 30× larger than the rest
COLUMN_CASES = {"3 channels": (-8.0, 8.0), "every column": (-0.5, 0.5), "none": (-1e4, 1e4)}


def check_column_compensation(case: str, gen: torch.Generator, m: int, k: int, n: int) -> None:
    """OCC's column compensation (``fp4train.kernels.occ``) on ``gen``'s device, for an x
    [m, k] with three outlier channels clamped as ``COLUMN_CASES[case]`` says: the outlier
    columns found and R and W packed bit for bit; the forward within float32's summation
    bound and one bf16 ulp of the float64 sum; the weight gradient within float32's summation
    bound, its other columns untouched. Raises AssertionError naming ``case``."""
    from fp4train.kernels import occ as kocc
    from fp4train.kernels import quantize as kq

    dev = gen.device
    x = torch.randn(m, k, device=dev, generator=gen)
    x[:, [3, k // 2, k // 2 + 1]] *= 30
    x = x.bfloat16()
    w = torch.randn(n, k, device=dev, generator=gen) * 0.05
    y = torch.randn(m, n, device=dev, generator=gen).bfloat16()
    dy = torch.randn(m, n, device=dev, generator=gen).bfloat16()
    dw0 = torch.randn(n, k, device=dev, generator=gen)
    lo, hi = (torch.tensor([v], device=dev) for v in COLUMN_CASES[case])
    _, _, _, resid = kq.quantize_rows(x, "e2m1", lo=lo, hi=hi)
    order, cnt = kocc.outlier_columns(resid)
    flags = resid.ne(0).any(0)
    cols = flags.nonzero().flatten()
    c = int(cnt)
    if c != cols.numel() or not torch.equal(order[:c].long(), cols):
        raise AssertionError(f"{case}: outlier columns {order[:c].tolist()} vs {cols.tolist()}")
    # the whole order: a stable partition, the other columns ascending after them
    if not torch.equal(order.long(), torch.argsort((~flags).to(torch.uint8), stable=True)):
        raise AssertionError(f"{case}: the column order is not the stable partition")
    r_c = kocc.gather_columns(resid, order, cnt)
    for what, src, packed in (("R", resid, r_c), ("W", w, kocc.gather_columns(w, order, cnt))):
        want = torch.zeros(src.shape, dtype=torch.bfloat16, device=dev)
        want[:, :c] = src[:, cols].bfloat16()
        assert_same_bits(packed, want, f"{case}: packed {what}")
        lean = kocc.gather_columns(src, order, cnt, zero_rest=False)  # only the first c written
        assert_same_bits(lean[:, :c], want[:, :c], f"{case}: packed {what}, zero_rest=False")
    # forward: y + R·W_bf16ᵀ, float32 sums of k + 1 terms (float32's bound (k + 1)·2**-24·Σ|terms|,
    # in any order), then one rounding to bf16 (half an ulp of a value within that bound:
    # at most one ulp of the exact sum)
    w16 = w.bfloat16().double()
    got = kocc.occ_compensate_columns(y.clone(), r_c, w, order, cnt).double()  # in place
    exact = y.double() + resid.double() @ w16.t()
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-120))) - 7)
    sums = (k + 1) * 2.0**-24 * (y.double().abs() + resid.double().abs() @ w16.abs().t())
    bad = int(((got - exact).abs() > ulp + 2 * sums).sum())
    if bad:
        raise AssertionError(
            f"{case}: {bad} forward outputs beyond float32's summation bound + one bf16 ulp"
        )
    # wgrad: dW[:, cols] += dYᵀ·R[:, cols] in float32; the other columns untouched
    got = kocc.occ_compensate_columns_wgrad(dw0.clone(), dy, r_c, order, cnt)
    exact = dw0.double() + dy.double().t() @ resid.double()
    # float32 sums of m terms, then one addition: the standard bound (m + 1)·2**-24·Σ|terms|
    bound = (m + 1) * 2.0**-24 * (dw0.double().abs() + dy.double().abs().t()
                                  @ resid.double().abs())  # fmt: skip
    bad = int(((got.double() - exact).abs() > bound).sum())
    if bad:
        raise AssertionError(f"{case}: {bad} wgrad entries beyond float32's summation bound")
    rest = torch.ones(k, dtype=torch.bool, device=dev)
    rest[cols] = False
    assert_same_bits(got[:, rest], dw0[:, rest], f"{case}: dW off the outlier columns")
    # compact, as FP4Linear keeps R for backward once the host knows n: [M, n], the same
    # columns, products bit for bit those of the full-width buffer
    r_n = kocc.gather_columns(resid, order, cnt, width=c)
    if r_n.shape != (m, c):
        raise AssertionError(f"{case}: compact R of shape {tuple(r_n.shape)}, want {(m, c)}")
    assert_same_bits(r_n, r_c[:, :c], f"{case}: compact R")
    y_full = kocc.occ_compensate_columns(y.clone(), r_c, w, order, cnt)
    assert_same_bits(kocc.occ_compensate_columns(y.clone(), r_n, w, order, cnt), y_full,
                     f"{case}: forward over the compact R")  # fmt: skip
    assert_same_bits(kocc.occ_compensate_columns_wgrad(dw0.clone(), dy, r_n, order, cnt), got,
                     f"{case}: wgrad over the compact R")  # fmt: skip


def check_compact_residual(device: str, gen: torch.Generator) -> None:
    """FP4Linear's triton path keeps OCC's R for backward at its size when it may sync (the
    dense compensation's nonzeros, the column compensations' [M, n]): the same y, dX and dW
    bit for bit as with the full-width buffers kept under torch.compile / graph capture."""
    from fp4train import kernels
    from fp4train.kernels import linear as klin
    from fp4train.recipe import Recipe

    x = torch.randn(50, 64, generator=gen, device=device)
    x[:, :2] *= 20
    x = x.bfloat16()
    w = torch.randn(48, 64, generator=gen, device=device) * 0.05
    dy = torch.randn(50, 48, generator=gen, device=device).bfloat16()
    xm = x.clone()
    xm[4, 10], xm[30, 60] = 3000.0, -5000.0  # beyond E4M3's range of their rows' scales
    paper = Recipe.preset("fp4-paper")
    cases = []
    for comp in ("dense", "columns", "e4m3"):
        for act_save in (None, "e4m3"):
            if comp == "e4m3" and act_save:
                continue
            cases.append((paper.replace(**{"occ.compensation": comp}, act_save=act_save), x))
    cases.append((paper.replace(**{"occ.compensation": "e4m3"}), xm))
    for recipe, xin in cases:
        name = f"{recipe.occ.compensation} act_save={recipe.act_save} max {xin.abs().max()}"
        out = {}
        for compact in (False, True):
            klin.COMPACT_RESIDUAL = compact
            try:
                y, saved = kernels.linear_forward(xin, w, recipe)
                grads = kernels.linear_backward(saved, dy, w, recipe, True, True)
            finally:
                klin.COMPACT_RESIDUAL = True
            out[compact] = (y, *grads, saved)
        for i, what in enumerate(("y", "dx", "dw")):
            assert_same_bits(out[True][i], out[False][i], f"{name}: {what}")
        if recipe.act_save is None or recipe.occ.compensation == "dense":
            held = []  # R cut to its size later, as FP4Linear does
            y, saved = kernels.linear_forward(xin, w, recipe, deferred=held)
            if saved[4] is not None or len(held) != 1 or held[0].r is None:
                raise AssertionError(f"{name}: R not deferred")
            kernels.linear_forward(xin, w, recipe)  # the next layer's forward packs it
            if held[0].r is not None or held[0].packed is None:
                raise AssertionError(f"{name}: the next forward did not pack the deferred R")
            now = out[True][3][4]  # R as the immediate path keeps it
            if held[0].packed.shape != now.shape:
                raise AssertionError(f"{name}: deferred R {tuple(held[0].packed.shape)}, "
                                     f"immediate {tuple(now.shape)}")  # fmt: skip
            grads = kernels.linear_backward(saved, dy, w, recipe, True, True, held[0])
            for what, a, b in zip(("y", "dx", "dw"), (y, *grads), out[True], strict=False):
                assert_same_bits(a, b, f"{name}: {what}, R packed later")
        # no weight gradient wanted (inference, a frozen W): no R kept, the same y and dX
        y, saved = kernels.linear_forward(xin, w, recipe, need_residual=False)
        if any(t is not None for t in saved[4:]):
            raise AssertionError(f"{name}: R kept though no weight gradient is wanted")
        assert_same_bits(y, out[True][0], f"{name}: y without R kept")
        dx, dw = kernels.linear_backward(saved, dy, w, recipe, True, False)
        assert dw is None
        assert_same_bits(dx, out[True][1], f"{name}: dx without R kept")
        full, lean = out[False][3][4], out[True][3][4]  # R as kept
        if recipe.occ.compensation == "dense":
            idx = out[True][3][6]
            if recipe.act_save is None:
                nz = full.reshape(-1).nonzero().reshape(-1)
                if not torch.equal(idx.long(), nz) or not torch.equal(lean, full.reshape(-1)[nz]):
                    raise AssertionError(f"{name}: R's nonzeros differ from the dense R")
            if lean.ndim != 1 or lean.numel() >= full.numel() // 10:
                raise AssertionError(f"{name}: kept {tuple(lean.shape)} of R {tuple(full.shape)}")
        else:  # as many columns as the full-width run found on the device; for e4m3, the
            # planted values beyond E4M3's range (2 columns) or none
            n, n_full = int(out[True][3][7]), int(out[False][3][7])
            ok = n == n_full and lean.shape[1] == n and full.shape[1] == xin.shape[1]
            if recipe.occ.compensation == "e4m3":
                ok = ok and n == (2 if xin is xm else 0)
            if not ok:
                raise AssertionError(f"{name}: {n} columns ({n_full} full width), kept "
                                     f"{tuple(lean.shape)} of R {tuple(full.shape)}")  # fmt: skip
