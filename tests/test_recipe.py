"""Recipe: presets, immutability, serialization, replace/with_overrides and validation."""

import dataclasses
import json

import pytest

from fp4train.recipe import OPERANDS, PRESETS, DGEConfig, OCCConfig, OperandSpec, Recipe

PRESET_NAMES = ["bf16", "fp8", "fp4-paper", "fp4-direct", "fp4-dge", "fp4-occ"]
FWD_REUSE = OperandSpec("fwd", "row")


def test_presets_listed():
    assert Recipe.presets() == list(PRESETS)
    assert set(PRESET_NAMES) <= set(Recipe.presets())


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_constructs_and_is_named(name):
    r = Recipe.preset(name)
    assert isinstance(r, Recipe) and r.name == name and str(r) == name
    assert (r.backend, r.compute_dtype, r.quantize_lm_head, r.nonfinite) == (
        "auto",
        "bfloat16",
        False,
        "raise",
    )
    assert r.quantized == (name != "bf16")


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"unknown recipe preset 'fp4'; choose from \["):
        Recipe.preset("fp4")


@pytest.mark.parametrize(
    "name, dge, occ",
    [
        ("fp4-paper", True, True),
        ("fp4-direct", False, False),
        ("fp4-dge", True, False),
        ("fp4-occ", False, True),
    ],
)
def test_fp4_presets_are_the_papers_w4a4_layout(name, dge, occ):
    r = Recipe.preset(name)
    assert r.fwd_x == OperandSpec("e2m1", "row") and r.fwd_w == OperandSpec("e2m1", "row")
    assert r.dgrad_dy == OperandSpec("e5m2", "row") and r.wgrad_dy == OperandSpec("e5m2", "col")
    assert r.dgrad_w.reuse_fwd and r.wgrad_x.reuse_fwd
    assert r.dge == (DGEConfig(k=5.0, clip=3.0) if dge else None)
    assert r.occ == (OCCConfig(alpha=0.99, granularity="tensor", compensate=True) if occ else None)


