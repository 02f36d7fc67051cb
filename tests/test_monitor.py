"""Quantization monitor: error statistics, per-layer hooks, and no effect on training."""

import math
import random

import pytest
import torch

from fp4train import Recipe, convert
from fp4train.model import LLaMA, ModelConfig
from fp4train.monitor import QuantMonitor, activation_stats, quant_error_stats, weight_stats
from fp4train.quantize import quantize
from fp4train.train import TrainConfig, read_metrics, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_quant_error_stats_by_hand():
    ref = torch.tensor([1.0, -2.0, 3.0, 4.0])
    q = torch.tensor([1.0, -2.0, 3.0, 3.5])
    s = quant_error_stats(ref, q)
    signal, noise = 1 + 4 + 9 + 16, 0.5**2
    assert s["snr_db"] == pytest.approx(10 * math.log10(signal / noise))
    assert s["rel_mse"] == pytest.approx(noise / signal)
    dot = 1 + 4 + 9 + 14
    assert s["cosine"] == pytest.approx(dot / math.sqrt(signal * (1 + 4 + 9 + 12.25)))
    exact = quant_error_stats(ref, ref.clone())
    assert exact == {"snr_db": math.inf, "cosine": pytest.approx(1.0), "rel_mse": 0.0}
    zero = torch.zeros(3)
    assert quant_error_stats(zero, zero)["cosine"] == 1.0
    assert quant_error_stats(zero, torch.ones(3))["snr_db"] == -math.inf
    assert quant_error_stats(ref, -ref)["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        quant_error_stats(ref, q[:3])


def test_activation_stats_underflow_and_clamping():
    # one row, amax 6 -> scale 1: 0.1 and 0.2 round to 0 on the E2M1 grid, 1 and 6 survive
    x = torch.tensor([[6.0, 0.1, -0.2, 1.0]])
    s = activation_stats(x, Recipe.preset("fp4-direct"))
    assert s["underflow"] == 0.5 and s["clamped"] == 0.0
    expect = quant_error_stats(x, torch.tensor([[6.0, 0.0, 0.0, 1.0]]))
    assert s["snr_db"] == pytest.approx(expect["snr_db"])

    # OCC at alpha: values beyond the alpha / (1 - alpha) quantiles are clamped
    g = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(64, 128, generator=g)
    r = Recipe.preset("fp4-paper").with_overrides(["occ.alpha=0.97"])
    hi = torch.quantile(x.flatten(), 0.97, interpolation="nearest")
    lo = torch.quantile(x.flatten(), 0.03, interpolation="nearest")
    expected = float(((x > hi) | (x < lo)).float().mean())
    assert activation_stats(x, r)["clamped"] == pytest.approx(expected)


def test_occ_compensation_raises_snr_on_outliers():
    # heavy-tailed activations: clamping + compensation beats plain absmax (paper's OCC table)
    g = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(256, 256, generator=g) / torch.rand(256, 256, generator=g).clamp_min(1e-3)
    direct = activation_stats(x, Recipe.preset("fp4-direct"))
    occ = activation_stats(x, Recipe.preset("fp4-paper"))
    no_comp = activation_stats(
        x, Recipe.preset("fp4-paper").with_overrides(["occ.compensate=false"])
    )
    assert occ["snr_db"] > no_comp["snr_db"]
    assert occ["snr_db"] > direct["snr_db"] + 3, (direct, occ)
    assert occ["underflow"] < direct["underflow"]
    # outliers in the FP8 operand (E4M3's 2**-4 rounding instead of exact): between the two
    e4m3 = activation_stats(x, Recipe.preset("fp4-paper").with_overrides(["occ.compensation=e4m3"]))
    assert no_comp["snr_db"] < e4m3["snr_db"] <= occ["snr_db"], (no_comp, e4m3, occ)


def test_hooks_record_every_fp4_linear():
    torch.manual_seed(random.randrange(2**31))
    model = LLaMA(
        ModelConfig(dim=64, n_layers=2, n_heads=2, ffn_hidden=128, vocab_size=96, max_seq_len=16)
    )
    recipe = Recipe.preset("fp4-paper")
    convert(model, recipe)
    fp4_names = {n for n, m in model.named_modules() if type(m).__name__ == "FP4Linear"}
    assert len(fp4_names) == 2 * 4 and "lm_head" not in fp4_names  # wqkv, wo, w13, w2

    seen = {}
    for name, m in model.named_modules():
        if name in fp4_names:
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
    mon = QuantMonitor(model)
    assert mon.num_layers == len(fp4_names)
    idx = torch.randint(0, 96, (2, 16))
    model(idx)
    assert mon.stop() == {}  # inactive: nothing recorded
    mon.start()
    model(idx)
    model(torch.randint(0, 96, (2, 16)))  # a second micro-batch does not overwrite the first
    records = mon.stop()
    assert set(records) == fp4_names
    for name, entry in records.items():
        m = model.get_submodule(name)
        assert entry["x"] == pytest.approx(activation_stats(seen[name], recipe))
        assert entry["w"] == pytest.approx(weight_stats(m.weight, recipe))
        w_hat = quantize(m.weight.detach(), "e2m1", "row").dequantize()
        assert entry["w"]["snr_db"] == pytest.approx(quant_error_stats(m.weight, w_hat)["snr_db"])
        assert 0 < entry["x"]["clamped"] < 0.05
    table = mon.summary_markdown()
    assert all(f"| {n} |" in table for n in fp4_names)
    mon.remove()
    mon.start()
    model(idx)
    assert mon.stop() == {}


def test_monitor_in_training_logs_and_leaves_losses_unchanged(tmp_path):
    rng = random.Random(7)
    words = "in the beginning was the word and light dark water earth".split()
    text = "\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(800))
    (tmp_path / "t.txt").write_text(text + "\n")
    ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16).to_json(
        tmp_path / "m.json"
    )
    base = dict(
        model=str(tmp_path / "m.json"),
        data=str(tmp_path / "t.txt"),
        vocab_size=280,
        cache_dir=str(tmp_path / "cache"),
        batch_size=2,
        max_steps=4,
        log_every=1,
        eval_every=4,
        eval_batches=1,
        progress=False,
        device="cpu",
        lr=3e-3,
    )
    train(TrainConfig(**base, out_dir=str(tmp_path / "off")))
    train(TrainConfig(**base, out_dir=str(tmp_path / "on"), monitor_every=2))

    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]

    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    mon_rows = [r for r in read_metrics(tmp_path / "on") if "monitor" in r]
    assert [r["step"] for r in mon_rows] == [2, 4]
    assert set(mon_rows[0]["monitor"]) == {
        "layers.0.attention.wqkv",
        "layers.0.attention.wo",
        "layers.0.feed_forward.w13",
        "layers.0.feed_forward.w2",
    }
    assert set(mon_rows[0]["monitor"]["layers.0.attention.wqkv"]["x"]) == {
        "snr_db",
        "cosine",
        "rel_mse",
        "clamped",
        "underflow",
    }
    summary = (tmp_path / "on" / "monitor_summary.md").read_text()
    assert "| layers.0.feed_forward.w2 |" in summary
