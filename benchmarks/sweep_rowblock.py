"""Sweep of the one-launch row quantization (``_quantize_rowblock_kernel``: X and W, both
layouts) at the shapes of 1.3B and 7B layers, one change at a time, as a share of copy bandwidth
(bytes read + written once). dY's passes: benchmarks/sweep_dy.py.

What session 10 learned with it (benchmarks/NOTES.md has the tables): smaller row blocks and
fewer programs are slower (the L2 does not overflow between the two walks); running the next
block's amax walk inside this block's quantize walk does not help; software-pipelining the
loads (cp.async stages) speeds the amax walk alone (to 68-82% of copy) but not the kernel:
the quantize walk (L2 re-read, rounding, the row-major and the transposed FP8 store) takes
60% of the time. 64-row blocks with 16 warps are 10% faster on bf16 X, slower on float32 W,
hence the per-element-size configs. Session 11 timed the "resident" strategy (whole rows in
registers, read once, then an FP8 transpose for q_t) at 61-77% of copy and made it the default
(``ROW_STRATEGY``); the two-walk rows keep the older kernel measured.
Usage: python benchmarks/sweep_rowblock.py
"""

import torch

from fp4train.bench import _copy_gbps, _gpu_ms, _rotating, format_table
from fp4train.kernels import quantize as kq

DEVICE = "cuda"
SHAPES = [  # name, rows, K, dtype
    ("X bf16", 8192, 4096, torch.bfloat16),
    ("X bf16", 8192, 11008, torch.bfloat16),
    ("W fp32", 4096, 4096, torch.float32),
    ("W fp32", 4096, 11008, torch.float32),
]
KNOBS = [  # name, overrides (_strategy, _elements, or the two-walk ROWBLOCK_CONFIG), stores
    ("default (resident + transpose)", {}, "q+qt"),
    ("resident, q only", {}, "q"),
    ("resident, 8192 elements/program", dict(_elements=8192), "q+qt"),
    ("resident, 16384 elements/program", dict(_elements=16384), "q+qt"),
    ("two-walk", dict(_strategy="two-walk"), "q+qt"),
    ("two-walk, amax walk alone (no stores)", dict(_strategy="two-walk"), "none"),
    ("two-walk, q only", dict(_strategy="two-walk"), "q"),
    ("two-walk, q_t only", dict(_strategy="two-walk"), "qt"),
    (
        "two-walk 32x512 w8",
        dict(_strategy="two-walk", BLOCK_M=32, BLOCK_K=512, num_warps=8),
        "q+qt",
    ),
    (
        "two-walk 64x512 w16",
        dict(_strategy="two-walk", BLOCK_M=64, BLOCK_K=512, num_warps=16),
        "q+qt",
    ),
]


def _check_and_time(knob, run, timed, want, keep) -> tuple[bool, float]:
    """(``run()``'s outputs equal ``want``'s byte for byte where ``keep``, median ms of
    ``timed``), or (False, NaN) for a configuration this Triton rejects (said, not raised)."""
    try:
        got = run()
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b, k in zip(got, want, keep, strict=True) if k)  # fmt: skip
        return same, _gpu_ms(timed)
    except Exception as e:
        print(f"{knob}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return False, float("nan")


def sweep() -> list[dict]:
    rows = []
    cfg0 = {es: dict(c) for es, c in kq.ROWBLOCK_CONFIG.items()}
    strategy0, elements0 = kq.ROW_STRATEGY, kq.RESIDENT_ELEMENTS
    try:
        for name, m, k, dtype in SHAPES:
            # three inputs in turn, so no call finds its input in L2
            x = _rotating(
                lambda m=m, k=k, dtype=dtype: torch.randn(m, k, device=DEVICE).to(dtype), 3
            )
            x0 = x()
            es = x0.element_size()
            copy = _copy_gbps(m * k * es)  # GB/s of a device copy, bytes read + written
            want = kq.quantize_rows(x0, "e2m1", store_qt=True)
            for knob, over, stores in KNOBS:
                over = dict(over)
                kq.ROW_STRATEGY = over.pop("_strategy", strategy0)
                kq.RESIDENT_ELEMENTS = over.pop("_elements", elements0)
                kq.ROWBLOCK_CONFIG[es] = dict(cfg0[es], **over)
                sq, sqt = stores in ("q+qt", "q"), stores in ("q+qt", "qt")
                nbytes = m * k * (es + sq + sqt)
                same, ms = _check_and_time(
                    knob, lambda x0=x0, sq=sq, sqt=sqt: kq.quantize_rows(x0, "e2m1", store_q=sq,
                                                                         store_qt=sqt),
                    lambda x=x, sq=sq, sqt=sqt: kq.quantize_rows(x(), "e2m1", store_q=sq,
                                                                 store_qt=sqt),
                    want, (sq, True, sqt, False),
                )  # fmt: skip
                rows.append(dict(
                    operand=f"{name} {m}x{k}", knob=knob, ms=ms,
                    pct_copy=100 * nbytes / ms / 1e6 / copy, same_bits=same,
                ))  # fmt: skip
    finally:
        kq.ROWBLOCK_CONFIG.update(cfg0)
        kq.ROW_STRATEGY, kq.RESIDENT_ELEMENTS = strategy0, elements0
    return rows


if __name__ == "__main__":
    print(format_table(sweep()))