def test_bf16_and_fp8_presets():
    bf16 = Recipe.preset("bf16")
    assert all(bf16.operand(op).format is None for op in OPERANDS)
    assert bf16.dge is None and bf16.occ is None
    fp8 = Recipe.preset("fp8")
    assert fp8.fwd_x.format == fp8.fwd_w.format == "e4m3"
    assert fp8.dgrad_dy.format == fp8.wgrad_dy.format == "e5m2"
    assert fp8.dge is None and fp8.occ is None


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_is_frozen(name):
    r = Recipe.preset(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.backend = "reference"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.fwd_x.format = "e4m3"
    if r.dge is not None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.dge.k = 3.0
    assert Recipe.preset(name).backend == "auto"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_to_dict_from_dict_round_trip(name):
    r = Recipe.preset(name)
    d = r.to_dict()
    assert isinstance(d["fwd_x"], dict) and set(OPERANDS) <= set(d)
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r  # survives JSON (checkpoints)
    custom = r.replace(backend="reference", rounding="stochastic", **{"fwd_x.format": "e4m3"})
    assert Recipe.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


def test_from_dict_rejects_unknown_fields():
    d = Recipe.preset("fp4-paper").to_dict()
    with pytest.raises(ValueError, match=r"unknown recipe fields \['bogus'\]"):
        Recipe.from_dict({**d, "bogus": 1})
    d["fwd_x"] = {**d["fwd_x"], "fmt": "e2m1"}
    with pytest.raises((ValueError, TypeError), match="fmt"):
        Recipe.from_dict(d)


# ----------------------------------------------------------------------------- replace


def test_replace_field_marks_the_name_and_keeps_the_original():
    base = Recipe.preset("fp4-paper")
    r = base.replace(backend="reference")
    assert r.backend == "reference" and r.name == "fp4-paper*"
    assert base.backend == "auto" and Recipe.preset("fp4-paper") == base
    assert r.replace(compute_dtype="float32").name == "fp4-paper*"  # one star, not two
    assert base.replace(name="mine", backend="triton").name == "mine"
    assert base.replace() == base


def test_replace_dotted_keys():
    r = Recipe.preset("fp4-paper").replace(
        **{"dge.k": 3, "occ.alpha": 0.999, "fwd_x.format": "e4m3", "occ.granularity": "row"}
    )
    assert r.dge == DGEConfig(k=3, clip=3.0)
    assert r.occ == OCCConfig(alpha=0.999, granularity="row", compensate=True)
    assert r.fwd_x == OperandSpec("e4m3", "row") and r.fwd_w == OperandSpec("e2m1", "row")


def test_replace_dotted_key_switches_on_a_missing_config():
    r = Recipe.preset("fp4-direct").replace(**{"dge.k": 3, "occ.alpha": 0.97})
    assert r.dge == DGEConfig(k=3) and r.occ == OCCConfig(alpha=0.97)


def test_replace_block_granularity():
    r = Recipe.preset("fp4-direct").replace(
        **{
            "fwd_x.granularity": "block",
            "fwd_x.block_size": 32,
            "wgrad_x": OperandSpec("e2m1", "col"),  # a block-scaled X cannot be reused
        }
    )
    assert r.fwd_x == OperandSpec("e2m1", "block", 32)


def test_replace_shorthands():
    base = Recipe.preset("fp4-paper")
    r = base.replace(fwd_format="e4m3", grad_format="e4m3", fwd_granularity="tensor")
    assert r.fwd_x == r.fwd_w == OperandSpec("e4m3", "tensor")
    assert r.dgrad_dy == OperandSpec("e4m3", "row") and r.wgrad_dy == OperandSpec("e4m3", "col")
    assert r.dgrad_w == base.dgrad_w and r.wgrad_x == base.wgrad_x

    s = base.replace(rounding="stochastic")
    for op in OPERANDS:  # every quantized operand; reused ones follow the forward's
        want = "stochastic" if base.operand(op).quantized else "nearest"
        assert s.operand(op).rounding == want, op
    assert Recipe.preset("bf16").replace(rounding="stochastic").to_dict() == {
        **Recipe.preset("bf16").to_dict(),
        "name": "bf16*",
    }


@pytest.mark.parametrize("off", [None, False, "none"])
def test_replace_switches_dge_and_occ_off(off):
    r = Recipe.preset("fp4-paper").replace(dge=off, occ=off)
    assert r.dge is None and r.occ is None


@pytest.mark.parametrize("on", [True, "on"])
def test_replace_switches_dge_and_occ_on_with_defaults(on):
    r = Recipe.preset("fp4-direct").replace(dge=on, occ=on)
    assert r.dge == DGEConfig() and r.occ == OCCConfig()


def test_replace_takes_configs_and_dicts():
    r = Recipe.preset("fp4-direct").replace(
        dge={"k": 4.0}, occ=OCCConfig(alpha=0.98), fwd_x={"format": "e4m3"}
    )
    assert r.dge == DGEConfig(k=4.0) and r.occ == OCCConfig(alpha=0.98)
    assert r.fwd_x == OperandSpec("e4m3", "row")


def test_high_precision_operand_needs_no_granularity_change():
    # keeping W (dgrad) and X (wgrad) in high precision instead of reusing the FP4 tensors is a
    # valid recipe: the unused granularity of a high-precision operand must not reject it
    r = Recipe.preset("fp4-paper").replace(**{"dgrad_w.format": None, "wgrad_x.format": None})
    assert r.dgrad_w.format is None and r.wgrad_x.format is None


# ----------------------------------------------------------------------------- with_overrides


def test_with_overrides_parses_values():
    r = Recipe.preset("fp4-paper").with_overrides(
        [
            "dge.k=3",
            " occ.alpha = 0.999 ",
            "fwd_x.format=e4m3",
            "backend=reference",
            "quantize_lm_head=true",
            "fast_accum=true",
            "occ.compensate=false",
            "rounding=stochastic",
            "name=a=b",
        ]
    )
    assert r.dge.k == 3 and isinstance(r.dge.k, int)
    assert r.occ.alpha == 0.999 and r.occ.compensate is False
    assert r.fwd_x.format == "e4m3" and r.fwd_x.rounding == "stochastic"
    assert r.backend == "reference" and r.quantize_lm_head is True and r.fast_accum is True
    assert r.name == "a=b"


@pytest.mark.parametrize("off", ["dge=none", "dge=null", "dge=off", "dge=None", "dge=false"])
def test_with_overrides_switches_off(off):
    assert Recipe.preset("fp4-paper").with_overrides([off]).dge is None


def test_with_overrides_switches_on_and_sets_blocks():
    r = Recipe.preset("fp4-direct").with_overrides(
        ["dge=on", "occ=true", "dgrad_dy.granularity=block", "dgrad_dy.block_size=32"]
    )
    assert r.dge == DGEConfig() and r.occ == OCCConfig()
    assert r.dgrad_dy == OperandSpec("e5m2", "block", 32)


def test_with_overrides_needs_key_value():
    with pytest.raises(ValueError, match="must look like key=value"):
        Recipe.preset("fp4-paper").with_overrides(["dge.k"])


# ----------------------------------------------------------------------------- validation

BAD = [
    # (preset, changes, text the error must name)
    ("fp4-paper", {"backend": "cuda"}, "'backend'"),
    ("fp4-paper", {"compute_dtype": "float8"}, "'compute_dtype'"),
    ("fp4-paper", {"nonfinite": "ignore"}, "'nonfinite'"),
    ("fp4-paper", {"quantize_lm_head": "yes"}, "'quantize_lm_head'"),
    ("fp4-paper", {"fast_accum": 1}, "'fast_accum'"),
    ("fp4-paper", {"name": 3}, "'name'"),
    ("fp4-paper", {"fwd_x.format": "fp4"}, "'fwd_x.format'"),
    ("fp4-paper", {"fwd_w.format": "e9m1"}, "'fwd_w.format'"),
    ("fp4-paper", {"fwd_w.format": ["e2m1"]}, "'fwd_w.format'"),  # a JSON list from --set
    ("fp4-paper", {"grad_format": "int8"}, "'dgrad_dy.format'"),
    ("fp4-paper", {"bogus": 1}, "'bogus'"),
    ("fp4-paper", {"dge.kk": 3}, "'dge.kk'"),
    ("fp4-paper", {"occ.beta": 3}, "'occ.beta'"),
    ("fp4-paper", {"fwd_x.fmt": "e2m1"}, "'fwd_x.fmt'"),
    ("fp4-paper", {"foo.bar": 1}, "'foo.bar'"),
    ("fp4-paper", {"occ.alpha": 1.0}, "'occ.alpha'"),
    ("fp4-paper", {"occ.alpha": 0.5}, "'occ.alpha'"),
    ("fp4-paper", {"occ.alpha": 1.5}, "'occ.alpha'"),
    ("fp4-paper", {"occ.alpha": "0.99"}, "'occ.alpha'"),
    ("fp4-paper", {"occ.granularity": "col"}, "'occ.granularity'"),
    ("fp4-paper", {"occ.compensate": "yes"}, "'occ.compensate'"),
    ("fp4-paper", {"occ.compensation": "sparse"}, "'occ.compensation'"),
    # outliers in E4M3 need a compensated, row-wise E2M1 X that wgrad reuses
    ("fp4-paper", {"occ.compensation": "e4m3", "occ.compensate": False}, "occ.compensate"),
    ("fp4-paper", {"occ.compensation": "e4m3", "fwd_x.format": "e4m3"}, "row-wise E2M1"),
    ("fp4-paper", {"occ.compensation": "e4m3", "fwd_x.granularity": "tensor"}, "row-wise E2M1"),
    (
        "fp4-paper",
        {"occ.compensation": "e4m3", "wgrad_x": OperandSpec("e2m1", "col")},
        "wgrad_x",
    ),
    ("fp4-paper", {"dge.k": 1}, "'dge.k'"),
    ("fp4-paper", {"dge.k": 0.5}, "'dge.k'"),
    ("fp4-paper", {"dge.k": -5}, "'dge.k'"),
    ("fp4-paper", {"dge.clip": 0}, "'dge.clip'"),
    ("fp4-paper", {"dge": "maybe"}, "'dge'"),
    ("fp4-paper", {"occ": 5}, "'occ'"),
    ("fp4-paper", {"fwd_x": "e2m1"}, "'fwd_x'"),
    ("fp4-paper", {"fwd_granularity": "block"}, "'fwd_x.block_size'"),
    ("fp4-paper", {"fwd_x.granularity": "block", "fwd_x.block_size": 0}, "'fwd_x.block_size'"),
    ("fp4-paper", {"fwd_x.block_size": 32}, "'fwd_x.block_size'"),  # without 'block'
    ("fp4-paper", {"fwd_x.granularity": "col"}, "'fwd_x.granularity'"),
    ("fp4-paper", {"wgrad_dy.granularity": "row"}, "'wgrad_dy.granularity'"),
    ("fp4-paper", {"rounding": "up"}, "'fwd_x.rounding'"),
    # 'fwd' reuse only for dgrad_w / wgrad_x, of a quantized row- or tensor-scaled operand
    ("fp4-paper", {"fwd_x.format": "fwd"}, "'fwd_x.format'"),
    ("fp4-paper", {"dgrad_dy.format": "fwd"}, "'dgrad_dy.format'"),
    ("bf16", {"dgrad_w.format": "fwd"}, "'dgrad_w.format'"),
    ("fp4-paper", {"fwd_w.granularity": "block", "fwd_w.block_size": 32}, "'dgrad_w.format'"),
    ("fp4-paper", {"fwd_x.granularity": "block", "fwd_x.block_size": 32}, "'wgrad_x.format'"),
    # OCC clamps a quantized activation, DGE corrects a quantized weight
    ("fp4-occ", {"fwd_x.format": None, "wgrad_x": OperandSpec(None, "col")}, "'occ'"),
    ("fp4-dge", {"fwd_w.format": None, "dgrad_w": OperandSpec(None, "col")}, "'dge'"),
    ("bf16", {"dge": True}, "'dge'"),
    ("bf16", {"occ": True}, "'occ'"),
]


@pytest.mark.parametrize("preset, changes, names", BAD, ids=[str(c) for _, c, _ in BAD])
def test_invalid_values_raise_naming_the_field(preset, changes, names):
    with pytest.raises(ValueError, match=names):
        Recipe.preset(preset).replace(**changes)


def test_invalid_values_raise_from_the_constructor():
    with pytest.raises(ValueError, match="'backend'"):
        Recipe(backend="gpu")
    with pytest.raises(ValueError, match="'occ'"):
        Recipe(occ=OCCConfig())
    with pytest.raises(ValueError, match="'dgrad_w.granularity'"):
        Recipe(dgrad_w=OperandSpec())  # a W quantized for dgrad needs col/tensor/block


def test_validation_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"allowed: \('auto', 'triton', 'reference'\)"):
        Recipe.preset("fp4-paper").replace(backend="cuda")


