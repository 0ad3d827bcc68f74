"""biopsy batch under torchrun: ranks share the manifest, rank 0 writes the cohort (the SIGTERM
of a rank waiting at the barrier: test_batch_sigterm.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from biopsy.batch import run_batch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import (CountingScorer, assert_same_outputs, marker_counts,  # noqa: E402
                              status_rows, write_cohort_manifest)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort_manifest(tmp_path_factory.mktemp("cohort"), patients=3)


TORCHRUN_RUN = """
import sys
sys.path.insert(0, {tests!r})
from synthetic_scored import CountingScorer
from biopsy.batch import distributed_context, run_batch
sys.exit(1 if run_batch({manifest!r}, {out!r}, CountingScorer({markers!r}),
                        distributed_context(), progress=False) else 0)
"""


@pytest.mark.slow
def test_torchrun_shards_the_manifest_and_rank_0_writes_the_cohort(cohort, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_RUN.format(tests=str(REPO / "tests"), manifest=str(cohort),
                                          out=str(out), markers=str(markers)))
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(script)],
                            cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    completed = marker_counts(markers, "completed")
    assert len(completed) == 6 and set(completed.values()) == {1}
    ranks = {p.name.rsplit(".", 1)[1] for p in markers.glob("completed.*")}
    assert ranks == {"rank0", "rank1"}
    assert [r["status"] for r in status_rows(out)] == ["done"] * 6
    reference = tmp_path / "reference"
    assert run_batch(cohort, reference, CountingScorer(tmp_path / "m2"), progress=False) == 0
    assert_same_outputs(out, reference)


SLOW_COHORT = """
import time
import biopsy.batch as batch
write = batch.write_cohort_outputs
batch.write_cohort_outputs = lambda *args: (time.sleep(3), write(*args))[1]
"""


@pytest.mark.slow
def test_a_slide_failing_on_another_rank_than_0_still_gets_the_cohort_written(tmp_path):
    """Rank 1 returned its failures and exited 1 at once: torchrun then ended rank 0 while it
    wrote the cohort, on every rerun too."""
    manifest = write_cohort_manifest(tmp_path / "in", patients=2, broken_row=True)  # row 7: rank 1
    out, script = tmp_path / "out", tmp_path / "run.py"
    script.write_text(SLOW_COHORT + TORCHRUN_RUN.format(
        tests=str(REPO / "tests"), manifest=str(manifest), out=str(out), markers=str(tmp_path / "m")))
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(script)],
                            cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1 and "SIGTERM" not in result.stderr, result.stderr[-3000:]
    assert [r["status"] for r in status_rows(out)] == ["done"] * 5 + ["failed"]
    cohort = json.loads((out / "cohort.json").read_text())
    assert [c["status"] for c in cohort["comparisons"]] == [
        "compared", "compared", "not compared: row(s) 7 not scored"]
    assert (out / "cohort.html").exists() and (out / "cohort.csv").exists()
