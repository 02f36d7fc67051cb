"""`fp4train bench memory` (the one benchmark that also runs on the CPU): what autograd saves."""

from __future__ import annotations

import pytest

from fp4train.bench import main, saved_activations


@pytest.fixture(scope="module")
def rows():
    recipes = ("bf16", "fp4-paper", "fp4-paper[act_save=e4m3]")
    return {r["recipe"]: r for r in saved_activations(("tiny",), recipes, 2, 32, "cpu")}


def test_totals_add_up_by_dtype(rows):
    for r in rows.values():
        parts = sum(v for k, v in r.items() if k.endswith("_gib") and k != "saved_gib")
        assert r["saved_gib"] == pytest.approx(parts)
        n_layers = 4  # the tiny config
        want = r["saved_gib"] * 2**30 / (2 * 32 * n_layers) / 1024
        assert r["kib_per_token_layer"] == pytest.approx(want)


def test_act_save_e4m3_moves_activations_to_one_byte(rows):
    plain, e4m3 = rows["fp4-paper"], rows["fp4-paper[act_save=e4m3]"]
    assert plain["float8_e4m3fn_gib"] == 0 and rows["bf16"]["float8_e4m3fn_gib"] == 0
    assert e4m3["float8_e4m3fn_gib"] > 0
    # the norms' and SwiGLU's float32 inputs (4 bytes) become 1 byte + a scale per row
    assert e4m3["saved_gib"] < plain["saved_gib"] - 2 * e4m3["float8_e4m3fn_gib"]


def test_cli_prints_the_table(capsys):
    assert main(["memory", "--models", "tiny", "--batch", "1", "--seq", "16",
                 "--recipes", "bf16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "saved for backward, batch 1 x seq 16" in out
    assert "| tiny | bf16 |" in out
