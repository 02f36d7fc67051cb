"""Where dY's quantization spends its time: each of its launches (amax partials, scales, the
tile pass) timed alone by the CUDA profiler, for a grid of amax-pass and tile-pass configs at
the shapes of 1.3B and 7B layers, with the whole call's GPU time (CUDA-graph replay) as a
share of copy bandwidth (bytes read + written once, as ``bench quant``) and a bit-for-bit
check against the default config's output.

Usage: python benchmarks/sweep_dy.py
"""

import torch

from fp4train.bench import _copy_gbps, _gpu_ms, _rotating, format_table
from fp4train.kernels import quantize as kq

DEVICE = "cuda"
SHAPES = [(8192, 4096), (8192, 11008), (8192, 2048)]
AMAX = [  # BLOCK_M, BLOCK_K, SUB_M, SUB_K, warps: the default first (session 12 swept
    (128, 128, 32, 128, 4),  # (64|128|256) x (64|128|256) blocks, 16-64-row pieces, 4/8 warps)
    (64, 256, 32, 256, 4),
]
TILE = [  # BLOCK_M, BLOCK_K, warps
    (32, 128, 4),
    (64, 64, 4),
]


def kernel_ms(fn, iters: int = 20) -> dict[str, float]:
    """Mean GPU time per call of each kernel ``fn`` launches (CUDA profiler), by kernel name."""
    fn()
    torch.cuda.synchronize()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            out[e.key] = t / iters / 1e3
    return out


def _short(name: str) -> str:
    for key in ("amax", "scales", "tile", "transpose"):
        if key in name:
            return key + "_ms"
    return name[:24]


def sweep() -> list[dict]:
    rows = []
    amax0, tile0 = dict(kq.AMAX_CONFIG), dict(kq.TILE_CONFIG)
    try:
        for m, n in SHAPES:
            dy = _rotating(lambda m=m, n=n: torch.randn(m, n, device=DEVICE).bfloat16(), 3)
            s_w = torch.rand(n, device=DEVICE) + 0.5
            s_x = torch.rand(m, device=DEVICE) + 0.5
            copy = _copy_gbps(m * n * 2)
            dy0 = dy()
            want = kq.quantize_rowwise_and_colwise(dy0, "e5m2", "e5m2", s_w, s_x)

            def one(dy=dy, s_w=s_w, s_x=s_x):
                return kq.quantize_rowwise_and_colwise(dy(), "e5m2", "e5m2", s_w, s_x)

            configs = [(a, tile0) for a in AMAX] + [(AMAX[0], t) for t in TILE[1:]]
            for a, t in configs:
                kq.TILE_CONFIG.clear()
                if isinstance(t, tuple):
                    kq.TILE_CONFIG.update(BLOCK_M=t[0], BLOCK_K=t[1], num_warps=t[2])
                else:
                    kq.TILE_CONFIG.update(tile0)
                kq.AMAX_CONFIG.clear()
                kq.AMAX_CONFIG.update(BLOCK_M=a[0], BLOCK_K=a[1], SUB_M=a[2], SUB_K=a[3],
                                      num_warps=a[4])  # fmt: skip
                amax = "{}x{}/{}x{} w{}".format(*a)
                tc = kq.TILE_CONFIG
                row = dict(shape=f"{m}x{n}", amax=amax,
                           tile=f"{tc['BLOCK_M']}x{tc['BLOCK_K']} w{tc['num_warps']}")  # fmt: skip
                try:
                    got = kq.quantize_rowwise_and_colwise(dy0, "e5m2", "e5m2", s_w, s_x)
                    row["same_bits"] = all(
                        torch.equal(g.view(torch.uint8), w.view(torch.uint8))
                        for g, w in zip(got, want, strict=True)
                    )
                    ms = _gpu_ms(one)
                    row["ms"] = ms
                    row["pct_copy"] = 100 * m * n * 4 / ms / 1e6 / copy
                    for k, v in kernel_ms(one).items():
                        row[_short(k)] = v
                except Exception as e:  # a config this Triton rejects: said, not raised
                    print(f"{row}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append(row)
            # the floor pieces: a read-only pass and an FP8 transpose of the same size
            q = torch.empty(m, n, dtype=torch.uint8, device=DEVICE)
            qt = torch.empty(n, m, dtype=torch.uint8, device=DEVICE)
            ms_t = _gpu_ms(lambda q=q, qt=qt: kq.transpose_bytes(q, qt))
            ms_r = _gpu_ms(lambda dy=dy: dy().max())
            rows.append(dict(shape=f"{m}x{n}", amax="(torch max of dY: a read)", tile="", ms=ms_r,
                             pct_copy=100 * m * n * 2 / ms_r / 1e6 / copy))  # fmt: skip
            rows.append(dict(shape=f"{m}x{n}", amax="", tile="(FP8 transpose alone)", ms=ms_t,
                             pct_copy=100 * m * n * 2 / ms_t / 1e6 / copy))  # fmt: skip
    finally:
        kq.AMAX_CONFIG.clear()
        kq.AMAX_CONFIG.update(amax0)
        kq.TILE_CONFIG.clear()
        kq.TILE_CONFIG.update(tile0)
    return rows


if __name__ == "__main__":
    rows = sweep()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(format_table([{k: r.get(k, "") for k in keys} for r in rows]))
