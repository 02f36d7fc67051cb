import json
import random
import sys
from types import SimpleNamespace

import pytest

from fp4train.recipe import Recipe
from fp4train.speedup import HARDWARE, main, step_time_estimate, theoretical_speedup


# ---------------------------------------------------------------------------- paper App. B
def test_paper_numbers_at_7b_shapes():
    # h = 4096, s = 2048: the appendix's 3.12× (no overhead), its formula's 3.03× (DGE + OCC
    # as printed), and the 2.95× it reports
    ideal = theoretical_speedup(4096, 2048, dge=False, occ_alpha=None)
    printed = theoretical_speedup(4096, 2048, occ_alpha=0.99, occ_flops="printed")
    reported = theoretical_speedup(4096, 2048, occ_alpha=0.99, occ_flops="reported")
    assert round(ideal["ratio"], 2) == 3.12
    assert round(printed["ratio"], 2) == 3.03
    assert round(reported["ratio"], 2) == 2.95
    # the shares the appendix quotes: DGE 32/(6h+5s+36) = 0.1%, OCC 5.6% (2.8% as printed)
    assert round(reported["overhead"]["dge"], 3) == 0.001
    assert round(reported["overhead"]["occ"], 3) == 0.056
    assert round(printed["overhead"]["occ"], 3) == 0.028


def test_matches_closed_forms():
    rng = random.Random(0)
    for _ in range(20):
        h, s = rng.randrange(64, 16384), rng.randrange(16, 32768)
        a = rng.uniform(0.9, 0.999)
        ideal = (24 * h + 5 * s + 36) / (6 * h + 5 * s + 36)
        printed = (24 * h + 5 * s + 36) / (6 * h + 24 * (1 - a) * h + 5 * s + 68)
        reported = (24 * h + 5 * s + 36) / (6 * h + 48 * (1 - a) * h + 5 * s + 68)
        got = theoretical_speedup(h, s, dge=False, occ_alpha=None)["ratio"]
        assert got == pytest.approx(ideal, rel=1e-12)
        got = theoretical_speedup(h, s, occ_alpha=a, occ_flops="printed")["ratio"]
        assert got == pytest.approx(printed, rel=1e-12)
        got = theoretical_speedup(h, s, occ_alpha=a, occ_flops="reported")["ratio"]
        assert got == pytest.approx(reported, rel=1e-12)


def test_gemm_speedup_one_is_no_speedup():
    r = theoretical_speedup(4096, 2048, gemm_speedup=1.0, dge=False, occ_alpha=None)
    assert r["ratio"] == pytest.approx(1.0, rel=1e-12)
    assert r["bf16_total"] == pytest.approx(3 * (24 * 4096**2 + 5 * 2048 * 4096 + 36 * 4096))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(h=0, s=2048),
        dict(h=4096, s=-1),
        dict(h=4096.0, s=2048),
        dict(h=4096, s=2048, occ_alpha=1.0),
        dict(h=4096, s=2048, occ_alpha=0.3),
        dict(h=4096, s=2048, occ_flops="measured"),
        dict(h=4096, s=2048, gemm_speedup=0),
    ],
)
def test_theoretical_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        theoretical_speedup(**kwargs)


# ---------------------------------------------------------------------------- step estimate
_TINY = SimpleNamespace(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=100, mlp="swiglu"
)


def _terms(est):
    return {t["term"]: t for t in est["terms"]}


def test_flop_counts_match_hand_computation():
    est = step_time_estimate(_TINY, seq_len=16, batch_tokens=32, hardware="h100")
    t = _terms(est)
    # per layer Σ N·K: wqkv (64 + 2·32)·64 (2 kv heads of 16), wo 64·64, w13 2·96·64, w2 64·96
    nk = 8192 + 4096 + 12288 + 6144
    for g in ("GEMM fwd X·Wᵀ", "GEMM dgrad dY·W", "GEMM wgrad dYᵀ·X"):
        assert t[g]["flops"] == 2 * 32 * nk * 2
    assert t["LM head GEMMs"]["flops"] == 3 * 2 * 32 * 100 * 64
    assert t["attention QKᵀ, PV"]["flops"] == 3 * 4 * 32 * 16 * 64 * 2
    # quantize X reads bf16 (2 B) and writes FP8 twice (fwd + transposed for wgrad): 4 B per
    # element of every linear's input, once per fused layer (wqkv, wo, w13: K 64; w2: K 96);
    # dY: 3 B for dgrad (row) + 5 B for wgrad (column amax)
    sum_k = 64 * 3 + 96
    sum_n = 128 + 64 + 192 + 64
    assert t["quantize X"]["bytes"] == 4 * 32 * sum_k * 2
    assert t["quantize dY (dgrad, wgrad)"]["bytes"] == 8 * 32 * sum_n * 2


