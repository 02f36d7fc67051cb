"""convert(model, recipe): swap a model's eligible ``nn.Linear`` layers for ``FP4Linear``.

Works on any ``nn.Module`` (our ``fp4train.model.LLaMA``, Hugging Face ``LlamaForCausalLM``,
...). Embeddings, norms and attention products are not ``nn.Linear`` and stay as they are; the
LM head (a layer named ``lm_head`` or ``output``, or one whose weight is tied to an embedding)
stays in high precision unless ``recipe.quantize_lm_head``. Layers the recipe cannot handle
(e.g. an in-features count not divisible by a block size) are skipped with a logged reason.

``recipe.act_save`` is not only a layer setting: FP4Linear reads it from its recipe (OCC's
residual), and :func:`set_act_save` writes it onto the RMSNorms and SwiGLU MLPs of a
``fp4train.model.LLaMA`` (other models have none to set, and a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn as nn

from fp4train.linear import FP4Linear
from fp4train.model import FeedForward, RMSNorm
from fp4train.recipe import OPERANDS, Recipe

__all__ = ["convert", "set_act_save", "unsupported_reason"]

log = logging.getLogger("fp4train")
_HEAD_NAMES = ("lm_head", "output")


def unsupported_reason(recipe: Recipe, in_features: int, out_features: int) -> str | None:
    """Why ``recipe`` cannot run a [out, in] linear layer, or None if it can."""
    reduce_len = {  # the length of each operand's GEMM reduction dim
        "fwd_x": in_features,
        "fwd_w": in_features,
        "dgrad_dy": out_features,
        "dgrad_w": out_features,
    }
    for op in OPERANDS:
        spec = recipe.operand(op)
        if spec.quantized and spec.granularity == "block":
            n = reduce_len.get(op)
            if n is not None and n % spec.block_size:
                return f"{op} uses blocks of {spec.block_size} but its reduction dim is {n}"
    if recipe.backend == "triton":
        from fp4train import kernels

        return kernels.check_supported(recipe, in_features, out_features)
    return None


def set_act_save(model: nn.Module, act_save: str | None) -> int:
    """Set how every ``RMSNorm`` (the final norm included) and SwiGLU ``FeedForward`` of
    ``model`` saves its inputs for backward (``Recipe.act_save``: None or ``"e4m3"``); returns
    how many modules took it. A GeLU MLP has no such setting: its activations stay as
    computed."""
    modules = [
        m
        for m in model.modules()
        if isinstance(m, RMSNorm) or (isinstance(m, FeedForward) and m.swiglu)
    ]
    for m in modules:
        m.act_save = act_save
    if act_save is not None and not modules:
        log.warning(
            "fp4train.convert: act_save=%r reaches no norm or MLP: the model has no "
            "fp4train.model RMSNorm or SwiGLU MLP, so their activations are saved as computed "
            "(FP4Linear layers with OCC still keep their residual in E4M3)",
            act_save,
        )
    return len(modules)


def _tied_to_embedding(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def convert(
    model: nn.Module,
    recipe: Recipe | str,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace eligible ``nn.Linear`` modules of ``model`` in place with ``FP4Linear``; eligible
    ``FP4Linear`` layers (from an earlier convert) take ``recipe`` instead of their own.

    Args:
        model: any module; converted in place and returned.
        recipe: a :class:`~fp4train.Recipe` or a preset name (``"fp4-paper"``, ...).
        module_filter_fn: ``(module, fully_qualified_name) -> bool``; only layers for which
            it returns True are converted (all eligible ones when None).

    Returns the same ``model``. Parameters are reused, not copied, so an optimizer built
    before conversion still holds the right tensors. ``recipe.act_save`` is applied with
    :func:`set_act_save`.
    """
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe or a preset name, got {type(recipe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    tied = _tied_to_embedding(model)
    swaps: list[tuple[str, nn.Module]] = []
    recast: list[FP4Linear] = []  # converted before, with another recipe
    for fqn, mod in model.named_modules():
        converted = type(mod) is FP4Linear
        if type(mod) is not nn.Linear and not converted:  # subclasses may change forward
            continue
        if fqn == "":
            raise TypeError(
                "convert swaps submodules; wrap a bare nn.Linear with "
                "FP4Linear.from_linear(linear, recipe) instead"
            )
        leaf = fqn.rsplit(".", 1)[-1]
        is_head = leaf in _HEAD_NAMES or id(mod.weight) in tied
        if is_head and not recipe.quantize_lm_head:
            if converted and mod.recipe != recipe:  # quantized by an earlier convert
                log.warning(
                    "fp4train.convert: %s (LM head) keeps recipe %s: %s does not quantize "
                    "the LM head", fqn, mod.recipe.name, recipe.name,
                )  # fmt: skip
            else:
                log.info("fp4train.convert: keeping %s in high precision (LM head)", fqn)
            continue
        if module_filter_fn is not None and not module_filter_fn(mod, fqn):
            continue
        reason = unsupported_reason(recipe, mod.in_features, mod.out_features)
        if reason is not None:
            kept = f" (it keeps recipe {mod.recipe.name})" if converted else ""
            log.warning("fp4train.convert: skipping %s: %s%s", fqn, reason, kept)
            continue
        if not converted:
            swaps.append((fqn, mod))
        elif mod.recipe != recipe:
            recast.append(mod)
    for fqn, mod in swaps:
        parent_name, _, leaf = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, FP4Linear.from_linear(mod, recipe))
    for mod in recast:
        mod.recipe = recipe
    set_act_save(model, recipe.act_save)
    log.info(
        "fp4train.convert: %d linear layers now use recipe %s (%d of them FP4Linear already)",
        len(swaps) + len(recast), recipe.name, len(recast),
    )  # fmt: skip
    return model
