"""Counting the CUDA operations that make the host wait for the device (GPU tests)."""

import warnings

import torch


def cuda_syncs(function, *args, **kwargs) -> int:
    """How many synchronising CUDA operations ``function(*args, **kwargs)`` calls (PyTorch's
    sync debug mode: blocking copies, ``.item()``, ``nonzero`` ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(warning.message) for warning in caught)
