import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fp4train import FP4Linear, Recipe, convert
from fp4train.convert import set_act_save
from fp4train.model import (
    CONFIGS,
    LLaMA,
    ModelConfig,
    RMSNorm,
    apply_rope,
    get_config,
    rms_norm,
    rope_cache,
    swiglu,
)


def small_config(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=32)
    return ModelConfig(**(base | kw))


def make_model(seed: int = 0, **kw) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(small_config(**kw))


# ---- configs and parameter counts ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, lo, hi",
    [
        ("125m", 110e6, 170e6),
        ("350m", 300e6, 420e6),
        ("1.3b", 1.2e9, 1.5e9),
        ("7b", 6.5e9, 7.0e9),
    ],
)
def test_named_config_param_counts(name, lo, hi):
    config = get_config(name, vocab_size=32000)
    n = config.num_params()
    assert lo <= n <= hi, f"{name}: {n:,} params"
    # the analytic count agrees with a model built on the meta device (no memory used)
    with torch.device("meta"):
        model = LLaMA(config)
    assert model.num_params() == n
    assert model.num_params(exclude_embeddings=True) == config.num_params(exclude_embeddings=True)


def test_7b_matches_llama2_7b():
    # LLaMA-2 7B has 6,738,415,616 parameters (untied, vocab 32000)
    assert get_config("7b").num_params() == 6_738_415_616


def test_tiny_config_is_small():
    config = get_config("tiny", vocab_size=4096)
    assert 1e6 <= config.num_params() <= 5e6
    assert config.max_seq_len == 256
    assert LLaMA(config).num_params() == config.num_params()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_configs_fit_fp8_tensor_cores(name):
    config = CONFIGS[name]
    for layer, (n, k) in config.linear_shapes().items():
        if layer != "lm_head":  # vocab comes from the tokenizer
            assert n % 16 == 0 and k % 16 == 0, (name, layer, n, k)


def test_ffn_hidden_defaults():
    # LLaMA's rule: int(8 * dim / 3) rounded up to a multiple of 256
    assert ModelConfig(dim=4096, n_layers=1, n_heads=32).ffn_dim == 11008
    assert ModelConfig(dim=2048, n_layers=1, n_heads=16).ffn_dim == 5632
    assert ModelConfig(dim=768, n_layers=1, n_heads=12, mlp="gelu").ffn_dim == 4 * 768
    assert ModelConfig(dim=768, n_layers=1, n_heads=12, ffn_hidden=1000).ffn_dim == 1000


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("tie", [False, True])
def test_num_params_matches_module(mlp, tie):
    config = small_config(mlp=mlp, n_kv_heads=2, tie_embeddings=tie)
    model = LLaMA(config)
    assert model.num_params() == config.num_params()
    assert model.num_params(True) == config.num_params(True)
    assert (model.lm_head.weight is model.tok_embeddings.weight) == tie
    up = "w13" if mlp == "swiglu" else "w1"
    assert set(model.layers[0].feed_forward.state_dict()) == {f"{up}.weight", "w2.weight"}


def test_flops_per_token_matches_flop_counter():
    model = make_model(n_kv_heads=2)
    B, T = 2, 32
    idx = torch.randint(0, 300, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    c = model.config
    attention = 12 * c.n_layers * c.dim * T  # PaLM term; the CPU SDPA kernel is not counted
    assert counter.get_total_flops() == (model.flops_per_token(T) - attention) * B * T


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(dim=65), "dim"),
        (dict(n_heads=3), "dim"),
        (dict(n_kv_heads=3), "n_heads"),
        (dict(dim=0), "dim"),
        (dict(n_layers=-1), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(ffn_hidden=0), "ffn_hidden"),
        (dict(mlp="relu"), "mlp"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
        (dict(dim=36, n_heads=12), "head_dim"),  # head_dim 3 is odd: no RoPE pairs
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config(**kw)


def test_config_json_round_trip(tmp_path):
    config = small_config(n_kv_heads=2, mlp="gelu", tie_embeddings=True, rope_theta=5e5)
    path = tmp_path / "model.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert get_config(str(path), vocab_size=512) == dataclasses.replace(config, vocab_size=512)


def test_config_from_dict_errors(tmp_path):
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict(small_config().to_dict() | {"n_layer": 3})
    with pytest.raises(ValueError, match="missing.*n_heads"):
        ModelConfig.from_dict({"dim": 64, "n_layers": 2})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(bad)


def test_get_config_errors_and_copies():
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        get_config("huge")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_config("nope.json")
    config = get_config("125m", vocab_size=4096)
    config.dim = 1
    assert CONFIGS["125m"].dim == 768 and CONFIGS["125m"].vocab_size == 32000


# ---- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_forward_shapes_and_dtypes(mlp):
    model = make_model(mlp=mlp)
    idx = torch.randint(0, 300, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 300) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert loss.shape == () and loss.dtype == torch.float32
    # the loss is the mean cross-entropy of those logits
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 300), idx.view(-1)))