def test_gelu_mlp_has_two_matrices():
    cfg = SimpleNamespace(**{**vars(_TINY), "mlp": "gelu"})
    t = _terms(step_time_estimate(cfg, seq_len=16, batch_tokens=32, recipe="bf16"))
    nk = 8192 + 4096 + 6144 + 6144  # wqkv, wo, w1, w2
    assert t["GEMM fwd X·Wᵀ"]["flops"] == 2 * 32 * nk * 2


def test_flops_agree_with_model_config():
    model = pytest.importorskip("fp4train.model")
    cfg = model.get_config("1.3b")
    est = step_time_estimate(cfg, seq_len=2048, batch_tokens=8192, recipe="bf16")
    flops = sum(t["flops"] for t in est["terms"])
    assert flops == pytest.approx(cfg.flops_per_token(2048) * 8192, rel=1e-12)


def test_builtin_shapes_when_model_module_is_missing(monkeypatch):
    with_model = step_time_estimate("7b", 2048, 2048 * 8)
    monkeypatch.setitem(sys.modules, "fp4train.model", None)  # import raises ImportError
    without = step_time_estimate("7b", 2048, 2048 * 8)
    assert without["shape"]["dim"] == 4096
    assert _terms(without)["GEMM fwd X·Wᵀ"]["flops"] == _terms(with_model)["GEMM fwd X·Wᵀ"]["flops"]
    assert step_time_estimate("13b", 2048, 2048)["shape"]["dim"] == 5120


def test_hardware_table_sanity():
    for hw in HARDWARE.values():
        assert hw.fp8.value > hw.bf16.value > 0
        assert hw.bandwidth.value > 0
        peaks = [hw.bf16, hw.fp8, hw.bandwidth] + ([hw.fp4] if hw.fp4 else [])
        assert {p.source for p in peaks} <= {"measured", "datasheet", "estimate"}
    assert HARDWARE["h100"].fp4 is None and HARDWARE["h200"].fp4 is None  # Hopper: no FP4
    assert HARDWARE["b200"].fp4.value > HARDWARE["b200"].fp8.value


def test_bf16_recipe_has_no_speedup():
    est = step_time_estimate("7b", 2048, 2048 * 16, recipe="bf16")
    assert est["ratio"] == pytest.approx(1.0, rel=1e-12)
    assert all(t["bf16_s"] == t["recipe_s"] for t in est["terms"])


def test_gemm_rates_per_hardware():
    h100 = HARDWARE["h100"]
    est = step_time_estimate("7b", 2048, 2048 * 16, hardware="h100")
    assert est["gemm_ratio"] == pytest.approx(h100.fp8.value / h100.bf16.value, rel=1e-12)
    # B200: fwd E2M1×E2M1 at FP4, dgrad and wgrad read E5M2 dY and so run at FP8
    b200 = HARDWARE["b200"]
    est = step_time_estimate("7b", 2048, 2048 * 16, hardware="b200")
    expected = 3 / (b200.bf16.value / b200.fp4.value + 2 * b200.bf16.value / b200.fp8.value)
    assert est["gemm_ratio"] == pytest.approx(expected, rel=1e-12)
    # FP4 packs two values per byte there: quantize X writes 2 × 0.5 B after reading 2 B
    t = _terms(step_time_estimate(_TINY, 16, 32, hardware="b200"))
    assert t["quantize X"]["bytes"] == 3 * 32 * (64 * 3 + 96) * 2


