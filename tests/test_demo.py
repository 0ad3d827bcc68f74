"""``biopsy demo`` end to end on a small synthetic patient, with a tiny random-init checkpoint."""

import json
import sys
from pathlib import Path

import pytest

from biopsy.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import tiny_checkpoint  # noqa: E402

SMALL = ["--core-length-mm", "1.5", "--glomeruli", "6", "--device", "cpu", "--workers", "0"]


@pytest.mark.slow
def test_demo_writes_the_report_prints_the_headline_and_reruns_from_its_outputs(tmp_path,
                                                                                 capsys):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors", input_mpp=2.0)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--model", str(checkpoint), "--seed", "3", *SMALL]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    comparison = json.loads((out / "comparison.json").read_text())
    assert (out / "report.html").stat().st_size > 0 and (out / "comparison.csv").is_file()
    assert comparison["patient_id"] == "demo-3"
    for folder, seed in (("baseline", 3), ("follow_up", 4)):
        assert (out / "slides" / folder / "truth.json").is_file()
        assert f"seed: {seed}" in (out / "slides" / folder / "profile.yaml").read_text()
    summaries = [json.loads((out / name / "summary.json").read_text())
                 for name in ("baseline", "follow_up")]
    metrics = {m["name"]: m for m in comparison["metrics"]}
    assert f"report: {out / 'report.html'}" in printed
    counts = [s["scores"]["glomeruli"]["count"] for s in summaries]
    assert f"Glomeruli: {counts[0]} -> {counts[1]}" in printed
    for name in ("activity_index", "chronicity_index", "deposit_burden"):
        assert metrics[name]["label"] in printed
    assert "synthesising" in printed and printed.count("scoring") == 2

    # A rerun reuses every output; a different model rescores both slides, not the synthesis.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(argv) == 0
    rerun = capsys.readouterr().out
    assert "synthesising" not in rerun and "scoring" not in rerun and "comparing" not in rerun
    assert written == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert rerun.splitlines()[1:] == printed.splitlines()[-len(rerun.splitlines()) + 1:]
    other = tiny_checkpoint(tmp_path / "other.safetensors", input_mpp=4.0)
    argv[argv.index(str(checkpoint))] = str(other)
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "synthesising" not in again and again.count("scoring") == 2 and "comparing" in again