def test_forward_errors():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_causality(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (2, 20), generator=g)
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 300, (2, 20 - t - 1), generator=g)
    changed[:, t + 1] = (idx[:, t + 1] + 1) % 300  # surely different
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-3  # the future does change


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    model = LLaMA(get_config("tiny", vocab_size=4096))
    idx = torch.randint(0, 4096, (4, 64))
    loss = model(idx, idx).item()
    assert abs(loss - math.log(4096)) < 0.1, loss


def test_init_stds():
    torch.manual_seed(0)
    config = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=1000)
    model = LLaMA(config)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
            continue
        want = residual if name.endswith(("wo.weight", "w2.weight")) else 0.02
        assert abs(p.std().item() / want - 1) < 0.05, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.05 * want, name


# ---- RoPE, attention, norm -------------------------------------------------------------------


def _rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Float64 complex rotation of pairs (x[i], x[i + D/2]) by pos * theta^(-2i/D)."""
    B, T, H, D = x.shape
    x = x.double()
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    freq = theta ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # [T, D/2]
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_float64_reference(theta):
    torch.manual_seed(0)
    T, D = 2048, 64
    x = torch.randn(2, T, 3, D)
    cos, sin = rope_cache(T, D, theta)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _rope_reference(x, theta), rtol=0, atol=2e-5)


def test_rope_scores_depend_on_relative_position():
    torch.manual_seed(0)
    T, D = 64, 32
    cos, sin = rope_cache(T, D)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs = apply_rope(q.expand(1, T, 1, D).contiguous(), cos, sin)[0, :, 0]  # [T, D]
    ks = apply_rope(k.expand(1, T, 1, D).contiguous(), cos, sin)[0, :, 0]
    scores = qs @ ks.T  # [T, T], scores[m, n] = <rope(q, m), rope(k, n)>
    for offset in (0, 3, -5):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(scores), (q @ k).expand(T), rtol=0, atol=1e-5)


def _repeat_kv_heads(state: dict, config: ModelConfig) -> dict:
    """``state`` of a GQA model turned into its MHA twin's: query head h uses kv head
    h // n_rep, so each kv head's rows of wqkv are repeated n_rep times."""
    H, KV, D = config.n_heads, config.kv_heads, config.head_dim
    state = dict(state)
    for key, w in state.items():
        if key.endswith("wqkv.weight"):
            q, k, v = w.split([H * D, KV * D, KV * D])
            n_rep = H // KV
            k, v = (t.view(KV, D, -1).repeat_interleave(n_rep, dim=0).flatten(0, 1) for t in (k, v))
            state[key] = torch.cat([q, k, v])
    return state


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(n_heads=8, n_kv_heads=2)
    mha = LLaMA(dataclasses.replace(gqa.config, n_kv_heads=None))
    mha.load_state_dict(_repeat_kv_heads(gqa.state_dict(), gqa.config))
    idx = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_attention_matches_explicit_float64():
    model = make_model(n_heads=4, n_kv_heads=2)
    attn = model.layers[0].attention
    B, T, H, KV, D = 2, 10, 4, 2, 16
    x = torch.randn(B, T, 64)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    out = attn(x, cos, sin)

    xd = x.double()
    wq, wk, wv = attn.wqkv.weight.double().split([H * D, KV * D, KV * D])  # rows q, k, v
    q = (xd @ wq.T).view(B, T, H, D)
    k = (xd @ wk.T).view(B, T, KV, D)
    v = (xd @ wv.T).view(B, T, KV, D)
    q, k = _rope_reference(q, 10000.0), _rope_reference(k, 10000.0)
    k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    y = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * D)
    ref = y @ attn.wo.weight.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_attention_does_not_keep_the_fused_qkv_output():
    model = make_model(n_kv_heads=2)
    attn = model.layers[0].attention
    qkv = []
    attn.wqkv.register_forward_hook(lambda m, args, out: qkv.append(out))
    x = torch.randn(2, 10, 64, requires_grad=True)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    _, saved = _saved_activation_bytes(lambda: attn(x, cos, sin), *attn.parameters())
    storage = qkv[0].untyped_storage().data_ptr()
    assert saved and all(t.untyped_storage().data_ptr() != storage for t in saved)