# ----------------------------------------------------------------------------- queries


def test_operand_spec_properties():
    assert OperandSpec("e2m1").quantized and not OperandSpec("e2m1").reuse_fwd
    assert FWD_REUSE.reuse_fwd and not FWD_REUSE.quantized
    assert not OperandSpec().quantized
    assert OperandSpec("e2m1").fmt().max == 6.0


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_describe_mentions_every_operand(name):
    r = Recipe.preset(name)
    text = r.describe()
    lines = text.splitlines()
    assert lines[0] == f"recipe {name}:"
    for op in OPERANDS:
        (line,) = [ln for ln in lines if ln.split()[0] == op]
        spec = r.operand(op)
        if spec.format is None:
            assert "high precision" in line
        elif spec.reuse_fwd:
            assert "forward's quantized tensor" in line
        else:
            assert f"{spec.format} {spec.granularity}" in line
    assert ("off (straight-through)" in text) == (r.dge is None)
    assert ("k=5.0" in text) == (r.dge is not None)
    assert ("alpha=0.99" in text) == (r.occ is not None)
    assert "backend   auto" in text


def test_describe_shows_blocks_and_stochastic_rounding():
    r = Recipe.preset("fp4-direct").with_overrides(
        ["dgrad_dy.granularity=block", "dgrad_dy.block_size=32", "rounding=stochastic"]
    )
    assert "e5m2 block32, stochastic" in r.describe()


