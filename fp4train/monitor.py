"""Quantization monitor: how faithfully each FP4Linear's forward operands survive quantization.

On the steps it is switched on for, a forward pre-hook on every ``FP4Linear`` recomputes the
forward GEMM's operands with the reference functions and compares them with full precision:

- ``x``: the activation as the GEMM sees it, ``Q(clamp(X)) + R`` with OCC and compensation
  (``Q(clamp(X))`` without compensation, ``Q(X)`` without OCC), against X;
- ``w``: ``Q(W)`` against W.

Per operand it records SNR in dB, cosine similarity and relative MSE (the three figures of the
paper's OCC table, see :func:`quant_error_stats`), the fraction of values OCC clamped (``x``
only) and the fraction of nonzero inputs that quantize to zero (underflow). Statistics are
float32 under ``torch.no_grad``; stochastic rounding is monitored as round-to-nearest so the
monitor never draws random numbers, and it runs under a forked RNG, so switching it on does not
change the training run. On other steps the hooks return at once.

Usage (``fp4train train --monitor-every N`` does this)::

    mon = QuantMonitor(model)
    mon.start()
    loss = model(x, y)
    stats = mon.stop()      # {layer_name: {"x": {...}, "w": {...}}}
    print(mon.summary_markdown())
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from functools import partial

import torch
from torch import nn

from fp4train.quantize import quantize
from fp4train.recipe import OperandSpec, Recipe

__all__ = ["quant_error_stats", "activation_stats", "weight_stats", "QuantMonitor", "is_fp4_linear"]


def quant_error_stats(x_ref: torch.Tensor, x_q: torch.Tensor) -> dict[str, float]:
    """Error of ``x_q`` against the reference ``x_ref`` (same shape), in float32.

    - ``snr_db``  = 10·log10(Σ x_ref² / Σ (x_ref − x_q)²), ``inf`` for an exact match;
    - ``cosine``  = ⟨x_ref, x_q⟩ / (‖x_ref‖·‖x_q‖), 1 when both are all-zero, 0 when one is;
    - ``rel_mse`` = Σ (x_ref − x_q)² / Σ x_ref² (= 10^(−snr_db/10)); 0 for an exact match.
    """
    if x_ref.shape != x_q.shape:
        raise ValueError(f"shapes differ: x_ref {tuple(x_ref.shape)} vs x_q {tuple(x_q.shape)}")
    ref = x_ref.detach().float().flatten()
    q = x_q.detach().float().flatten()
    signal = float(ref.square().sum())
    noise = float((ref - q).square().sum())
    norms = float(ref.norm()) * float(q.norm())
    if noise == 0.0:
        snr_db, rel_mse = math.inf, 0.0
    elif signal == 0.0:
        snr_db, rel_mse = -math.inf, math.inf
    else:
        snr_db, rel_mse = 10.0 * math.log10(signal / noise), noise / signal
    if norms > 0.0:
        cosine = float(torch.dot(ref, q)) / norms
    else:
        cosine = 1.0 if float(ref.abs().sum()) == float(q.abs().sum()) == 0.0 else 0.0
    return {"snr_db": snr_db, "cosine": cosine, "rel_mse": rel_mse}


def is_fp4_linear(module: nn.Module) -> bool:
    """True for an ``fp4train.FP4Linear`` (checked by name, so no import of the module)."""
    return type(module).__name__ == "FP4Linear"


def _underflow(x: torch.Tensor, data: torch.Tensor) -> float:
    """Fraction of the nonzero entries of ``x`` whose quantized value ``data`` is 0."""
    nonzero = x != 0
    n = int(nonzero.sum())
    return int((nonzero & (data == 0)).sum()) / n if n else 0.0


def _quantize_ref(x: torch.Tensor, spec: OperandSpec):
    return quantize(x, spec.format, spec.granularity, block_size=spec.block_size)


def activation_stats(x: torch.Tensor, recipe: Recipe) -> dict[str, float]:
    """Statistics of the forward activation ``x`` [..., K] as a GEMM under ``recipe`` sees it."""
    from fp4train.occ import clamp_outliers  # written alongside; imported when first used

    x = x.detach().float().reshape(-1, x.shape[-1])  # [M, K]
    clamped = 0.0
    x_c, compensation = x, None
    if recipe.occ is not None:
        x_c, residual = clamp_outliers(x, recipe.occ.alpha, recipe.occ.granularity)
        x_c = x_c.float()
        clamped = float((x_c != x).float().mean())
        if recipe.occ.compensate:
            compensation = residual.to_dense().float()
    q = _quantize_ref(x_c, recipe.fwd_x)
    if compensation is not None and recipe.occ.compensation == "e4m3":
        from fp4train.occ import outliers_on_e4m3

        data8, r2 = outliers_on_e4m3(x, x_c, q.data, q.scale)
        q = dataclasses.replace(q, data=data8)
        compensation = r2
    seen = q.dequantize()
    if compensation is not None:
        seen = seen + compensation
    stats = quant_error_stats(x, seen)
    stats["clamped"] = clamped
    stats["underflow"] = _underflow(x_c, q.data)
    return stats


def weight_stats(w: torch.Tensor, recipe: Recipe) -> dict[str, float]:
    """Statistics of the forward weight ``w`` [N, K] quantized as ``recipe.fwd_w`` says."""
    w = w.detach().float()
    q = _quantize_ref(w, recipe.fwd_w)
    stats = quant_error_stats(w, q.dequantize())
    stats["underflow"] = _underflow(w, q.data)
    return stats


class QuantMonitor:
    """Forward pre-hooks on every FP4Linear of ``model`` that record operand statistics.

    Between :meth:`start` and :meth:`stop` each layer records its first forward call (the first
    micro-batch of a step); otherwise the hooks return immediately. :attr:`history` keeps every
    recorded step for :meth:`summary`.
    """

    def __init__(self, model: nn.Module):
        self.active = False
        self.records: dict[str, dict[str, dict[str, float]]] = {}
        self.history: list[dict[str, dict[str, dict[str, float]]]] = []
        self._handles = [
            m.register_forward_pre_hook(partial(self._hook, name))
            for name, m in model.named_modules()
            if is_fp4_linear(m)
        ]

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def start(self) -> None:
        """Record statistics on the forward calls that follow."""
        self.active, self.records = True, {}

    def stop(self) -> dict[str, dict[str, dict[str, float]]]:
        """Stop recording; return ``{layer: {"x": stats, "w": stats}}`` and keep it in history."""
        self.active = False
        if self.records:
            self.history.append(self.records)
        return self.records

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        if not self.active or name in self.records:
            return
        recipe: Recipe = module.recipe
        x = args[0]
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            entry = {}
            if recipe.fwd_x.quantized:
                entry["x"] = activation_stats(x, recipe)
            if recipe.fwd_w.quantized:
                entry["w"] = weight_stats(module.weight, recipe)
        self.records[name] = entry

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per layer and operand, the mean of every statistic over the recorded steps."""
        sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        counts: dict = defaultdict(lambda: defaultdict(int))
        for records in self.history:
            for layer, entry in records.items():
                for op, stats in entry.items():
                    counts[layer][op] += 1
                    for k, v in stats.items():
                        sums[layer][op][k] += v
        return {
            layer: {
                op: {k: v / counts[layer][op] for k, v in stats.items()}
                for op, stats in ops.items()
            }
            for layer, ops in sums.items()
        }

    def summary_markdown(self) -> str:
        """A markdown table: one row per layer, X and W statistics averaged over steps."""
        summary = self.summary()
        head = (
            "| layer | X SNR dB | X cosine | X rel MSE | X clamped % | X underflow % "
            "| W SNR dB | W cosine | W rel MSE | W underflow % |"
        )
        lines = [
            f"Quantization monitor: mean over {len(self.history)} monitored steps. X is the "
            "activation as the forward GEMM sees it (OCC clamp + quantize + compensation), W "
            "the quantized weight; underflow = nonzero inputs that quantize to 0.",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
        ]
        for layer, ops in summary.items():
            x, w = ops.get("x"), ops.get("w")
            lines.append(f"| {layer} | {_fmt_op(x, clamped=True)} | {_fmt_op(w, clamped=False)} |")
        return "\n".join(lines) + "\n"


def _fmt_op(stats: dict[str, float] | None, clamped: bool) -> str:
    n = 5 if clamped else 4
    if stats is None:
        return " | ".join(["-"] * n)
    cells = [f"{stats['snr_db']:.2f}", f"{100 * stats['cosine']:.2f}%", f"{stats['rel_mse']:.4f}"]
    if clamped:
        cells.append(f"{100 * stats['clamped']:.2f}")
    cells.append(f"{100 * stats['underflow']:.3f}")
    return " | ".join(cells)