def test_swiglu_feed_forward_matches_explicit_float64():
    model = make_model()
    ff = model.layers[0].feed_forward
    x = torch.randn(2, 10, 64)
    w1, w3 = ff.w13.weight.double().chunk(2)  # rows w1, then w3
    xd = x.double()
    ref = (F.silu(xd @ w1.T) * (xd @ w3.T)) @ ff.w2.weight.double().T
    torch.testing.assert_close(ff(x).double(), ref, rtol=1e-4, atol=1e-6)


_FUSED_LAYER_NAMES = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def _unfuse(state: dict, config: ModelConfig) -> dict:
    """``state`` in the layout before q/k/v and w1/w3 were fused."""
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    old = {}
    for key, w in state.items():
        if key.endswith("attention.wqkv.weight"):
            for name, part in zip(("wq", "wk", "wv"), w.split([q, kv, kv]), strict=True):
                old[key.replace("wqkv", name)] = part.clone()
        elif key.endswith("feed_forward.w13.weight"):
            for name, part in zip(("w1", "w3"), w.chunk(2), strict=True):
                old[key.replace("w13", name)] = part.clone()
        else:
            old[key] = w
    return old


@pytest.mark.parametrize("mlp, recipe", [("swiglu", None), ("gelu", None), ("swiglu", "fp4-paper")])
def test_unfused_checkpoint_loads(mlp, recipe):
    model = make_model(mlp=mlp, n_kv_heads=2)
    old = _unfuse(model.state_dict(), model.config)
    assert "layers.0.attention.wq.weight" in old and "layers.1.feed_forward.w1.weight" in old
    fresh = make_model(seed=1, mlp=mlp, n_kv_heads=2)
    if recipe is not None:  # the fused layers are the ones convert() swaps
        convert(model, recipe)
        convert(fresh, recipe)
        fp4 = {n for n, m in fresh.named_modules() if isinstance(m, FP4Linear)}
        assert fp4 == {f"layers.{i}.{n}" for i in (0, 1) for n in _FUSED_LAYER_NAMES}
    fresh.load_state_dict(old)  # strict: every key used, none missing
    for key, w in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], w), key
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(fresh(idx), model(idx))


def test_partial_unfused_checkpoint_is_refused():
    model = make_model()
    old = _unfuse(model.state_dict(), model.config)
    del old["layers.0.attention.wk.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*layers\.0\.attention\.wqkv"):
        make_model().load_state_dict(old)


def _rmsnorm_formula(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The plain formula RMSNorm computes (autograd of it saves float32 intermediates)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _rmsnorm_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 7, 64, generator=g) * 3).to(dtype).requires_grad_()
    w = torch.empty(64).uniform_(0.5, 1.5, generator=g).requires_grad_()
    dy = torch.randn(4, 7, 64, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("act_save", [None, "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_equals_plain_formula(dtype, act_save):
    x, w, _ = _rmsnorm_inputs(dtype)
    out = rms_norm(x, w, act_save=act_save)
    assert out.dtype == dtype
    assert torch.equal(out, _rmsnorm_formula(x, w))  # saving in E4M3 changes backward only


def test_rmsnorm_gradcheck_float64():
    x, w, _ = _rmsnorm_inputs(torch.float64)
    w = w.detach().double().requires_grad_()
    x = x.detach()[:2, :3].requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w), (x, w))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)])
def test_rmsnorm_grads_match_float64_formula(dtype, rtol):
    x, w, dy = _rmsnorm_inputs(dtype)
    rms_norm(x, w).backward(dy)
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    ref.backward(dy.double())
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    # dx is rounded to x's dtype once; dw (float32) sums exact products of the same inputs
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-6)


