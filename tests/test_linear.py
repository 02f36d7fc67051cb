"""FP4Linear (reference backend) against explicit fake-quant references written out here."""

import pytest
import torch
import torch.nn as nn

from fp4train import FP4Linear, Recipe
from fp4train.dge import correction
from fp4train.occ import clamp_outliers, outliers_on_e4m3
from fp4train.quantize import fake_quantize, quantize

PRESETS = ["fp8", "fp4-paper", "fp4-direct", "fp4-dge", "fp4-occ"]


def _layer(recipe, k=64, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin, FP4Linear.from_linear(lin, recipe)


def _inputs(m=40, k=64, seed=1, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:  # a few large activations, as LLM activations have
        x[torch.rand(m, k, generator=g) < 0.01] *= 20
    return x


def _ste(x, xq):
    return x + (xq - x).detach()


def _forward_ref(x, w, recipe):
    """Y = Q(X_c) Q(W)ᵀ + R Wᵀ written from the recipe, with STE for gradients."""
    if recipe.occ is not None:
        x_c, r = clamp_outliers(x.detach(), recipe.occ.alpha, recipe.occ.granularity)
        r = r.to_dense(torch.float32)
    else:
        x_c, r = x, None
    xq = fake_quantize(x_c.detach(), recipe.fwd_x.format, recipe.fwd_x.granularity)
    wq = fake_quantize(w.detach(), recipe.fwd_w.format, recipe.fwd_w.granularity)
    y = _ste(x, xq) @ _ste(w, wq).t()
    if r is not None:
        y = y + r @ w.t()
    return y


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_recipe_equals_nn_linear(bias):
    lin, fp4 = _layer("bf16", bias=bias)
    x = _inputs().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref = lin(x)
    y = fp4(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    gw_ref, gx_ref = torch.autograd.grad(y_ref, (lin.weight, x), dy)
    gw, gx = torch.autograd.grad(y, (fp4.weight, x2), dy)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_equals_fake_quant_reference(preset):
    recipe = Recipe.preset(preset)
    lin, fp4 = _layer(recipe)
    x = _inputs()
    y = fp4(x)
    y_ref = _forward_ref(x, lin.weight, recipe) + lin.bias
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # and the quantization actually did something
    assert not torch.allclose(y, lin(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("preset", ["fp4-direct", "fp4-dge", "fp8"])
def test_gradients_equal_ste_autograd_when_grads_unquantized(preset):
    """With dY kept in high precision, dgrad/wgrad are autograd through the STE reference
    (times the DGE factor on the weight gradient)."""
    recipe = Recipe.preset(preset).replace(grad_format=None)
    lin, fp4 = _layer(recipe, bias=False)
    x = _inputs(outliers=False).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w_ref = lin.weight.detach().clone().requires_grad_()
    y = fp4(x2)
    y_ref = _forward_ref(x, w_ref, recipe)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x2, fp4.weight), dy)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w_ref), dy)
    if recipe.dge is not None:
        s_w = quantize(w_ref.detach(), "e2m1", "row").scale
        gw_ref = gw_ref * correction(w_ref.detach() / s_w, "e2m1", recipe.dge.k, recipe.dge.clip)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_backward_equals_explicit_formula(preset):
    """The paper's backward: FP4 W and X reused, their scales folded into dY, dY in E5M2."""
    recipe = Recipe.preset(preset)
    lin, fp4 = _layer(recipe, bias=False)
    x = _inputs().requires_grad_()
    y = fp4(x)
    dy = torch.randn_like(y) * 1e-3
    gx, gw = torch.autograd.grad(y, (x, fp4.weight), dy)

    w = lin.weight.detach()
    if recipe.occ is not None:
        x_c, r = clamp_outliers(x.detach(), recipe.occ.alpha)
        r = r.to_dense(torch.float32)
    else:
        x_c, r = x.detach(), None
    qx = quantize(x_c, recipe.fwd_x.format, "row")
    qw = quantize(w, recipe.fwd_w.format, "row")
    gfmt = recipe.dgrad_dy.format
    dx_ref = fake_quantize(dy * qw.scale.t(), gfmt, "row") @ qw.data
    dw_ref = fake_quantize(dy * qx.scale, gfmt, "col").t() @ qx.data
    if r is not None:
        dw_ref = dw_ref + dy.t() @ r
    if recipe.dge is not None:
        dw_ref = dw_ref * correction(w / qw.scale, recipe.fwd_w.format, 5.0, 3.0)
    torch.testing.assert_close(gx, dx_ref, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gw, dw_ref, rtol=1e-5, atol=1e-9)


def test_dge_changes_weight_gradient_only():
    x = _inputs()
    grads = {}
    for preset in ("fp4-direct", "fp4-dge"):
        lin, fp4 = _layer(preset, bias=False)
        xx = x.clone().requires_grad_()
        y = fp4(xx)
        grads[preset] = torch.autograd.grad(y.square().sum(), (xx, fp4.weight))
    torch.testing.assert_close(grads["fp4-direct"][0], grads["fp4-dge"][0], rtol=0, atol=0)
    assert not torch.allclose(grads["fp4-direct"][1], grads["fp4-dge"][1])


def test_block_and_tensor_granularities_run_and_match_reference():
    recipe = Recipe.preset("fp4-direct").replace(
        fwd_x={"format": "e2m1", "granularity": "block", "block_size": 32},
        fwd_w={"format": "e2m1", "granularity": "tensor"},
        dgrad_w={"format": "e4m3", "granularity": "col"},
        wgrad_x={"format": "e4m3", "granularity": "block", "block_size": 8},
    )
    lin, fp4 = _layer(recipe, bias=False)
    x = _inputs().requires_grad_()
    y = fp4(x)
    xq = fake_quantize(x.detach(), "e2m1", "block", block_size=32)
    wq = fake_quantize(lin.weight.detach(), "e2m1", "tensor")
    torch.testing.assert_close(y, xq @ wq.t(), rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, fp4.weight), dy)
    w_t = fake_quantize(lin.weight.detach(), "e4m3", "col")
    dx_ref = fake_quantize(dy, "e5m2", "row") @ w_t
    x_blk = fake_quantize(x.detach().t(), "e4m3", "block", block_size=8).t()  # blocks along M
    dw_ref = fake_quantize(dy, "e5m2", "col").t() @ x_blk
    torch.testing.assert_close(gx, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, dw_ref, rtol=1e-5, atol=1e-6)


