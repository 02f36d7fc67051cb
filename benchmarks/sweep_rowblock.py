"""Sweep of the one-launch row quantization (``_quantize_rowblock_kernel``, X and W) over
wide rows, where the row blocks in flight may not fit in L2.

The kernel walks each row block twice, the second time hoping to read from L2. Its program
count is at least the SM count, so a block of BLOCK_M rows x K elements times 132 SMs can
exceed the 50 MB L2 of an H100: W fp32 at K = 4096 (32 x 4096 x 4 B x 132 = 66 MB) and X bf16
at K = 11008 (93 MB). ``bench quant`` measured W fp32 [4096, 4096] at 30% of copy against 49%
for X bf16 [8192, 4096]. This sweep times smaller BLOCK_M (blocks that fit with one program per
SM) and fewer programs than SMs, per shape, as a share of copy bandwidth (bytes read + written
once). Usage: python benchmarks/sweep_rowblock.py
"""

import torch

from fp4train.bench import _copy_gbps, _median_ms, _rotating, format_table
from fp4train.kernels import quantize as kq

DEVICE = "cuda"
SHAPES = [  # name, rows, K, dtype
    ("X bf16", 8192, 2048, torch.bfloat16),
    ("X bf16", 8192, 4096, torch.bfloat16),
    ("X bf16", 8192, 11008, torch.bfloat16),
    ("W fp32", 6144, 2048, torch.float32),
    ("W fp32", 4096, 4096, torch.float32),
    ("W fp32", 11008, 4096, torch.float32),
    ("W fp32", 4096, 11008, torch.float32),
]


def _programs_fit_only(n_blocks: int, block_bytes: int, device: torch.device) -> int:
    """As many programs as keep the blocks in flight within L2_BYTES, even below the SM count."""
    fit = kq.ROWBLOCK_CONFIG["L2_BYTES"] // max(block_bytes, 1)
    return max(1, min(n_blocks, fit))


def sweep() -> list[dict]:
    rows = []
    cfg0, programs0 = dict(kq.ROWBLOCK_CONFIG), kq._rowblock_programs
    try:
        for name, m, k, dtype in SHAPES:
            # three inputs in turn, so no call finds its input in L2
            x = _rotating(
                lambda m=m, k=k, dtype=dtype: torch.randn(m, k, device=DEVICE).to(dtype), 3
            )
            x0 = x()
            es = x0.element_size()
            nbytes = m * k * (es + 2)  # read once, q and q_t written once
            copy = _copy_gbps(m * k * es)  # GB/s of a device copy, bytes read + written
            want = kq.quantize_rows(x0, "e2m1", store_qt=True)
            for block_m in (32, 16, 8):
                for policy in ("max(SM, fit)", "fit only"):
                    kq.ROWBLOCK_CONFIG.update(BLOCK_M=block_m)
                    kq._rowblock_programs = (
                        programs0 if policy != "fit only" else _programs_fit_only
                    )
                    got = kq.quantize_rows(x0, "e2m1", store_qt=True)
                    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                               if a.dtype != torch.float32 else torch.equal(a, b)
                               for a, b in zip(got[:3], want[:3], strict=True))  # fmt: skip
                    ms = _median_ms(lambda x=x: kq.quantize_rows(x(), "e2m1", store_qt=True))
                    in_flight = block_m * k * es * kq._sm_count(x0.device)
                    rows.append(dict(
                        operand=f"{name} {m}x{k}", block_m=block_m, programs=policy,
                        mib_in_flight_at_one_per_sm=in_flight / 2**20, ms=ms,
                        pct_copy=100 * nbytes / ms / 1e6 / copy, same_bits=same,
                    ))  # fmt: skip
    finally:
        kq.ROWBLOCK_CONFIG.clear()
        kq.ROWBLOCK_CONFIG.update(cfg0)
        kq._rowblock_programs = programs0
    return rows


if __name__ == "__main__":
    print(format_table(sweep()))