def _saved_activation_bytes(fn, *params: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd saves while ``fn()`` runs, leaving out ``params`` (saved by reference)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    skip = {p.data_ptr() for p in params}
    saved = [t for t in saved if t.data_ptr() not in skip]
    return sum(t.numel() * t.element_size() for t in saved), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_saves_only_x_and_rstd(dtype):
    x, w, _ = _rmsnorm_inputs(dtype)
    nbytes, saved = _saved_activation_bytes(lambda: rms_norm(x, w), w)
    rows = 4 * 7
    assert nbytes == x.numel() * x.element_size() + rows * 4  # x as given + float32 rstd
    assert any(t is x for t in saved)  # x itself, not a copy
    plain, _ = _saved_activation_bytes(lambda: _rmsnorm_formula(x, w), w)
    assert plain >= 2 * x.numel() * 4  # the formula keeps float32 x and x̂
    nbytes, saved = _saved_activation_bytes(lambda: rms_norm(x, w, act_save="e4m3"), w)
    assert nbytes == x.numel() * 1 + rows * 4 + rows * 4  # E4M3 x, its float32 scale, rstd
    assert [t.dtype for t in saved] == [torch.float8_e4m3fn, torch.float32, torch.float32]


def _swiglu_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(3, 5, 48, generator=g) * 2).to(dtype)
    b = torch.randn(3, 5, 48, generator=g).to(dtype)
    a[0, 0] = 0  # an all-zero row: scale 1, no NaN
    b[1, 2, :7] *= 300  # a row whose absmax sets a large scale
    dy = torch.randn(3, 5, 48, generator=g).to(dtype)
    return a.requires_grad_(), b.requires_grad_(), dy


