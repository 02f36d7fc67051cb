"""fp4train.kernels.launch: the cache key of a direct launch distinguishes what Triton
specializes a compiled kernel on, and a call must pass its runtime arguments positionally.
(tests/test_kernels.py runs launch() under the interpreter; tests/test_gpu.py checks the direct
launches' results bit for bit.)"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fp4train.kernels import launch as kl  # noqa: E402


@triton.jit
def _axpy(x_ptr, y_ptr, n, a, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * a + FLAG, mask=m)


def _key(*args, **kw):
    return kl.launch_key(_axpy, args, kw, 0)


def test_key_separates_what_triton_specializes():
    buf = torch.zeros(64, dtype=torch.uint8)
    f32 = torch.zeros(16)
    aligned, misaligned = buf[16:], buf[1:]
    assert aligned.data_ptr() % 16 == 0 and misaligned.data_ptr() % 16 != 0
    base = _key(f32, f32, 32, 2.0, BLOCK=16)
    # the same specialization: another aligned tensor, another multiple of 16, another float
    assert _key(torch.zeros(8), f32, 48, -1.5, BLOCK=16) == base
    different = [
        _key(f32.double(), f32, 32, 2.0, BLOCK=16),  # dtype
        _key(aligned.view(torch.float32)[:4], f32, 32, 2.0, BLOCK=16),  # same (aligned)
        _key(misaligned[:4], f32, 32, 2.0, BLOCK=16),  # dtype and alignment
        _key(f32, f32, 1, 2.0, BLOCK=16),  # int equal to 1
        _key(f32, f32, 33, 2.0, BLOCK=16),  # not divisible by 16
        _key(f32, f32, 2**31 + 16, 2.0, BLOCK=16),  # int64
        _key(f32, f32, 32, 2, BLOCK=16),  # an int where a float was
        _key(f32, f32, 32, 2.0, BLOCK=32),  # constexpr value
        _key(f32, f32, 32, 2.0, BLOCK=16, num_warps=8),  # launch option
    ]
    assert different[1] == base  # an aligned view of another dtype's storage: float32, aligned
    for i, k in enumerate(different):
        if i != 1:
            assert k != base, i
    assert _key(misaligned, f32, 32, 2.0, BLOCK=16) != _key(aligned, f32, 32, 2.0, BLOCK=16)
    assert kl.launch_key(_axpy, (f32, f32, 32, 2.0), {"BLOCK": 16}, 1) != base  # device


def test_constexpr_tail_takes_keywords_and_defaults():
    assert kl.constexpr_tail(_axpy, 4, {"BLOCK": 16, "num_warps": 4}) == (16, 3)
    assert kl.constexpr_tail(_axpy, 4, {"BLOCK": 16, "FLAG": 7}) == (16, 7)


def test_constexpr_tail_rejects_a_runtime_argument_by_keyword():
    with pytest.raises(TypeError, match="'a' positionally"):
        kl.constexpr_tail(_axpy, 3, {"a": 2.0, "BLOCK": 16})
    with pytest.raises(TypeError, match="constexpr 'BLOCK' is missing"):
        kl.constexpr_tail(_axpy, 4, {})


def test_host_grid_helpers_equal_tritons():
    for a in [0, 1, 2, 15, 16, 17, 63, 64, 65, 4095, 4096, 4097, 11008, 2**31 + 5]:
        assert kl.next_pow2(a) == triton.next_power_of_2(a), a
        for b in [1, 2, 16, 64, 128, 4096]:
            assert kl.cdiv(a, b) == triton.cdiv(a, b), (a, b)