def test_recipe_switches_terms():
    base = Recipe.preset("fp4-paper")
    names = set(_terms(step_time_estimate("7b", 2048, 2048 * 16, recipe=base)))
    assert {"OCC quantile of X", "OCC residual GEMMs R·Wᵀ, dYᵀ·R", "DGE correction of dW"} <= names
    plain = set(_terms(step_time_estimate("7b", 2048, 2048 * 16, recipe="fp4-direct")))
    assert not any(n.startswith(("OCC", "DGE")) for n in plain)
    # residual GEMM FLOPs scale with the outlier density 2(1−α)
    a = _terms(step_time_estimate("7b", 2048, 2048, recipe=base))
    b = _terms(step_time_estimate("7b", 2048, 2048, recipe=base.replace(**{"occ.alpha": 0.999})))
    key = "OCC residual GEMMs R·Wᵀ, dYᵀ·R"
    assert a[key]["flops"] == pytest.approx(10 * b[key]["flops"], rel=1e-9)


def test_weight_passes_run_per_micro_batch():
    a = _terms(step_time_estimate("7b", 2048, 2048 * 64, micro_batch_tokens=2048 * 8))
    b = _terms(step_time_estimate("7b", 2048, 2048 * 64, micro_batch_tokens=2048 * 16))
    for key in ("quantize W", "DGE correction of dW"):
        assert a[key]["bytes"] == pytest.approx(2 * b[key]["bytes"], rel=1e-12)
    assert a["quantize X"]["bytes"] == b["quantize X"]["bytes"]


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (("7b", 2048, 3000), {}),  # not a multiple of seq_len
        (("7b", 0, 2048), {}),
        (("7b", 2048, 2048), {"hardware": "tpu"}),
        (("70b", 2048, 2048), {}),
        (("7b", 2048, 2048), {"recipe": "fp2"}),
        (("7b", 2048, 2048), {"micro_batch_tokens": 0}),
    ],
)
def test_step_estimate_rejects_bad_input(args, kwargs):
    with pytest.raises(ValueError):
        step_time_estimate(*args, **kwargs)


# ---------------------------------------------------------------------------- CLI
def test_help_exits_zero_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: fp4train speedup" in out
    assert "fp4train speedup --model 7b --hardware b200" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--seq-len", "0"],
        ["--tokens", "many"],
        ["--hardware", "tpu"],
        ["--model", "nope"],
        ["--bogus"],
        ["--occ-alpha", "1.5"],
        ["--occ-alpha", "0.99", "--no-occ"],
        ["--tokens", "3000"],
        ["--measured-ratio", "-1"],
    ],
)
def test_bad_args_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp4train speedup: error:") and "\n" not in err


def test_text_report(capsys):
    argv = ["--model", "7b", "--tokens", "4194304", "--hardware", "h100"]
    assert main(argv + ["--measured-ratio", "1.2"]) == 0
    out = capsys.readouterr().out
    for s in ("3.12×", "3.03×", "2.95×", "Not counted by the formula", "quantize dY", "measured"):
        assert s in out
    est = step_time_estimate("7b", 2048, 4194304, "h100")
    assert f"Expected step speed-up, fp4-paper over bf16: {est['ratio']:.2f}×" in out
    assert f"Measured step speed-up: 1.20× = {1.2 / est['ratio']:.0%}" in out


def test_json_report_and_flags(capsys):
    assert main(["--model", "7b", "--tokens", "65536", "--json", "--no-dge"]) == 0
    out = json.loads(capsys.readouterr().out)
    recipe = Recipe.preset("fp4-paper").replace(dge=None)
    est = step_time_estimate("7b", 2048, 65536, "h100", recipe)
    assert out["estimate"]["ratio"] == pytest.approx(est["ratio"], rel=1e-12)
    assert not any(t["term"].startswith("DGE") for t in out["estimate"]["terms"])
    assert round(out["paper"]["reported"]["ratio"], 2) == 2.95

    assert main(["--tokens", "65536", "--json", "--no-occ"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not any(t["term"].startswith("OCC") for t in out["estimate"]["terms"])
    assert out["paper"]["printed"]["occ_alpha"] is None