def test_leading_dims_and_bias():
    lin, fp4 = _layer("fp4-paper")
    x = torch.randn(2, 5, 64)
    y = fp4(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y.reshape(10, 48), fp4(x.reshape(10, 64)), rtol=0, atol=0)
    sq = ((y - lin(x)).square().mean() / lin(x).square().mean()).item()
    assert sq < 0.05, f"FP4 layer output relative MSE {sq:.4f} is too large"


def test_state_dict_compatible_with_nn_linear():
    lin, fp4 = _layer("fp4-paper")
    assert fp4.weight is lin.weight and fp4.bias is lin.bias
    assert set(fp4.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    fresh = nn.Linear(64, 48)
    fresh.load_state_dict(fp4.state_dict())
    fp4b = FP4Linear(64, 48, recipe="fp4-paper")
    fp4b.load_state_dict(lin.state_dict())
    torch.testing.assert_close(fp4b.weight, lin.weight, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    _, fp4 = _layer("fp4-paper")
    with pytest.raises(ValueError, match="last dim must be 64"):
        fp4(torch.randn(3, 63))
    with pytest.raises(TypeError, match="floating-point"):
        fp4(torch.ones(3, 64, dtype=torch.int64))
    x = torch.randn(3, 64)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fp4(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        FP4Linear.from_linear(nn.Linear(64, 48), "fp4-direct")(x)
    with pytest.raises(ValueError, match="unknown recipe preset"):
        FP4Linear(64, 48, recipe="fp5")
    with pytest.raises(TypeError, match="nn.Linear"):
        FP4Linear.from_linear(nn.Conv1d(3, 3, 1), "fp4-paper")
    with pytest.raises(RuntimeError, match="CUDA"):
        FP4Linear(64, 48, recipe=Recipe.preset("fp4-paper").replace(backend="triton"))(
            torch.randn(2, 64)
        )


def test_fp4_paper_trains_a_small_regression():
    """A two-layer MLP with fp4-paper layers learns a random linear map (loss drops 5x)."""
    torch.manual_seed(0)
    teacher = torch.randn(32, 64) / 8
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    for i in (0, 2):
        net[i] = FP4Linear.from_linear(net[i], "fp4-paper")
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        x = torch.randn(128, 64)
        loss = (net(x) - x @ teacher.t()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 5, f"loss went {first:.4f} -> {last:.4f}"


def test_act_save_e4m3_rounds_only_the_wgrad_compensation_residual():
    """fp4-paper with act_save="e4m3" keeps OCC's residual R for the weight gradient in E4M3
    (one scale per row): y and dx are unchanged, and dW moves by exactly dYᵀ·(R_e4m3 − R)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=g)
    x[:, 3] *= 25  # an outlier channel
    dy = torch.randn(24, 32, generator=g)
    base = Recipe.preset("fp4-paper").replace(backend="reference")
    lin = FP4Linear(64, 32, bias=False, recipe=base)
    out = {}
    for act_save in (None, "e4m3"):
        lin.recipe = base.replace(act_save=act_save)
        xi = x.clone().requires_grad_()
        lin.weight.grad = None
        y = lin(xi)
        y.backward(dy)
        out[act_save] = (y.detach(), xi.grad, lin.weight.grad.clone())
    (y0, dx0, dw0), (y1, dx1, dw1) = out[None], out["e4m3"]
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    _, r = clamp_outliers(x, base.occ.alpha, base.occ.granularity)
    r = r.to_dense().double()
    q = quantize(r.float(), "e4m3", "row")
    r_e4m3 = q.dequantize().double()
    assert not torch.equal(r_e4m3, r)  # E4M3 rounds some of the residuals
    # DGE scales dW elementwise by a factor that does not depend on the residual
    dge = correction(
        torch.clamp(lin.weight.detach() / quantize(lin.weight.detach(), "e2m1", "row").scale,
                    -6, 6), "e2m1", base.dge.k, base.dge.clip,
    ).double()  # fmt: skip
    want = dw0.double() + dge * (dy.double().t() @ (r_e4m3 - r))
    torch.testing.assert_close(dw1.double(), want, rtol=1e-4, atol=1e-6)


def test_occ_e4m3_compensation_is_the_formula():
    """compensation="e4m3" (reference backend): Y = (data8 · s) · Q(W)ᵀ + R₂ · Wᵀ and
    dW = Q(diag(s)·dY)ᵀ · data8 + dYᵀ · R₂ (then DGE), with data8 / R₂ from
    ``outliers_on_e4m3``; dX as without OCC's compensation."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 64, generator=g)
    x[:, 3] *= 25
    x[5, 9] = 5e4  # beyond 448 · scale: in R₂
    dy = torch.randn(48, 32, generator=g) * 1e-3
    recipe = Recipe.preset("fp4-paper").replace(backend="reference",
                                                **{"occ.compensation": "e4m3"})  # fmt: skip
    fp4 = FP4Linear(64, 32, bias=False, recipe=recipe)
    xr = x.clone().requires_grad_()
    y = fp4(xr)
    y.backward(dy)
    w = fp4.weight.detach()
    x_c, _ = clamp_outliers(x, 0.99)
    qx, qw = quantize(x_c, "e2m1", "row"), quantize(w, "e2m1", "row")
    data8, r2 = outliers_on_e4m3(x, x_c, qx.data, qx.scale)
    assert int((r2 != 0).sum()) == 1
    y_ref = (data8 * qx.scale) @ qw.dequantize().t() + r2 @ w.t()
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-6)
    dw_ref = fake_quantize(dy * qx.scale, "e5m2", "col").t() @ data8 + dy.t() @ r2
    dw_ref = dw_ref * correction(w / qw.scale, "e2m1", 5.0, 3.0)
    torch.testing.assert_close(fp4.weight.grad, dw_ref, rtol=1e-5, atol=1e-9)
    dx_ref = fake_quantize(dy * qw.scale.t(), "e5m2", "row") @ qw.data
    torch.testing.assert_close(xr.grad, dx_ref, rtol=1e-5, atol=1e-9)


def test_occ_e4m3_error_between_no_compensation_and_the_papers():
    """On activations with outlier channels, folding the outliers into the FP8 operand keeps
    most of what compensation buys: the forward error sits below clamping without
    compensation and no more than twice the paper's R·Wᵀ (float64 reference)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:8]] *= 20
    w = torch.randn(128, 256, generator=g) * 0.05
    exact = x.double() @ w.double().t()
    errs = {}
    for name, changes in (("none", {"occ.compensate": False}), ("paper", {}),
                          ("e4m3", {"occ.compensation": "e4m3"})):  # fmt: skip
        recipe = Recipe.preset("fp4-occ").replace(backend="reference", **changes)
        y = FP4Linear(256, 128, bias=False, recipe=recipe)
        y.weight.data.copy_(w)
        with torch.no_grad():
            errs[name] = ((y(x).double() - exact).norm() / exact.norm()).item()
    assert errs["paper"] < errs["e4m3"] < min(errs["none"], 2 * errs["paper"]), errs
