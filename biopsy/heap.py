"""The C heap tuned for running a network on the CPU (glibc only).

A U-Net's forward pass allocates and frees tens of megabytes per layer. With glibc's defaults
the heap is trimmed as soon as the pass frees it, and the next pass pays a page fault for every
4 KiB it takes back from the kernel. On a 2-core CPU the bundled model at batch 8 spends ~27 %
of its float32 inference time there (29 -> 21 ms a tile) and ~20 % of a float32 training step
(93 -> 73 ms an image; bfloat16 steps gain nothing). :func:`keep_freed_memory` sets glibc's
thresholds once, so that freed memory stays in the heap for the next pass. The setting is
process-wide (every thread's heap arena; forked DataLoader workers inherit it): each arena may
keep up to ``_TOP_PAD_BYTES`` of freed memory resident (inference with that model: ~130 MB more
at its peak). Elsewhere (macOS, musl, Windows) it does nothing.
"""

import ctypes
import functools

_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest default; bigger blocks are mapped on their own
_TOP_PAD_BYTES = 256 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed memory in the process's heap for reuse; whether the C library took it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (Windows: no CDLL(None))
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TOP_PAD, _TOP_PAD_BYTES))
