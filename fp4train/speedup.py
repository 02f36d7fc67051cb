"""How much faster should FP4 training be than BF16? Two estimates, with every term shown.

1. :func:`theoretical_speedup` is the paper's Appendix B (arXiv 2501.17116). Per Transformer
   layer (hidden h, sequence s, batch b; MHA and a GeLU MLP of width 4h) the forward pass costs
   (Table 5)::

       GEMMs 24bsh² (q,k,v 6 + out 2 + up 8 + down 8)      FP4: 4× faster
       attention scores 4bs²h + softmax bs²h                 unaccelerated
       2 LayerNorms 8bsh + GeLU 28bsh                        unaccelerated

   and training three times that, so the ideal ratio is (24h + 5s + 36) / (6h + 5s + 36) =
   3.12× at h = 4096, s = 2048. The appendix then adds DGE (8 FLOPs per element of the weight
   gradients' inputs, 96bsh per step) and OCC (sparse residual GEMMs of density 2(1−α), written
   2(1−α)·12bsh² per forward) and prints (24h + 5s + 36) / (6h + 24(1−α)h + 5s + 68), which is
   **3.03×** at α = 0.99, with an OCC share of 2.8%. The text reports **2.95×** and 5.6%
   instead: those follow from 2(1−α)·24bsh², the residual's density times the 24bsh² forward
   GEMM FLOPs of Table 5 (12bsh² is those GEMMs' multiply-add count, half their FLOPs). Both
   are computed here (``occ_flops="printed"`` / ``"reported"``).

2. :func:`step_time_estimate` prices one training step of a real model on real hardware: GEMM
   FLOPs from the model's shapes (GQA, SwiGLU or GeLU, LM head), at the tensor-core rate each
   GEMM's operand formats allow on that chip (:data:`HARDWARE`: measured where we measured,
   datasheet otherwise), plus the memory-bound passes the paper leaves out: quantizing X, W and
   dY, OCC's quantile estimate and residual, DGE's pass over W. Hopper has no FP4 tensor cores;
   FP4 values run exactly on FP8 ones (every E2M1 value is an E4M3 value), so there the GEMMs
   gain fp8/bf16 ≈ 1.7×, not 4×. The paper's recipe keeps dY in E5M2, so even on Blackwell
   dgrad and wgrad run at the FP8 rate.

Both are estimates at peak rates with no overlap between terms; :func:`main` prints them
(``fp4train speedup``) next to a measured ratio when given one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from fp4train import formats
from fp4train.recipe import OperandSpec, Recipe

__all__ = [
    "Peak",
    "Hardware",
    "HARDWARE",
    "theoretical_speedup",
    "format_theoretical",
    "step_time_estimate",
    "format_estimate",
    "main",
]

_BF16 = 2  # bytes per element of every high-precision activation, weight and gradient


# ---------------------------------------------------------------------------- paper, App. B
def theoretical_speedup(
    h: int,
    s: int,
    *,
    gemm_speedup: float = 4.0,
    dge: bool = True,
    occ_alpha: float | None = 0.99,
    occ_flops: str = "printed",
) -> dict[str, Any]:
    """The paper's FLOP-ratio speed-up of FP4 over BF16 training (Appendix B, Table 5).

    Args:
        h: hidden size; s: sequence length.
        gemm_speedup: how much faster the FP4 GEMMs run than BF16 (the paper: 4).
        dge: add the DGE overhead, 96·bsh per step.
        occ_alpha: OCC quantile α (None: no OCC); residual density 2(1−α).
        occ_flops: ``"printed"``: the appendix's formula, 2(1−α)·12bsh² per forward (3.03× at
            h=4096, s=2048, α=0.99); ``"reported"``: 2(1−α)·24bsh², which reproduces the
            2.95× and 5.6% the appendix reports.

    Returns a dict: ``terms`` (each ``{"bf16": …, "fp4": …}`` in FLOPs per layer per token for
    a whole training step, i.e. the paper's b·s·h expressions divided by b·s), the totals, the
    ``ratio``, the DGE and OCC ``overhead`` shares (of the FP4 total without them, as the paper
    quotes them), the ``formula`` and what it ``omits``.
    """
    for name, v in (("h", h), ("s", s)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(gemm_speedup, bool) or not isinstance(gemm_speedup, int | float):
        raise ValueError(f"gemm_speedup must be a number, got {gemm_speedup!r}")
    if not gemm_speedup > 0:
        raise ValueError(f"gemm_speedup must be > 0, got {gemm_speedup!r}")
    _check_alpha(occ_alpha)
    if occ_flops not in ("printed", "reported"):
        raise ValueError(f"occ_flops must be 'printed' or 'reported', got {occ_flops!r}")

    # forward FLOPs per layer per token (Table 5 / (b·s)); training = 3 × forward
    fwd = {
        "gemm": 24.0 * h * h,
        "attention_scores": 4.0 * s * h,
        "softmax": 1.0 * s * h,
        "layernorm": 8.0 * h,
        "gelu": 28.0 * h,
    }
    terms = {k: {"bf16": 3 * v, "fp4": 3 * v} for k, v in fwd.items()}
    terms["gemm"]["fp4"] = 3 * fwd["gemm"] / gemm_speedup
    base_fp4 = sum(t["fp4"] for t in terms.values())
    # DGE: 8 FLOPs × (3bsh + bsh + 4bsh + 4bsh) = 96bsh, once per step (not × 3)
    terms["dge"] = {"bf16": 0.0, "fp4": 96.0 * h if dge else 0.0}
    occ = 0.0
    if occ_alpha is not None:
        gemm_fwd = 12.0 * h * h if occ_flops == "printed" else 24.0 * h * h
        occ = 3 * 2 * (1 - occ_alpha) * gemm_fwd
    terms["occ"] = {"bf16": 0.0, "fp4": occ}
    bf16_total = sum(t["bf16"] for t in terms.values())
    fp4_total = sum(t["fp4"] for t in terms.values())

    g = f"{gemm_speedup:g}"
    occ_coef = "12" if occ_flops == "printed" else "24"
    formula = f"3(24bsh² + 5bs²h + 36bsh) / (3(24bsh²/{g} + 5bs²h + 36bsh"
    if occ_alpha is not None:
        formula += f" + 2(1−α)·{occ_coef}bsh²"
    formula += ")" + (" + 96bsh" if dge else "") + ")"
    return {
        "h": h,
        "s": s,
        "gemm_speedup": float(gemm_speedup),
        "dge": dge,
        "occ_alpha": occ_alpha,
        "occ_flops": occ_flops,
        "unit": "FLOPs per layer per token, forward + backward",
        "terms": terms,
        "bf16_total": bf16_total,
        "fp4_total": fp4_total,
        "ratio": bf16_total / fp4_total,
        "overhead": {"dge": terms["dge"]["fp4"] / base_fp4, "occ": occ / base_fp4},
        "formula": formula,
        "omits": [
            "quantize kernels: scales and casts of X, W, dY (memory-bound; see step_time_estimate)",
            "OCC's quantile search over X, and sparse-GEMM inefficiency",
            "dY is E5M2 in the paper's recipe: dgrad and wgrad run at the FP8 rate, 2× not 4×",
            "LM head, embeddings, loss, optimizer step, communication",
            "shapes: Table 5 assumes MHA and a GeLU MLP of width 4h (LLaMA uses SwiGLU)",
            "DGE really costs 8 FLOPs per weight (12h² per layer, per micro-batch), not per bsh",
        ],
    }


def format_theoretical(h: int, s: int, *, occ_alpha: float | None = 0.99) -> str:
    """The paper's numbers at (h, s): ideal, printed formula, reported; and what they omit."""
    ideal = theoretical_speedup(h, s, dge=False, occ_alpha=None)
    printed = theoretical_speedup(h, s, occ_alpha=occ_alpha, occ_flops="printed")
    reported = theoretical_speedup(h, s, occ_alpha=occ_alpha, occ_flops="reported")

    def row(label: str, formula: str, r: dict) -> str:
        over = f"DGE {r['overhead']['dge']:.1%}, OCC {r['overhead']['occ']:.1%}"
        return f"  {label:9s} {formula:44s} = {r['ratio']:.2f}×   {over}"

    lines = [
        f"Paper App. B, FLOP ratio with FP4 GEMMs 4× BF16 (h={h}, s={s}, α={occ_alpha}):",
        row("ideal", "(24h + 5s + 36) / (6h + 5s + 36)", ideal),
    ]
    if occ_alpha is None:
        lines.append(row("with DGE", "(24h + 5s + 36) / (6h + 5s + 68)", printed))
    else:
        lines += [
            row("printed", "(24h + 5s + 36) / (6h + 24(1−α)h + 5s + 68)", printed),
            row("reported", "(24h + 5s + 36) / (6h + 48(1−α)h + 5s + 68)", reported),
            "  The appendix writes OCC as 2(1−α)·12bsh² per forward ('printed': 3.03×, OCC 2.8%",
            "  at h=4096, s=2048) but reports 2.95× and OCC 5.6%, which need 2(1−α)·24bsh²: the",
            "  residual's density times Table 5's 24bsh² forward GEMM FLOPs ('reported'). 12bsh²",
            "  is their multiply-add count, half the FLOPs: 'reported' is the consistent one.",
        ]
    lines.append("  Not counted by the formula:")
    lines += ["    - " + x for x in printed["omits"]]
    return "\n".join(lines)


def _check_alpha(alpha: float | None) -> None:
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.5 < alpha < 1:
        raise ValueError(f"occ_alpha must be None or a number in (0.5, 1), got {alpha!r}")


# ---------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Peak:
    """One throughput figure and where it comes from: ``"measured"``, ``"datasheet"`` or
    ``"estimate"``."""

    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class Hardware:
    """Peak rates of one GPU: dense GEMM TFLOP/s per operand width, and TB/s for
    memory-bound passes. ``fp4`` None: no FP4 tensor cores, FP4 GEMMs run as FP8."""

    name: str
    bf16: Peak
    fp8: Peak
    fp4: Peak | None
    bandwidth: Peak

    def gemm_tflops(self, bits: int) -> float:
        """Rate of a GEMM whose widest operand has ``bits`` bits (16: BF16)."""
        if bits <= 4 and self.fp4 is not None:
            return self.fp4.value
        if bits <= 8:
            return self.fp8.value
        return self.bf16.value


HARDWARE: dict[str, Hardware] = {
    # measured on one H100 SXM: M=8192 GEMMs at LLaMA-7B shapes, torch 2.11 (DESIGN.md §4)
    "h100": Hardware(
        "NVIDIA H100 SXM",
        bf16=Peak(700.0, "measured", "BF16 GEMM; datasheet 989 dense"),
        fp8=Peak(1200.0, "measured", "FP8 torch._scaled_mm, row-wise scales; datasheet 1979"),
        fp4=None,
        bandwidth=Peak(3.0, "measured", "device copy; datasheet 3.35 TB/s HBM3"),
    ),
    # measured on one H200 (torch 2.11): mean over the three LLaMA-7B GEMMs at M=8192
    # (BF16 795 / 796 / 661, FP8 row-wise 1334 / 1338 / 1316 TFLOP/s), 512 MiB bf16 copy
    "h200": Hardware(
        "NVIDIA H200",
        bf16=Peak(750.0, "measured", "BF16 GEMM; datasheet 989 dense"),
        fp8=Peak(1330.0, "measured", "FP8 torch._scaled_mm, row-wise scales; datasheet 1979"),
        fp4=None,
        bandwidth=Peak(4.0, "measured", "device copy; datasheet 4.8 TB/s HBM3e"),
    ),
    "b200": Hardware(
        "NVIDIA B200",
        bf16=Peak(2250.0, "datasheet", "dense"),
        fp8=Peak(4500.0, "datasheet", "dense"),
        fp4=Peak(9000.0, "datasheet", "dense"),
        bandwidth=Peak(8.0, "datasheet", "HBM3e"),
    ),
}


# ---------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class _Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    kv_heads: int
    ffn: int
    vocab: int
    mlp: str

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out N, in K) of each linear layer of one block, q/k/v and SwiGLU's w1/w3 fused
        as in ``fp4train.model`` (one input quantized once per fused layer)."""
        qkv = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        up = 2 * self.ffn if self.mlp == "swiglu" else self.ffn
        return {
            "wqkv": (qkv, self.dim),
            "wo": (self.dim, self.dim),
            "w13" if self.mlp == "swiglu" else "w1": (up, self.dim),
            "w2": (self.dim, self.ffn),
        }

    def num_params(self) -> int:
        block = sum(n * k for n, k in self.linears().values()) + 2 * self.dim
        return self.n_layers * block + self.dim + 2 * self.vocab * self.dim


# used when fp4train.model cannot be imported, or for names it does not know (LLaMA-2)
_FALLBACK_SHAPES = {
    "7b": _Shape("7b", 4096, 32, 32, 32, 11008, 32000, "swiglu"),
    "13b": _Shape("13b", 5120, 40, 40, 40, 13824, 32000, "swiglu"),
}


def _shape_of(model: Any) -> _Shape:
    if isinstance(model, _Shape):
        return model
    if isinstance(model, str):
        try:
            from fp4train.model import get_config
        except ImportError:
            get_config = None
        if get_config is not None:
            try:
                return _shape_of_config(get_config(model), model)
            except ValueError:
                if model not in _FALLBACK_SHAPES:
                    raise
        if model in _FALLBACK_SHAPES:
            return _FALLBACK_SHAPES[model]
        raise ValueError(f"unknown model {model!r}; known: {sorted(_FALLBACK_SHAPES)}")
    return _shape_of_config(model, getattr(model, "name", "custom"))


def _shape_of_config(cfg: Any, name: str) -> _Shape:
    """A ``fp4train.model.ModelConfig`` (or an object with its fields) as a shape."""
    try:
        dim, n_layers, n_heads = cfg.dim, cfg.n_layers, cfg.n_heads
        vocab = cfg.vocab_size
    except AttributeError as e:
        raise TypeError(
            f"model must be a name or a config with dim, n_layers, n_heads, vocab_size; "
            f"got {type(cfg).__name__}"
        ) from e
    mlp = getattr(cfg, "mlp", "swiglu")
    kv = getattr(cfg, "n_kv_heads", None) or n_heads
    ffn = getattr(cfg, "ffn_dim", None) or getattr(cfg, "ffn_hidden", None)
    if ffn is None:
        raise ValueError("model config needs ffn_hidden (or ffn_dim)")
    shape = _Shape(str(name), dim, n_layers, n_heads, kv, ffn, vocab, mlp)
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "ffn", "vocab"):
        v = getattr(shape, field)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"model config field {field!r} must be a positive int, got {v!r}")
    if mlp not in ("swiglu", "gelu"):
        raise ValueError(f"model config field 'mlp' must be 'swiglu' or 'gelu', got {mlp!r}")
    if dim % n_heads or n_heads % kv:
        raise ValueError(f"dim {dim}, n_heads {n_heads}, n_kv_heads {kv} do not divide evenly")
    return shape


# ---------------------------------------------------------------------------- step estimate
def _bits(spec: OperandSpec, fwd: OperandSpec) -> int:
    """Bits of an operand as the GEMM reads it; a reused operand has the forward's format."""
    spec = fwd if spec.reuse_fwd else spec
    return 16 if spec.format is None else formats.get(spec.format).bits