def test_grad_comm_field():
    for name in Recipe.presets():
        assert Recipe.preset(name).grad_comm is None  # FP8 all-reduce is opt-in
    r = Recipe.preset("bf16").with_overrides(["grad_comm=e5m2"])
    assert r.grad_comm == "e5m2" and "grad_comm e5m2" in r.describe()
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.with_overrides(["grad_comm=none"]).grad_comm is None
    with pytest.raises(ValueError, match=r"'grad_comm' = 'e2m1' is invalid; allowed: \(None, "):
        Recipe.preset("bf16").replace(grad_comm="e2m1")


def test_act_save_field():
    for name in Recipe.presets():
        assert Recipe.preset(name).act_save is None  # activation compression is opt-in
        text = Recipe.preset(name).describe()
        assert "act_save  RMSNorm, SwiGLU inputs and OCC residual as computed" in text
    r = Recipe.preset("fp4-paper").with_overrides(["act_save=e4m3"])
    assert r.act_save == "e4m3"
    assert "act_save  RMSNorm, SwiGLU inputs and OCC residual in e4m3 per row" in r.describe()
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.with_overrides(["act_save=none"]).act_save is None
    with pytest.raises(
        ValueError, match=r"'act_save' = 'e5m2' is invalid; allowed: \(None, 'e4m3'\)"
    ):
        Recipe.preset("bf16").replace(act_save="e5m2")
