"""Launch a Triton kernel through its compiled handle, skipping the JIT's per-call work.

``kernel[grid](*args, **kwargs)`` binds the arguments, computes their specialization, builds a
cache key, checks the kernel's globals and collects launch metadata on every call: 29–36 µs of
host time on the H100 machine, against 7–9 µs for the compiled kernel's own launcher and 21 µs
through :func:`launch` (its key costs the difference; benchmarks/host_overhead.py). A layer's
fwd+bwd makes about ten launches, and at 8192x4096x4096 its GPU work (≈ 1.0 ms) is shorter
than the host time to issue it (≈ 1.6 ms, most of it outside the launches: NOTES.md, session 11).

:func:`launch` keys each launch by what Triton specializes a compiled kernel on — each tensor's
dtype and 16-byte alignment, each int's equality to 1, divisibility by 16 and width, the
constexpr and option values — plus the current device. The first launch of a key goes through
the JIT (which compiles, or finds the compiled kernel in its cache) and returns the compiled
kernel; later launches of the key call its launcher directly with the same arguments. The key
distinguishes at least everything Triton's does, so a direct launch runs the kernel the JIT
would have chosen. The JIT path is taken under the interpreter, for non-CUDA tensors, when a
launch hook is installed (profilers such as proton need its metadata) and when
``FP4TRAIN_FAST_LAUNCH=0``.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

__all__ = ["launch", "launch_key", "cdiv", "next_pow2", "FAST_LAUNCH"]

# read once; tests and benchmarks flip the module attribute to compare the two paths
FAST_LAUNCH = os.environ.get("FP4TRAIN_FAST_LAUNCH", "1") != "0"

_CACHE: dict[tuple, tuple] = {}
_I32 = (-(2**31), 2**31)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: ceil(a / b). (Triton's is a constexpr function, 2-4 µs a
    call from Python; a layer's launches compute a dozen grids.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code: the smallest power of two >= n (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _arg_key(a) -> object:
    """What Triton's specialization sees of one runtime argument (or more)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):
        return a == 1, a % 16 == 0, _I32[0] <= a < _I32[1], a >= 2**63
    return type(a), a if a is None else None


def launch_key(kernel, args: tuple, kwargs: dict, device: int) -> tuple:
    """The cache key of ``kernel[grid](*args, **kwargs)`` on CUDA device ``device``."""
    return kernel, device, tuple(map(_arg_key, args)), tuple(kwargs.items())


def constexpr_tail(kernel, n_args: int, kwargs: dict) -> tuple:
    """The values of ``kernel``'s parameters after its first ``n_args``, which must all be
    constexprs given in ``kwargs`` or defaulted; TypeError names a runtime parameter passed
    by keyword (its value would key the cache) or a missing one."""
    fn = getattr(kernel, "fn", kernel)  # the Python function (JIT and interpreter alike)
    tail = []
    for p in list(inspect.signature(fn).parameters.values())[n_args:]:
        if "constexpr" not in str(p.annotation):
            raise TypeError(
                f"{fn.__name__}: pass the runtime argument {p.name!r} positionally to launch()"
            )
        if p.name in kwargs:
            tail.append(kwargs[p.name])
        elif p.default is not p.empty:
            tail.append(p.default)
        else:
            raise TypeError(f"{fn.__name__}: constexpr {p.name!r} is missing")
    return tuple(tail)


def _hooked() -> bool:
    """A launch hook is installed (a profiler): the JIT path gives it its metadata."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return True  # an older Triton: take its JIT path
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with the kernel's runtime arguments (tensors, ints,
    floats) positional, in order, and its constexprs and launch options (``num_warps``, ...)
    as keywords. The same launch as the JIT's, less host time."""
    first = args[0] if args else None
    if not (FAST_LAUNCH and isinstance(first, torch.Tensor) and first.is_cuda) or _hooked():
        if not (isinstance(first, torch.Tensor) and first.is_cuda):
            constexpr_tail(kernel, len(args), kwargs)  # the interpreter checks the call too
        kernel[grid](*args, **kwargs)
        return
    dev = torch.cuda.current_device()  # as Triton's JIT: the current device's stream
    key = launch_key(kernel, args, kwargs, dev)
    entry = _CACHE.get(key)
    if entry is None:
        tail = constexpr_tail(kernel, len(args), kwargs)
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
            _CACHE[key] = (compiled, tail)
        return
    compiled, tail = entry
    stream = torch._C._cuda_getCurrentRawStream(dev)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                 None, None, *args, *tail)  # fmt: skip
