"""Keep freed CPU memory in the process instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and unmaps it on ``free``. A training step, or a batch of feature extraction, allocates and frees
the same large tensors every time (the iBOT logits alone are ``n_masked x 65,536`` fp32, ~160 MB),
so each one is faulted in again page by page, often costing more than the arithmetic on it.
``retain_freed_memory`` switches the allocator to the heap for all sizes and never trims it, so
once the heap has settled (a few steps) the memory is reused; the price is that the process keeps
its peak heap. A speed trick (``scripts/bench_tricks.py``, README "Speed tricks"); glibc's
documented ``mallopt``, through ctypes.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Apply once per process (glibc only; a no-op returning False elsewhere)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied
