"""The C heap tuned for running a network on the CPU (glibc only).

A U-Net's forward pass allocates and frees tens of megabytes per layer. With glibc's defaults
the heap is trimmed as soon as the pass frees it, and the next pass pays a page fault for every
4 KiB it takes back from the kernel, and blocks over 32 MiB are mapped afresh every time. On a
2-core CPU the bundled model at batch 8 spends ~20-27 % of its float32 inference time there
(29 -> 21-24 ms a tile, from run to run) and ~20 % of a float32 training step (93-105 -> 73-83
ms an image; bfloat16 steps gain nothing). :func:`keep_freed_memory` sets glibc's thresholds
once, so that blocks up to 256 MiB come from the heap and freed memory stays there for the next
pass (then a pass faults in no page at all). The setting is process-wide (every thread's heap
arena; forked DataLoader workers inherit it): each arena may keep up to ``_TOP_PAD_BYTES`` of
freed memory resident (inference with that model: 30-170 MB more at its peak). Elsewhere
(macOS, musl, Windows) it does nothing.
"""

import ctypes
import functools

_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 256 * 2**20  # blocks up to this size come from the heap
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
