"""The heap tuning for CPU inference and training: freed memory is reused without page faults."""

import subprocess
import sys

import pytest

# a forward pass's worth of activations (48 blocks of 4 MiB) allocated and freed: after a first
# pass, the page faults of the next two, in a fresh interpreter (the tuning is process-wide)
_PASSES = """
import resource, torch
from biopsy.heap import keep_freed_memory
if {tuned} and not keep_freed_memory():
    raise SystemExit("not glibc")
def one_pass():
    held = [torch.ones(2**20) for _ in range(48)]
    del held
one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_pass()
one_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES = 2 * 48 * 4 * 2**20 // 4096  # in two passes


def _faults(tuned: bool) -> int:
    run = subprocess.run([sys.executable, "-c", _PASSES.format(tuned=tuned)], capture_output=True,
                         text=True)
    if run.returncode and "not glibc" in run.stderr:
        pytest.skip("not glibc")
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts: Linux")
def test_freed_memory_is_reused_without_page_faults():
    tuned, untuned = _faults(True), _faults(False)
    # tuned: at most ~10,000 of the 98,304 pages, then none; glibc's defaults hand the memory
    # back after each of these passes and fault in nearly every page again (a control: the
    # count sees the faults)
    assert tuned < 0.25 * _PAGES, (tuned, untuned)
    assert untuned > 0.75 * _PAGES, (tuned, untuned)