def _swiglu_formula(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


@pytest.mark.parametrize("act_save", [None, "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_equals_formula(dtype, act_save):
    a, b, _ = _swiglu_inputs(dtype)
    out = swiglu(a, b, act_save)
    assert out.dtype == dtype
    assert torch.equal(out, _swiglu_formula(a, b))  # saving in E4M3 changes backward only
    if dtype == torch.float32:
        assert torch.equal(out, F.silu(a) * b)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_swiglu_backward_equals_autograd_of_formula(dtype, rtol):
    a, b, dy = _swiglu_inputs(dtype)
    swiglu(a, b).backward(dy)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    _swiglu_formula(a2, b2).backward(dy)
    assert a.grad.dtype == b.grad.dtype == dtype
    for got, want in ((a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)


def test_swiglu_gradcheck_float64():
    a, b, _ = _swiglu_inputs(torch.float64)
    a, b = (t.detach()[:2, :2].requires_grad_() for t in (a, b))
    assert torch.autograd.gradcheck(swiglu, (a, b))


def _e4m3_dequantized_float64(t: torch.Tensor) -> torch.Tensor:
    """Independent reference: float32 scale amax / 448 per row, the quotient x / scale in
    float32 as the library computes it (one correctly rounded float32 division, then the grid
    rounding; a float64 quotient can sit just above a tie that float32 rounds onto, e.g.
    21 + 1e-9 against 21.0, and ml_dtypes 0.7 rounds the float64 value directly), E4M3
    rounding by ml_dtypes."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = t.detach().float().numpy()
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1)).astype(np.float32)
    q = (x / scale).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return torch.from_numpy(q * scale.astype(np.float64))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)])
def test_swiglu_e4m3_backward_is_the_formula_on_dequantized_inputs(dtype, rtol):
    a, b, dy = _swiglu_inputs(dtype)
    swiglu(a, b, "e4m3").backward(dy)
    a_hat, b_hat = (_e4m3_dequantized_float64(t).requires_grad_() for t in (a, b))
    (F.silu(a_hat) * b_hat).backward(dy.double())
    assert a.grad.dtype == b.grad.dtype == dtype
    for got, want in ((a.grad, a_hat.grad), (b.grad, b_hat.grad)):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5)
    # and it is not the exact gradient: E4M3 keeps 3 mantissa bits
    a.grad = None
    swiglu(a, b).backward(dy)
    assert not torch.equal(a.grad, a_hat.grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_saves_only_its_inputs(dtype):
    a, b, _ = _swiglu_inputs(dtype)
    n, rows = a.numel(), a.numel() // a.shape[-1]
    nbytes, saved = _saved_activation_bytes(lambda: swiglu(a, b))
    assert nbytes == 2 * n * a.element_size() and {id(t) for t in saved} == {id(a), id(b)}
    nbytes, saved = _saved_activation_bytes(lambda: swiglu(a, b, "e4m3"))
    assert nbytes == 2 * (n * 1 + rows * 4)  # 1-byte values + a float32 scale per row
    assert [t.dtype for t in saved] == 2 * [torch.float8_e4m3fn, torch.float32]
    plain, _ = _saved_activation_bytes(lambda: _swiglu_formula(a, b))
    assert plain >= 3 * n * a.element_size()  # the formula keeps a, b and silu(a)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)])
def test_rmsnorm_e4m3_backward_is_the_formula_at_dequantized_x(dtype, rtol):
    """The reference, in float64: rstd = (mean(x²) + eps)^(-1/2) of the exact x (as saved in
    forward), x̂ = deq(x) · rstd with deq the ml_dtypes E4M3 round trip, g = dy · w;
    dx = rstd · (g − x̂ · mean(g · x̂)) and dw = Σ_rows dy · x̂."""
    x, w, dy = _rmsnorm_inputs(dtype)
    with torch.no_grad():
        x[0, 0] = 0  # an all-zero row: scale 1, dx = rstd · g
        x[1, 2, :5] *= 100  # a row whose absmax sets a large scale
    rms_norm(x, w, act_save="e4m3").backward(dy)
    xd, wd, dyd = (t.detach().double() for t in (x, w, dy))
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    g = dyd * wd
    x_hat = _e4m3_dequantized_float64(x) * rstd
    dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    dw = (dyd * x_hat).sum((0, 1))
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), dx, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-5, atol=1e-5)
    # and it is not the exact gradient (x̂ = x · rstd): E4M3 keeps 3 mantissa bits
    x_hat = xd * rstd
    exact_dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    exact_dw = (dyd * x_hat).sum((0, 1))
    assert not torch.allclose(x.grad.double(), exact_dx, rtol=rtol, atol=1e-6)
    assert not torch.allclose(w.grad.double(), exact_dw, rtol=1e-5, atol=1e-5)


def test_swiglu_and_rmsnorm_reject_unknown_act_save():
    a, b, _ = _swiglu_inputs(torch.float32)
    msg = r"act_save must be one of \(None, 'e4m3'\), got 'fp8'"
    with pytest.raises(ValueError, match=msg):
        swiglu(a, b, "fp8")
    with pytest.raises(ValueError, match=msg):
        rms_norm(a, torch.ones(a.shape[-1]), act_save="fp8")


def test_e4m3_act_save_reaches_every_norm_and_swiglu():
    model = make_model()
    dim, ffn, rows = model.config.dim, model.config.ffn_dim, 2 * 16
    idx = torch.randint(0, 300, (2, 16))
    plain, _ = _saved_activation_bytes(lambda: model(idx, idx), *model.parameters())
    assert set_act_save(model, "e4m3") == 2 * 3 + 1  # 2 norms and 1 SwiGLU per block, final norm
    nbytes, saved = _saved_activation_bytes(lambda: model(idx, idx), *model.parameters())
    fp8 = sorted(tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn)
    assert fp8 == sorted([(2, 16, dim)] * 5 + [(2, 16, ffn)] * 4)
    # float32 model: 4-byte inputs become 1-byte values plus a float32 scale per row
    assert plain - nbytes == 5 * (3 * rows * dim - 4 * rows) + 4 * (3 * rows * ffn - 4 * rows)


@pytest.mark.parametrize("recipe", [None, "fp4-paper"])
def test_trains_with_e4m3_saved_activations(recipe, one_thread):
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    runs = {}
    for act_save in (None, "e4m3"):
        model = make_model(n_kv_heads=2)
        if recipe is not None:
            convert(model, Recipe.preset(recipe).replace(act_save=act_save))
        else:
            set_act_save(model, act_save)
        assert all(blk.feed_forward.act_save == act_save for blk in model.layers)
        assert all(m.act_save == act_save for m in model.modules() if isinstance(m, RMSNorm))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[act_save] = losses
    assert all(math.isfinite(x) for x in runs["e4m3"])
    assert runs["e4m3"][0] == runs[None][0]  # same forward; backward differs
    assert runs["e4m3"][-1] < 0.9 * runs["e4m3"][0], runs
    for x, y in zip(runs["e4m3"], runs[None], strict=True):
        assert abs(x - y) < 0.02 * y, runs


def test_rmsnorm_computes_in_float32():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(4, 64) * 1e3).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    xd = x.double()
    ref = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    # float32 math then one rounding to bf16: within half a bf16 ulp (2^-9 relative) plus slack
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=0)


def test_bf16_autocast_forward_close_to_float32():
    model = make_model()
    idx = torch.randint(0, 300, (2, 32))
    loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss16 = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02


def _compiled_matches_eager(backend: str, act_save: str | None = None) -> None:
    model = make_model(n_kv_heads=2)
    assert set_act_save(model, act_save) == 7  # 4 norms and 2 SwiGLUs in the blocks, final norm
    idx = torch.randint(0, 300, (2, 32))
    model(idx, idx).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, idx))
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act_save", [None, "e4m3"])
def test_compiles_without_graph_breaks(act_save):
    _compiled_matches_eager("aot_eager", act_save)


@pytest.mark.slow
@pytest.mark.parametrize("act_save", [None, "e4m3"])
def test_inductor_compile_matches_eager(act_save):
    _compiled_matches_eager("inductor", act_save)  # ~30 s on a CPU: C++ codegen, fwd and bwd


def test_compile_blocks_traces_one_graph_for_all_blocks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fp4train.model import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    model = make_model(n_kv_heads=2)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert compile_blocks(model, backend="aot_eager") is model
    assert list(model.state_dict()) == keys  # checkpoints load either way
    idx = torch.randint(0, 300, (2, 32))
    for _ in range(2):
        loss = model(idx, idx)
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 2 blocks, 2 steps
    want = eager(idx, idx)
    (want * 2).backward()  # two accumulated steps
    torch.testing.assert_close(loss, want)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="non-empty .layers"):
        compile_blocks(nn.Linear(4, 4))


# ---- training and generation -----------------------------------------------------------------


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_optimizer_steps_decrease_loss(mlp):
    model = make_model(mlp=mlp, n_kv_heads=2)
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_generate_greedy_and_top1():
    model = make_model()
    prompt = torch.randint(0, 300, (2, 5))
    out = model.generate(prompt, max_new_tokens=40, temperature=0)  # runs past max_seq_len 32
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    expected = prompt
    for _ in range(40):
        nxt = model(expected[:, -32:])[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(out, expected)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 40, temperature=0.7, top_k=1), expected)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1)


# ---- CUDA ------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_model(**kw) -> LLaMA:
    torch.manual_seed(0)
    config = small_config(dim=256, n_heads=8, n_kv_heads=2, vocab_size=1024, max_seq_len=256)
    return LLaMA(dataclasses.replace(config, **kw)).cuda()


def _grads(model: LLaMA) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_cuda_bf16_autocast_close_to_float32(mlp):
    model = _cuda_model(mlp=mlp)
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    loss32 = model(idx, idx)
    loss32.backward()
    g32 = _grads(model)
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16 = model(idx, idx)
    loss16.backward()
    g16 = _grads(model)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02
    cos = F.cosine_similarity(g16, g32, dim=0).item()
    assert cos > 0.99, cos


@pytest.mark.gpu
@requires_cuda
def test_cuda_compile_matches_eager():
    model = _cuda_model()
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx, idx)
        fast = compiled(idx, idx)
    eager.backward()
    g_eager = _grads(model)
    model.zero_grad()
    fast.backward()
    assert abs(fast.item() - eager.item()) < 1e-2
    cos = F.cosine_similarity(_grads(model), g_eager, dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("recipe", ["fp4-dge", "fp4-paper"])
def test_cuda_compile_blocks_with_fp4_matches_eager(recipe):
    """Each block compiled (the traced quantizers fused by Inductor) vs the eager triton path:
    Inductor skips some bf16 roundings between fused ops, which moves a few FP4 grid values
    (and, with OCC, a few elements across the clamp threshold), so the comparison is by loss
    and gradient direction, against the recipe's own distance from BF16: compiling must move
    the gradient by less than a fifth of what FP4 quantization moves it."""
    import torch._dynamo

    from fp4train.model import compile_blocks

    torch._dynamo.reset()
    model = _cuda_model()
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(idx, idx).backward()
    g_bf16 = _grads(model)
    model.zero_grad()
    convert(model, Recipe.preset(recipe).replace(backend="triton"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx, idx)
    eager.backward()
    g_eager = _grads(model)
    model.zero_grad()
    compile_blocks(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(idx, idx)
    fast.backward()
    assert abs(fast.item() - eager.item()) < 1e-2 * eager.item()
    gap_compile = 1 - F.cosine_similarity(_grads(model), g_eager, dim=0).item()
    gap_fp4 = 1 - F.cosine_similarity(g_eager, g_bf16, dim=0).item()
    assert gap_compile < 0.2 * gap_fp4, (gap_compile, gap_fp4)


@pytest.mark.gpu
@requires_cuda
def test_cuda_gqa_equals_repeated_kv_in_bf16():
    gqa = _cuda_model()
    mha = LLaMA(dataclasses.replace(gqa.config, n_kv_heads=None)).cuda()
    mha.load_state_dict(_repeat_kv_heads(gqa.state_dict(), gqa.config))
    idx = torch.randint(0, 1024, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = gqa(idx).float(), mha(idx).float()
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-2, err
