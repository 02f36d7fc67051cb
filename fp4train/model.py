"""A compact LLaMA-style decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU or GeLU MLP.

One block, pre-norm::

    q, k, v = split(wqkv(norm(x)))                      # one GEMM for the three projections
    h = x + wo(attention(rope(q), rope(k), v))
    a, b = split(w13(norm(h)))                          # SwiGLU: w1 and w3 in one GEMM
    y = h + w2(silu(a) * b)                             # GeLU MLP: w2(gelu(w1(norm(h))))

Every GEMM is an ``nn.Linear`` without bias (``attention.{wqkv,wo}``,
``feed_forward.{w13,w2}`` or ``feed_forward.{w1,w2}`` for GeLU, ``lm_head``), so
:func:`fp4train.convert` can swap them for FP4 layers; embeddings, norms, RoPE, softmax and
the loss stay in high precision. Fusing the projections that read the same input means an FP4
recipe quantizes and saves that input once, not three (or two) times, and launches one GEMM.
Checkpoints in the unfused layout (``wq, wk, wv``; ``w1, w3``) still load: their weights are
concatenated on the way in. The paper's model is LLaMA-2 with a GeLU MLP of width 4·dim
(``mlp="gelu"``); ``mlp="swiglu"`` is LLaMA's.

Norms, RoPE and the loss compute in float32 also under bf16 autocast; SwiGLU in its inputs'
dtype, as ``F.silu(a) * b`` does. RMSNorm and SwiGLU are autograd Functions that save only
their inputs (and one float32 rstd per row) for backward and recompute the rest there
(:func:`rms_norm`, :func:`swiglu`), not the intermediates autograd of the formulas would keep;
both can keep their inputs in FP8 E4M3 with a float32 scale per row (``Recipe.act_save``).
RoPE rotates the two halves of each head (the GPT-NeoX / Hugging Face LLaMA layout: pair ``i``
is ``(x[i], x[i + head_dim/2])``), not interleaved pairs as in Meta's reference code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp4train.formats import E4M3
from fp4train.quantize import quantize
from fp4train.recipe import ACT_SAVES

__all__ = [
    "ModelConfig",
    "CONFIGS",
    "get_config",
    "LLaMA",
    "compile_blocks",
    "RMSNorm",
    "rms_norm",
    "swiglu",
    "apply_rope",
    "rope_cache",
]

_MLPS = ("swiglu", "gelu")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass
class ModelConfig:
    """Shapes of a :class:`LLaMA` model.

    ``n_kv_heads`` None means ``n_heads`` (plain multi-head attention); fewer gives grouped-query
    attention. ``ffn_hidden`` None means LLaMA's rule for SwiGLU (``8·dim/3`` rounded up to a
    multiple of 256: 11008 at dim 4096) and ``4·dim`` for GeLU (the paper's model). Sizes are
    checked on construction; a bad value raises ``ValueError`` naming the field.
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = 32000
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    mlp: str = "swiglu"
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (called on construction)."""
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "ffn_hidden"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.mlp not in _MLPS:
            raise ValueError(f"ModelConfig field 'mlp' must be one of {_MLPS}, got {self.mlp!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig field 'dim' ({self.dim}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig field 'n_heads' ({self.n_heads}) must be divisible by n_kv_heads "
                f"({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig field 'dim': head_dim = dim / n_heads = {self.head_dim} must be even "
                "for rotary embeddings"
            )
        for name in ("rope_theta", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"ModelConfig field {name!r} must be a positive number, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"ModelConfig field 'tie_embeddings' must be True or False, got "
                f"{self.tie_embeddings!r}"
            )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads``, or ``n_heads`` when None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP (``ffn_hidden`` or the default rule for ``mlp``)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.dim
        return _round_up(int(2 * 4 * self.dim / 3), 256)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each linear layer of one block, plus ``lm_head``."""
        qkv = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        up = 2 * self.ffn_dim if self.mlp == "swiglu" else self.ffn_dim
        return {
            "attention.wqkv": (qkv, self.dim),
            "attention.wo": (self.dim, self.dim),
            "feed_forward.w13" if self.mlp == "swiglu" else "feed_forward.w1": (up, self.dim),
            "feed_forward.w2": (self.dim, self.ffn_dim),
            "lm_head": (self.vocab_size, self.dim),
        }

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count computed from the shapes alone (no model is built).

        Equals ``LLaMA(self).num_params(exclude_embeddings)``. ``exclude_embeddings`` drops the
        token-embedding table (a lookup, no FLOPs); the LM head stays unless it is tied to it.
        """
        shapes = self.linear_shapes()
        head = shapes.pop("lm_head")
        per_block = sum(n * k for n, k in shapes.values()) + 2 * self.dim  # + 2 RMSNorm weights
        n = self.n_layers * per_block + self.dim  # + final norm
        embedding = self.vocab_size * self.dim
        if not self.tie_embeddings:
            n += head[0] * head[1]
        if not exclude_embeddings:
            n += embedding
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate.

        ``6·N + 12·n_layers·dim·seq_len``: N counts every weight that takes part in a matmul
        (all linear layers and the LM head, tied or not; not the embedding lookup or norms),
        the second term is the attention scores and values without causal halving.
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        shapes = self.linear_shapes()
        head = shapes.pop("lm_head")
        matmul_params = self.n_layers * sum(n * k for n, k in shapes.values()) + head[0] * head[1]
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.dim * seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown or missing keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict expects a dict, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; allowed: {sorted(fields)}")
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"ModelConfig is missing required fields {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config written by :meth:`to_json` (or any JSON object of its fields)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config file {str(path)!r} does not exist")
        with path.open(encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"model config file {str(path)!r} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _check_positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"ModelConfig field {name!r} must be a positive int, got {v!r}")


# Named shapes; vocab_size is replaced by the tokenizer's at train time. Every linear dim is a
# multiple of 16 (FP8 tensor cores). "tiny" trains on a CPU in minutes.
CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, ffn_hidden=384, max_seq_len=256),
    "125m": ModelConfig(dim=768, n_layers=12, n_heads=12),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16),
    "1.3b": ModelConfig(dim=2048, n_layers=24, n_heads=16),
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008),  # LLaMA-2 7B
}


def get_config(name_or_path: str | Path, vocab_size: int | None = None) -> ModelConfig:
    """A named config from :data:`CONFIGS` or a JSON file, with ``vocab_size`` overridden.

    Returns a fresh copy; changing it does not change :data:`CONFIGS`.
    """
    name = str(name_or_path)
    if name in CONFIGS:
        config = dataclasses.replace(CONFIGS[name])
    elif Path(name).is_file():
        config = ModelConfig.from_json(name)
    elif name.endswith(".json"):
        raise FileNotFoundError(f"model config file {name!r} does not exist")
    else:
        raise ValueError(
            f"unknown model config {name!r}: use one of {list(CONFIGS)} or a path to a JSON file"
        )
    if vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    return config


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # no `.to` when the dtype already matches: torch 2.11's Dynamo turns the gradient of a
    # Function output that is a no-op `.to` of an intermediate into zeros
    return t if t.dtype == dtype else t.to(dtype)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _e4m3_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., D] as FP8 E4M3 values (1 byte each) and one float32 absmax scale per row
    [..., 1]; NaN/Inf propagate (no host sync to check them). On an FP8-capable GPU one
    Triton launch (``fp4train.kernels.quantize_rows``, bit for bit the reference quantizer's
    numbers), elsewhere the reference quantizer."""
    if t.is_cuda and t.dtype in (torch.bfloat16, torch.float32) and t.numel():
        from fp4train import kernels

        if kernels.triton_available():
            from fp4train.kernels.quantize import quantize_rows

            t2 = t.reshape(-1, t.shape[-1])
            q, s, _, _ = quantize_rows(t2, "e4m3", store_q=True)
            m = t2.shape[0]
            return q[:m].view(t.shape), s[:m].view(*t.shape[:-1], 1)
    q = quantize(t, E4M3, "row", nonfinite="propagate")
    return q.data.to(torch.float8_e4m3fn), q.scale  # exact: q.data lies on the E4M3 grid


def _check_act_save(act_save: str | None) -> None:
    if act_save not in ACT_SAVES:
        raise ValueError(f"act_save must be one of {ACT_SAVES}, got {act_save!r}")


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves x (as given, or with ``act_save="e4m3"`` its E4M3 values and per-row
    scales) and the per-row rstd [..., 1] for backward, and recomputes the normalized
    x̂ = x · rstd there: autograd of the plain formula would also keep x̂ in float32, and a
    float32 copy of x when x is bf16. rstd comes from the exact x, so the forward is the same
    with either act_save."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, act_save: str | None
    ) -> torch.Tensor:
        x_w = x.to(_work_dtype(x))
        rstd = torch.rsqrt(x_w.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.act_save, ctx.x_dtype = act_save, x.dtype
        if act_save == "e4m3":
            ctx.save_for_backward(*_e4m3_rows(x), weight, rstd)
        else:
            ctx.save_for_backward(x, weight, rstd)
        return _cast(x_w * rstd * weight.to(x_w.dtype), x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.act_save == "e4m3":
            x_e4m3, scale_x, weight, rstd = ctx.saved_tensors
            x = x_e4m3.to(rstd.dtype) * scale_x  # dequantized in the work dtype
        else:
            x, weight, rstd = ctx.saved_tensors
        work = rstd.dtype
        x_hat = x.to(work) * rstd
        dy_w = dy.to(work)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = dy_w * weight.to(work)  # gradient w.r.t. x̂
            # x̂_i = x_i · rstd, rstd = mean(x²)^(-1/2): dx = rstd · (g − x̂ · mean(g · x̂))
            dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
            dx = _cast(dx, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _cast((dy_w * x_hat).reshape(-1, x.shape[-1]).sum(0), weight.dtype)
        return dx, dw, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, act_save: str | None = None
) -> torch.Tensor:
    """``x / sqrt(mean(x², -1) + eps) * weight`` in float32 (float64 for float64 input), cast
    back to x's dtype.

    Backward keeps one float32 rstd per row and x as it is (``act_save=None``) or in FP8 E4M3
    with one float32 absmax scale per row (``act_save="e4m3"``, see ``Recipe.act_save``); it
    recomputes x̂ from the (dequantized) x and the rstd of the exact x.
    """
    _check_act_save(act_save)
    return _RMSNormFn.apply(x, weight, eps, act_save)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 and cast back to the input's dtype.

    ``act_save`` (None or ``"e4m3"``; :func:`fp4train.convert` sets it from the recipe) is how
    x is kept for backward, see :func:`rms_norm`.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.act_save: str | None = None
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.act_save)


class _SwiGLUFn(torch.autograd.Function):
    """``silu(a) · b`` that saves only a and b for backward (or, with ``act_save="e4m3"``,
    their E4M3 values and per-row scales) and recomputes silu there: autograd of the formula
    would also keep silu(a). Computed in the inputs' dtype, as ``F.silu(a) * b`` is (torch's
    kernels work in float32 per element); the backward uses torch's ``silu_backward``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, act_save: str | None) -> torch.Tensor:
        ctx.act_save, ctx.dtypes = act_save, (a.dtype, b.dtype)
        if act_save == "e4m3":
            ctx.save_for_backward(*_e4m3_rows(a), *_e4m3_rows(b))
        else:
            ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.act_save == "e4m3":  # dequantized in float32 (a bf16 rounding of a would move
            # silu'(a)'s zero), the gradients computed there and cast back
            a_e4m3, scale_a, b_e4m3, scale_b = ctx.saved_tensors
            work = _work_dtype(dy)
            a, b, dy = a_e4m3.to(work) * scale_a, b_e4m3.to(work) * scale_b, dy.to(work)
        else:
            a, b = ctx.saved_tensors
        da = db = None
        if ctx.needs_input_grad[0]:
            da = _cast(torch.ops.aten.silu_backward(dy * b, a), ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            db = _cast(dy * F.silu(a), ctx.dtypes[1])
        return da, db, None


def swiglu(a: torch.Tensor, b: torch.Tensor, act_save: str | None = None) -> torch.Tensor:
    """``silu(a) * b`` in a's dtype (the same numbers as ``F.silu(a) * b``).

    Backward keeps a and b as they are (``act_save=None``) or in FP8 E4M3 with one float32
    absmax scale per row (``act_save="e4m3"``, see ``Recipe.act_save``), and recomputes silu.
    """
    _check_act_save(act_save)
    return _SwiGLUFn.apply(a, b, act_save)


def rope_cache(
    seq_len: int, head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles ``pos · theta^(-2i/head_dim)``, each [seq_len, head_dim/2]."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    # angles in float64 so large positions keep their precision; stored as float32
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x[..., i], x[..., i + D/2])`` of x [B, T, H, D] by its angle.

    cos, sin: [T, D/2] from :func:`rope_cache`. Computed in float32, returned in x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, D/2] each
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()  # [T, 1, D/2]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def _fuse_unfused_weights(
    parts: tuple[str, ...], fused: str, module: nn.Module, state_dict: dict, prefix: str, *_
) -> None:
    """Load-state-dict pre-hook: concatenate the rows of an unfused checkpoint's ``parts``
    weights (in order) into ``fused``; a no-op unless all of them are present."""
    keys = [f"{prefix}{part}.weight" for part in parts]
    if f"{prefix}{fused}.weight" not in state_dict and all(k in state_dict for k in keys):
        state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


class Attention(nn.Module):
    """Causal GQA attention; ``wqkv`` holds the rows of wq, wk, wv stacked in that order."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_sizes = (q, kv, kv)
        self.wqkv = nn.Linear(config.dim, q + 2 * kv, bias=False)
        self.wo = nn.Linear(q, config.dim, bias=False)
        self.register_load_state_dict_pre_hook(
            functools.partial(_fuse_unfused_weights, ("wq", "wk", "wv"), "wqkv")
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        # a copy: attention saves v for backward, and as a view v would keep all of wqkv's
        # output alive (q and k leave through RoPE's new tensors)
        v = v.contiguous().view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        # enable_gqa lets each group of n_heads / n_kv_heads query heads share one kv head
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(a) * b)`` with ``a, b`` the two halves of ``w13(x)`` (w1's rows, then
    w3's), or GeLU ``w2(gelu(w1(x)))``.

    ``act_save`` (None or ``"e4m3"``; :func:`fp4train.convert` sets it from the recipe) is how
    the SwiGLU keeps a and b for backward, see :func:`swiglu`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.act_save: str | None = None
        if self.swiglu:
            self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
            self.register_load_state_dict_pre_hook(
                functools.partial(_fuse_unfused_weights, ("w1", "w3"), "w13")
            )
        else:
            self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            a, b = self.w13(x).chunk(2, dim=-1)
            return self.w2(swiglu(a, b, self.act_save))
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class LLaMA(nn.Module):
    """LLaMA-style decoder-only transformer.

    ``forward(idx)`` returns logits [B, T, vocab]; ``forward(idx, targets)`` the mean
    cross-entropy loss (float32 scalar; targets equal to -100 are ignored).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # non-persistent: recomputed from the config, never stored in checkpoints
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize weights and the RoPE tables, e.g. after ``to_empty()`` from meta.

        Normal(0, 0.02) for embeddings and linear layers; the residual output projections
        (``wo``, ``w2``) get std 0.02 / sqrt(2·n_layers) (GPT-2) so the residual stream's
        variance does not grow with depth; RMSNorm weights 1.
        """
        device = self.tok_embeddings.weight.device
        cos, sin = rope_cache(
            self.config.max_seq_len,
            self.config.head_dim,
            self.config.rope_theta,
            device=None if device.type == "meta" else device,
        )
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith((".wo", ".w2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, seq_len], got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        x = self.tok_embeddings(idx)  # [B, T, dim]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
            )
        # .float() saves nothing for backward; cross_entropy keeps only its float32 log-softmax
        return F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied LM head counted once); see ``ModelConfig.num_params``."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len``; see ``ModelConfig.flops_per_token``."""
        return self.config.flops_per_token(seq_len)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx [B, T]; temperature 0 is greedy.

        Re-runs the whole (cropped) context each step: simple, not fast.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.max_seq_len :])[:, -1, :].float()  # [B, V]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def compile_blocks(model: LLaMA, **compile_kwargs) -> LLaMA:
    """``torch.compile`` each transformer block of ``model`` in place (torchtitan's way).

    The blocks share their code and their parameters are graph inputs, so Dynamo traces one
    block and every other block reuses the graph: compiling takes seconds where
    ``torch.compile(model)`` traces all of them as one graph (minutes for the 1.3B model with
    FP4Linear layers). The embedding, final norm, LM head and loss run eager. Parameter names
    and state-dict keys do not change; call it before DDP / FSDP2 wrapping. ``compile_kwargs``
    go to ``torch.compile``. Returns ``model``.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"compile_blocks needs a model with a non-empty .layers ModuleList (an "
            f"fp4train.model.LLaMA), got {type(model).__name__}"
        )
    for block in layers:
        block.compile(**compile_kwargs)
    return model