def _stored_bytes(bits: int, hw: Hardware) -> float:
    """Bytes per element as a GEMM reads it: FP4 packed two to a byte where the chip has FP4
    tensor cores, else held as FP8 (exact: every E2M1 value is an E4M3 value)."""
    if bits <= 4 and hw.fp4 is not None:
        return 0.5
    return 1.0 if bits <= 8 else 2.0


def _quant_bytes(spec: OperandSpec, layouts: int, hw: Hardware) -> float:
    """Bytes per element of one quantize kernel: read BF16 (twice when the scale runs across
    the stored rows, so its amax needs a pass of its own) and write ``layouts`` copies."""
    if not spec.quantized:
        return 0.0
    reads = 2 if spec.granularity in ("tensor", "col") else 1
    return reads * _BF16 + layouts * _stored_bytes(formats.get(spec.format).bits, hw)


def _recipe_of(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return Recipe.preset(recipe)
    raise TypeError(f"recipe must be a preset name or a Recipe, got {type(recipe).__name__}")


def _hardware_of(hardware: str | Hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(hardware, str) and hardware.lower() in HARDWARE:
        return HARDWARE[hardware.lower()]
    raise ValueError(f"unknown hardware {hardware!r}; choose from {sorted(HARDWARE)}")


def _rate_label(hw: Hardware, bits: int) -> str:
    rate = f"{hw.gemm_tflops(bits):g} TFLOP/s"
    if bits <= 4:
        return f"FP4 {rate}" if hw.fp4 is not None else f"FP4 as FP8 {rate}"
    return f"FP8 {rate}" if bits <= 8 else f"BF16 {rate}"


def step_time_estimate(
    model: Any,
    seq_len: int,
    batch_tokens: int,
    hardware: str | Hardware = "h100",
    recipe: str | Recipe = "fp4-paper",
    *,
    micro_batch_tokens: int = 16384,
) -> dict[str, Any]:
    """Time of one training step at the hardware's peak rates, BF16 vs ``recipe``.

    Args:
        model: a name (``fp4train.model.get_config``; LLaMA-2 "7b" and "13b" are built in)
            or a config with ``dim, n_layers, n_heads, n_kv_heads, ffn_hidden, vocab_size,
            mlp`` (a ``fp4train.model.ModelConfig``).
        seq_len: tokens per sequence; batch_tokens: tokens per optimizer step, a multiple
            of seq_len.
        hardware: a key of :data:`HARDWARE` or a :class:`Hardware`.
        recipe: a preset name or a :class:`~fp4train.recipe.Recipe`.
        micro_batch_tokens: tokens per forward/backward pass; the passes over the weights
            (quantizing W, DGE) run once per micro-batch.

    Each term is priced on its own, no overlap: GEMMs at the rate of their widest operand,
    attention score/value products in BF16 at the BF16 GEMM peak (counted without causal
    halving: FlashAttention does about half these FLOPs at about half that rate), and
    memory-bound passes at the copy bandwidth, one fused kernel per elementwise op. A
    quantize kernel reads BF16 (once more when its scale runs across the stored rows) and
    writes each layout the GEMMs read (row-major and transposed for ``torch._scaled_mm``).

    Returns a dict: ``terms`` (each with ``flops``, ``bytes``, ``bf16_s``, ``recipe_s``,
    ``note``; ``bf16_s`` is 0 for terms only the recipe has), ``bf16_s`` and ``recipe_s``
    totals, ``ratio``, ``gemm_ratio`` (GEMMs alone) and ``formula_ratio`` (the paper's
    formula at the model's h and seq_len with this hardware's GEMM speed-up, OCC counted as
    reported), plus the inputs.
    """
    for name, v in (
        ("seq_len", seq_len),
        ("batch_tokens", batch_tokens),
        ("micro_batch_tokens", micro_batch_tokens),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if batch_tokens % seq_len:
        raise ValueError(f"batch_tokens ({batch_tokens}) must be a multiple of seq_len ({seq_len})")
    shape = _shape_of(model)
    hw = _hardware_of(hardware)
    rec = _recipe_of(recipe)
    T, L, h = batch_tokens, shape.n_layers, shape.dim
    n_micro = math.ceil(T / min(micro_batch_tokens, T))

    # linear layers the recipe converts; Σ N·K, and X / dY elements per token (Σ K, Σ N)
    layers = [shape.linears()] * L + (
        [{"lm_head": (shape.vocab, h)}] if rec.quantize_lm_head else []
    )
    nk = sum(n * k for layer in layers for n, k in layer.values())
    sum_k = sum(k for layer in layers for _, k in layer.values())
    sum_n = sum(n for layer in layers for n, _ in layer.values())

    terms: list[dict[str, Any]] = []

    def add(name: str, note: str, *, flops=0.0, rate=None, nbytes=0.0, in_bf16=True) -> None:
        rate = hw.bf16.value if rate is None else rate
        t = flops / (rate * 1e12) + nbytes / (hw.bandwidth.value * 1e12)
        # a term in both runs has the same FLOPs; only GEMMs change rate
        t_bf16 = flops / (hw.bf16.value * 1e12) + nbytes / (hw.bandwidth.value * 1e12)
        terms.append(
            {
                "term": name,
                "flops": flops,
                "bytes": nbytes,
                "bf16_s": t_bf16 if in_bf16 else 0.0,
                "recipe_s": t,
                "note": note,
            }
        )

    # the three GEMMs of every converted linear, each at the rate of its widest operand
    gemm_bits = {
        "fwd X·Wᵀ": max(_bits(rec.fwd_x, rec.fwd_x), _bits(rec.fwd_w, rec.fwd_w)),
        "dgrad dY·W": max(_bits(rec.dgrad_dy, rec.dgrad_dy), _bits(rec.dgrad_w, rec.fwd_w)),
        "wgrad dYᵀ·X": max(_bits(rec.wgrad_dy, rec.wgrad_dy), _bits(rec.wgrad_x, rec.fwd_x)),
    }
    for g, b in gemm_bits.items():
        add(f"GEMM {g}", _rate_label(hw, b), flops=2.0 * T * nk, rate=hw.gemm_tflops(b))
    if not rec.quantize_lm_head:
        add("LM head GEMMs", "BF16, not quantized", flops=3 * 2.0 * T * shape.vocab * h)
    # QKᵀ and PV: 2 · 2·s·(heads·head_dim) per token forward, × 3 for forward + backward
    att = 3 * 4.0 * T * seq_len * shape.n_heads * shape.head_dim * L
    add("attention QKᵀ, PV", "BF16, no causal halving", flops=att)

    # passes both runs share, in elements per token (forward + backward): RMSNorm 5h (fwd r+w,
    # bwd r x,dy w dx) ×2; residual add 6h ×2; RoPE on q, k 4(q+kv); SwiGLU 8F, GeLU 5F;
    # embedding 4h, final norm 5h; fused cross-entropy 3V (read logits twice, write dlogits)
    q, kv = shape.n_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    act = (8 if shape.mlp == "swiglu" else 5) * shape.ffn
    per_tok = L * (22 * h + 4 * (q + kv) + act) + 9 * h + 3 * shape.vocab
    add("norms, RoPE, act, residual, loss", "BF16 passes", nbytes=_BF16 * T * per_tok)
    # AdamW in fp32: read param, grad, m, v; write param, m, v
    add("optimizer (AdamW fp32)", "once per step", nbytes=28.0 * shape.num_params())

    # passes only the recipe has. X feeds fwd and, reused, wgrad (a transposed copy)
    bx = _quant_bytes(rec.fwd_x, 2 if rec.wgrad_x.reuse_fwd else 1, hw)
    bx += _quant_bytes(rec.wgrad_x, 1, hw)
    if bx:
        add("quantize X", f"{bx:g} B/element", nbytes=bx * T * sum_k, in_bf16=False)
    by = _quant_bytes(rec.dgrad_dy, 1, hw) + _quant_bytes(rec.wgrad_dy, 1, hw)
    if by:
        add("quantize dY (dgrad, wgrad)", f"{by:g} B/element", nbytes=by * T * sum_n, in_bf16=False)
    # W feeds fwd and, reused, dgrad (a transposed copy); once per micro-batch
    bw = _quant_bytes(rec.fwd_w, 2 if rec.dgrad_w.reuse_fwd else 1, hw)
    bw += _quant_bytes(rec.dgrad_w, 1, hw)
    if bw:
        note = f"{bw:g} B/weight, per micro-batch (×{n_micro})"
        add("quantize W", note, nbytes=bw * nk * n_micro, in_bf16=False)
    if rec.occ is not None:
        # the quantile estimate reads X once; the clamp is fused into quantize X, which also
        # writes R as (bf16 value, int32 index) pairs, read again by R·Wᵀ and dYᵀ·R
        add("OCC quantile of X", "one read of X", nbytes=_BF16 * T * sum_k, in_bf16=False)
        if rec.occ.compensate:
            density = 2 * (1 - rec.occ.alpha)
            nnz = density * T * sum_k
            # fwd R·Wᵀ and wgrad dYᵀ·R, 2·nnz(R)·N FLOPs each, at the dense BF16 rate
            add(
                "OCC residual GEMMs R·Wᵀ, dYᵀ·R",
                f"density {density:.3g}, sparse at BF16 peak",
                flops=2 * 2.0 * density * T * nk,
                nbytes=3 * 6 * nnz,
                in_bf16=False,
            )
    if rec.dge is not None:
        # read W and dW, write dW, once per micro-batch (unfused with the wgrad GEMM)
        note = f"6 B/weight, per micro-batch (×{n_micro})"
        add("DGE correction of dW", note, nbytes=3 * _BF16 * nk * n_micro, in_bf16=False)

    gemm = [t for t in terms if t["term"].startswith("GEMM ")]
    gemm_ratio = sum(t["bf16_s"] for t in gemm) / sum(t["recipe_s"] for t in gemm)
    bf16_total = sum(t["bf16_s"] for t in terms)
    recipe_total = sum(t["recipe_s"] for t in terms)
    formula = theoretical_speedup(
        h,
        seq_len,
        gemm_speedup=gemm_ratio,
        dge=rec.dge is not None,
        occ_alpha=None if rec.occ is None else rec.occ.alpha,
        occ_flops="reported",
    )
    return {
        "model": shape.name,
        "shape": asdict(shape),
        "seq_len": seq_len,
        "batch_tokens": T,
        "micro_batch_tokens": min(micro_batch_tokens, T),
        "hardware": hw.name,
        "peaks": asdict(hw),
        "recipe": rec.name,
        "terms": terms,
        "bf16_s": bf16_total,
        "recipe_s": recipe_total,
        "ratio": bf16_total / recipe_total,
        "gemm_ratio": gemm_ratio,
        "formula_ratio": formula["ratio"],
    }


def _unit(x: float, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest unit in which ``x`` is at least 1 (the smallest if none is)."""
    return next((u for u in units if x >= u[1]), units[-1])


def format_estimate(est: dict[str, Any], measured_ratio: float | None = None) -> str:
    """The per-term table of a :func:`step_time_estimate` result, with the peaks it used."""
    terms = est["terms"]
    t_unit, t_div = _unit(est["bf16_s"], (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)))
    flops = max(t["flops"] for t in terms)
    f_unit, f_div = _unit(flops, (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)))
    nbytes = max(t["bytes"] for t in terms)
    b_unit, b_div = _unit(nbytes, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)))
    rec = est["recipe"]
    head = (
        f"{'term':32s} {f_unit:>9s} {b_unit:>9s} {'bf16 ' + t_unit:>9s} "
        f"{rec + ' ' + t_unit:>13s}  note"
    )
    lines = [head, "-" * len(head)]

    def num(x: float, div: float, width: int = 9) -> str:
        return f"{x / div:{width},.1f}" if x else " " * width

    for t in terms:
        bf16 = num(t["bf16_s"], t_div, 9) if t["bf16_s"] else f"{'—':>9s}"
        lines.append(
            f"{t['term']:32s} {num(t['flops'], f_div)} {num(t['bytes'], b_div)} {bf16} "
            f"{num(t['recipe_s'], t_div, 13)}  {t['note']}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'total':32s} {'':9s} {'':9s} {num(est['bf16_s'], t_div)} "
        f"{num(est['recipe_s'], t_div, 13)}"
    )
    p = est["peaks"]
    lines.append(f"Peaks used, {est['hardware']}:")
    for key in ("bf16", "fp8", "fp4"):
        if p[key] is None:
            lines.append(f"  {key.upper():4s} none: FP4 GEMMs run exactly on FP8 tensor cores")
        else:
            lines.append(
                f"  {key.upper():4s} {p[key]['value']:6g} TFLOP/s  {p[key]['source']:9s} "
                f"{p[key]['note']}"
            )
    bw = p["bandwidth"]
    lines.append(f"  HBM  {bw['value']:6.1f} TB/s     {bw['source']:9s} {bw['note']}")
    lines.append(
        f"Expected step speed-up, {rec} over bf16: {est['ratio']:.2f}×  (GEMMs alone "
        f"{est['gemm_ratio']:.2f}×; App. B formula at this GEMM speed-up "
        f"{est['formula_ratio']:.2f}×)"
    )
    if measured_ratio is not None:
        lines.append(
            f"Measured step speed-up: {measured_ratio:.2f}× = "
            f"{measured_ratio / est['ratio']:.0%} of the expected {est['ratio']:.2f}×"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
_EXAMPLES = """\
examples:
  fp4train speedup                                  # LLaMA-2 7B, seq 2048, 4M tokens, H100
  fp4train speedup --model 7b --hardware b200
  fp4train speedup --model 1.3b --tokens 1048576 --recipe fp4-direct --measured-ratio 1.21
  fp4train speedup --model 7b --occ-alpha 0.999 --no-dge --json > speedup.json
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # raise instead of printing usage and exiting, so main() reports one line and returns 2
    def error(self, message: str):
        raise _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fp4train speedup",
        description="Expected speed-up of FP4 training over BF16: the paper's FLOP formula "
        "(arXiv 2501.17116, App. B) and a per-term estimate of one training step at a GPU's "
        "peak rates, quantization passes included.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="7b", help="model name or config JSON (default: 7b)")
    p.add_argument("--seq-len", type=_positive_int, default=2048, help="default: 2048")
    p.add_argument(
        "--tokens", type=_positive_int, default=4194304, help="tokens per step (default: 4M)"
    )
    p.add_argument(
        "--micro-batch-tokens",
        type=_positive_int,
        default=16384,
        help="tokens per forward/backward pass; weight passes run once per micro-batch "
        "(default: 16384)",
    )
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="h100")
    p.add_argument("--recipe", choices=Recipe.presets(), default="fp4-paper")
    occ = p.add_mutually_exclusive_group()
    occ.add_argument("--occ-alpha", type=float, help="OCC quantile α in (0.5, 1); turns OCC on")
    occ.add_argument("--no-occ", action="store_true", help="leave OCC out")
    p.add_argument("--no-dge", action="store_true", help="leave DGE out (straight-through)")
    p.add_argument(
        "--measured-ratio",
        type=_positive_float,
        help="a measured step speed-up to print next to the expected one",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fp4train speedup``: print the paper's formula and the per-term step estimate.

    Returns 0, or 2 with a one-line error for bad arguments.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.occ_alpha is not None:
            _check_alpha(args.occ_alpha)
        recipe = Recipe.preset(args.recipe)
        if args.no_dge:
            recipe = recipe.replace(dge=None)
        if args.no_occ:
            recipe = recipe.replace(occ=None)
        elif args.occ_alpha is not None:
            recipe = recipe.replace(**{"occ.alpha": args.occ_alpha})
        est = step_time_estimate(
            args.model,
            args.seq_len,
            args.tokens,
            args.hardware,
            recipe,
            micro_batch_tokens=args.micro_batch_tokens,
        )
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_UsageError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"fp4train speedup: error: {e}", file=sys.stderr)
        return 2
    h, s = est["shape"]["dim"], args.seq_len
    alpha = None if recipe.occ is None else recipe.occ.alpha
    if args.json:
        out = {
            "paper": {
                "ideal": theoretical_speedup(h, s, dge=False, occ_alpha=None),
                "printed": theoretical_speedup(h, s, occ_alpha=alpha, occ_flops="printed"),
                "reported": theoretical_speedup(h, s, occ_alpha=alpha, occ_flops="reported"),
            },
            "estimate": est,
            "measured_ratio": args.measured_ratio,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    sh = est["shape"]
    print(
        f"model {est['model']} (dim {sh['dim']}, {sh['n_layers']} layers, {sh['n_heads']}/"
        f"{sh['kv_heads']} q/kv heads, {sh['mlp']} ffn {sh['ffn']}, vocab {sh['vocab']}), "
        f"seq {s}, {est['batch_tokens']:,} tokens/step in micro-batches of "
        f"{est['micro_batch_tokens']:,}; recipe {est['recipe']} on {est['hardware']}"
    )
    print()
    print(format_theoretical(h, s, occ_alpha=alpha))
    print()
    print("One training step at peak rates, each term on its own (no overlap):")
    print(format_estimate(est, args.measured_ratio))
    return 0
