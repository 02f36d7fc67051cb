"""convert(): which layers are swapped, parameters reused, filters, LM head, HF Llama."""

import logging

import pytest
import torch
import torch.nn as nn

from fp4train import FP4Linear, Recipe, convert
from fp4train.convert import set_act_save
from fp4train.model import LLaMA, ModelConfig, RMSNorm


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(32, 64), "down": nn.Linear(64, 32)}) for _ in range(2)
        )
        self.odd = nn.Linear(30, 32)
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 100, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.lm_head(self.norm(h))


def _fp4_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, FP4Linear)}


def test_convert_swaps_linears_keeps_head_and_params():
    torch.manual_seed(0)
    model = _Toy()
    params_before = {n: p for n, p in model.named_parameters()}
    idx = torch.randint(0, 100, (2, 7))
    ref = model(idx)
    convert(model, "fp4-paper")
    assert _fp4_names(model) == {
        "blocks.0.up",
        "blocks.0.down",
        "blocks.1.up",
        "blocks.1.down",
        "odd",
    }
    assert type(model.lm_head) is nn.Linear
    for n, p in model.named_parameters():  # reused, not copied
        assert p is params_before[n], n
    out = model(idx)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert model.blocks[0]["up"].recipe.name == "fp4-paper"


def test_convert_filter_and_lm_head_option():
    model = convert(_Toy(), "fp4-direct", module_filter_fn=lambda m, fqn: fqn.endswith("up"))
    assert _fp4_names(model) == {"blocks.0.up", "blocks.1.up"}
    model = convert(_Toy(), Recipe.preset("fp4-direct").replace(quantize_lm_head=True))
    assert "lm_head" in _fp4_names(model)


def test_tied_head_is_detected():
    model = _Toy()
    model.lm_head = nn.Linear(32, 100, bias=False)
    model.lm_head.weight = model.embed.weight
    model.head2 = model.lm_head  # same module under another name
    convert(model, "fp4-paper")
    assert type(model.lm_head) is nn.Linear


def test_convert_skips_layers_the_recipe_cannot_handle(caplog):
    recipe = Recipe.preset("fp4-direct").replace(
        fwd_x={"format": "e2m1", "granularity": "block", "block_size": 32},
        fwd_w={"format": "e2m1", "granularity": "block", "block_size": 32},
        dgrad_w={"format": "e5m2", "granularity": "col"},
        wgrad_x={"format": "e5m2", "granularity": "col"},
    )
    with caplog.at_level(logging.WARNING, logger="fp4train"):
        model = convert(_Toy(), recipe)
    assert "odd" not in _fp4_names(model)  # in_features 30 not divisible by 32
    assert "blocks.0.up" in _fp4_names(model)
    assert any("odd" in r.message and "32" in r.message for r in caplog.records)


def test_convert_is_idempotent_and_validates():
    model = convert(convert(_Toy(), "fp4-paper"), "fp4-paper")
    assert len(_fp4_names(model)) == 5
    with pytest.raises(ValueError, match="unknown recipe preset"):
        convert(_Toy(), "fp3")
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model", "fp4-paper")
    with pytest.raises(TypeError, match="from_linear"):
        convert(nn.Linear(4, 4), "fp4-paper")


def test_convert_again_gives_converted_layers_the_new_recipe(caplog):
    """A second convert with another recipe reaches the FP4Linear layers too (they would
    otherwise keep the first recipe without a word), within its filter; an LM head that the
    new recipe would not quantize keeps its recipe, with a warning."""
    head_too = Recipe.preset("fp4-paper").replace(quantize_lm_head=True)
    model = convert(_Toy(), head_too)
    up = model.blocks[0]["up"]
    convert(model, "fp4-dge", module_filter_fn=lambda m, fqn: fqn.endswith("down"))
    recipes = {n: m.recipe.name for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    first = head_too.name  # "fp4-paper*"
    assert recipes == {
        "blocks.0.up": first, "blocks.1.up": first, "odd": first,
        "blocks.0.down": "fp4-dge", "blocks.1.down": "fp4-dge", "lm_head": first,
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fp4train"):
        convert(model, "fp4-direct")
    recipes = {n: m.recipe.name for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    assert recipes.pop("lm_head") == first and set(recipes.values()) == {"fp4-direct"}
    assert model.blocks[0]["up"] is up  # the same module, its parameters untouched
    assert f"lm_head (LM head) keeps recipe {first}" in caplog.text
    assert "5 linear layers now use recipe fp4-direct (5 of them FP4Linear already)" in caplog.text


def _norms(model: nn.Module) -> list[RMSNorm]:
    return [m for m in model.modules() if isinstance(m, RMSNorm)]


@pytest.mark.parametrize("mlp, n_set", [("swiglu", 2 * 3 + 1), ("gelu", 2 * 2 + 1)])
def test_convert_sets_act_save_on_norms_and_swiglu_mlps(mlp, n_set, caplog):
    config = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=8, mlp=mlp)
    model = LLaMA(config)
    recipe = Recipe.preset("fp4-direct").replace(act_save="e4m3")
    with caplog.at_level(logging.WARNING, logger="fp4train"):
        convert(model, recipe)
    assert not caplog.records  # every LLaMA has norms to set, GeLU or not
    norms = _norms(model)
    assert len(norms) == 2 * 2 + 1 and norms[-1] is model.norm  # the final norm included
    assert all(m.act_save == "e4m3" for m in norms)
    acts = [blk.feed_forward.act_save for blk in model.layers]
    assert acts == (["e4m3"] * 2 if mlp == "swiglu" else [None] * 2)  # GeLU: nothing to set
    assert set_act_save(model, None) == n_set
    assert all(m.act_save is None for m in norms)
    assert all(blk.feed_forward.act_save is None for blk in model.layers)


def test_act_save_on_a_model_without_our_norms_or_swiglu_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fp4train"):
        convert(_Toy(), Recipe.preset("fp4-paper").replace(act_save="e4m3"))
        assert any("no fp4train.model RMSNorm or SwiGLU MLP" in r.message for r in caplog.records)
        caplog.clear()
        convert(_Toy(), "fp4-paper")  # act_save None: nothing to say
        assert not caplog.records


def test_convert_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(idx).logits
    convert(model, "fp4-paper")
    names = _fp4_names(model)
    # q,k,v,o + gate,up,down per layer; lm_head and embeddings untouched
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    out = model(idx, labels=idx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    rel = ((out.logits - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, f"relative logit change {rel:.3f} after FP4 conversion"
    assert all(
        p.grad is not None for n, p in model.named_parameters() if "layers" in n and "norm" not in n
    )
