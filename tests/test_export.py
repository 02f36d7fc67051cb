"""FP4 export: code layout vs ml_dtypes, nibble packing, export/load exactness, bad files."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn

from fp4train import FP4Linear, OperandSpec, Recipe
from fp4train.export import (
    export_fp4,
    from_codes,
    load_fp4,
    pack_nibbles,
    to_codes,
    unpack_nibbles,
)
from fp4train.quantize import fake_quantize, quantize

safetensors = pytest.importorskip("safetensors.torch")

# code -> value, the E2M1 table (sign bit 3, exponent bits 2..1, mantissa bit 0)
E2M1_TABLE = [
    (0b0000, 0.0),
    (0b0001, 0.5),  # subnormal: exponent 0, mantissa 1
    (0b0010, 1.0),
    (0b0011, 1.5),
    (0b0100, 2.0),
    (0b0101, 3.0),
    (0b0110, 4.0),
    (0b0111, 6.0),
    (0b1000, -0.0),
    (0b1111, -6.0),
]


@pytest.mark.parametrize("code, value", E2M1_TABLE)
def test_code_table(code, value):
    got = from_codes(torch.tensor([code], dtype=torch.uint8))
    assert got.item() == value and torch.signbit(got).item() == (code >= 8)
    assert to_codes(torch.tensor([value])).item() == code


def test_codes_match_ml_dtypes():
    all_codes = np.arange(16, dtype=np.uint8)
    ref_values = all_codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    values = from_codes(torch.from_numpy(all_codes))
    assert np.array_equal(values.numpy().view(np.uint32), ref_values.view(np.uint32))  # -0 too

    torch.manual_seed(0)
    x = quantize(torch.randn(64, 48), "e2m1", "row").data  # grid values, both signs
    ref_codes = x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert np.array_equal(to_codes(x).numpy(), ref_codes)


@pytest.mark.parametrize("k", [48, 7, 1])
def test_pack_unpack_round_trip_and_byte_order(k):
    gen = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8, generator=gen)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, k), codes)
    # independent numpy packing: element 2j in the low nibble, 2j+1 (or 0 padding) high
    c = np.pad(codes.numpy(), ((0, 0), (0, k % 2)))
    assert np.array_equal(packed.numpy(), c[:, 0::2] | (c[:, 1::2] << 4))
    if hasattr(torch, "float4_e2m1fn_x2"):  # same bytes, torch's packed FP4 dtype
        assert packed.view(torch.float4_e2m1fn_x2).shape == packed.shape


def test_pack_errors():
    with pytest.raises(ValueError, match="cannot unpack 5 codes"):
        unpack_nibbles(torch.zeros(2, 4, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="uint8"):
        pack_nibbles(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="not on the e2m1 grid"):
        to_codes(torch.tensor([0.75]))
    with pytest.raises(ValueError, match="4-bit format"):
        to_codes(torch.tensor([1.0]), "e4m3")


class _Tiny(nn.Module):
    def __init__(self, k: int = 32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(50, k)
        self.wq = nn.Linear(k, 24, bias=False)
        self.fp4 = FP4Linear(24, 16, recipe="fp4-paper")
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def test_export_load_gives_fake_quantized_weights(tmp_path):
    torch.manual_seed(0)
    model = _Tiny(k=33)  # odd K: padded when packed
    path = tmp_path / "m.safetensors"
    names = export_fp4(model, path)
    assert sorted(names) == ["fp4.weight", "wq.weight"]  # embedding and LM head kept
    sd = model.state_dict()
    loaded = load_fp4(path, dtype=torch.float32)
    assert set(loaded) == set(sd)
    for name in names:
        expect = fake_quantize(sd[name].float(), "e2m1", "row")
        assert torch.equal(loaded[name], expect), name
    for name in set(sd) - set(names):
        assert torch.equal(loaded[name], sd[name]), name
    bf16 = load_fp4(path)
    assert torch.equal(bf16["wq.weight"], loaded["wq.weight"].bfloat16())

    with safetensors.safe_open(str(path), framework="pt") as fh:
        assert fh.get_tensor("wq.weight").dtype == torch.uint8
        assert fh.get_tensor("wq.weight").shape == (24, 17)
        meta = json.loads(fh.metadata()["fp4train"])
    assert meta["format"] == "e2m1" and meta["tensors"]["wq.weight"]["shape"] == [24, 33]


def test_export_with_recipe_block_and_state_dict(tmp_path):
    torch.manual_seed(1)
    model = _Tiny()
    recipe = Recipe(name="w-block8", fwd_w=OperandSpec("e2m1", "block", block_size=8))
    path = tmp_path / "b.safetensors"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = export_fp4(sd, path, recipe, skip=(), other_dtype=torch.bfloat16)
    # from a state dict: every 2-D "...weight"; skip=() takes embedding and LM head too
    assert sorted(names) == ["fp4.weight", "lm_head.weight", "tok_embeddings.weight", "wq.weight"]
    loaded = load_fp4(path, dtype=torch.float32)
    w = sd["wq.weight"]
    assert torch.equal(loaded["wq.weight"], fake_quantize(w, "e2m1", "block", block_size=8))
    assert loaded["norm.weight"].dtype == torch.bfloat16


def test_size_on_disk_vs_bf16(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.Linear(1024, 512, bias=False))
    bf16 = {k: v.bfloat16() for k, v in model.state_dict().items()}
    safetensors.save_file(bf16, str(tmp_path / "bf16.safetensors"))
    export_fp4(model, tmp_path / "fp4.safetensors")
    ratio = (tmp_path / "bf16.safetensors").stat().st_size / (
        tmp_path / "fp4.safetensors"
    ).stat().st_size
    # 16 bits vs 4 bits + a float32 scale per row (K = 512 or 1024): about 3.9x
    assert 3.8 < ratio < 4.0, f"bf16 / fp4 size ratio {ratio:.3f}"


def test_export_errors(tmp_path):
    model = _Tiny()
    with pytest.raises(ValueError, match="granularity must be one of"):
        export_fp4(model, tmp_path / "x", "col")
    with pytest.raises(ValueError, match="4-bit format"):
        export_fp4(model, tmp_path / "x", fmt="e4m3")
    with pytest.raises(ValueError, match="high precision"):
        export_fp4(model, tmp_path / "x", Recipe.preset("bf16"))
    with pytest.raises(ValueError, match="block_size"):
        export_fp4(model, tmp_path / "x", "block")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        export_fp4([1, 2], tmp_path / "x")


def test_load_rejects_bad_files(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    export_fp4(_Tiny(), path)
    blob = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_fp4(truncated)

    with safetensors.safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()["fp4train"])

    def write(t, m) -> str:
        p = tmp_path / "bad.safetensors"
        safetensors.save_file(t, str(p), metadata=m)
        return p

    with pytest.raises(ValueError, match="no 'fp4train' metadata"):
        load_fp4(write(tensors, None))
    with pytest.raises(ValueError, match="malformed"):
        load_fp4(write(tensors, {"fp4train": "{not json"}))
    wrong_shape = json.loads(json.dumps(meta))
    wrong_shape["tensors"]["wq.weight"]["shape"] = [24, 64]
    with pytest.raises(ValueError, match="should be uint8"):
        load_fp4(write(tensors, {"fp4train": json.dumps(wrong_shape)}))
    no_scale = {k: v for k, v in tensors.items() if k != "wq.weight.scale"}
    with pytest.raises(ValueError, match="scale of 'wq.weight'"):
        load_fp4(write(no_scale, {"fp4train": json.dumps(meta)}))
    with pytest.raises(FileNotFoundError):
        load_fp4(tmp_path / "missing.safetensors")
