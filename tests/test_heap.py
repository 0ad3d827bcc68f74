"""The heap tuning for CPU inference and training: freed memory is reused without page faults."""

import subprocess
import sys

import pytest

from biopsy.heap import keep_freed_memory

# a forward pass's worth of activations, allocated and freed three times; prints the page faults
# of one pass after the first (a fresh interpreter: the tuning is process-wide)
_PASSES = """
import resource, torch
from biopsy.heap import keep_freed_memory
tuned = {tuned}
if tuned:
    keep_freed_memory()
def one_pass():
    held = [torch.ones(2**20) for _ in range(48)]  # 48 blocks of 4 MiB
    del held
one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one_pass()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""
_PAGES_A_PASS = 48 * 4 * 2**20 // 4096


def _faults_a_pass(tuned: bool) -> float:
    code = _PASSES.format(tuned=tuned)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts: Linux")
def test_freed_memory_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    untuned, tuned = _faults_a_pass(False), _faults_a_pass(True)
    # glibc's defaults hand the memory back and fault in nearly every page again (~48,800 of
    # 49,152 here); tuned, the heap keeps it
    assert tuned < 0.1 * _PAGES_A_PASS, (tuned, untuned)
    assert untuned > 5 * tuned
