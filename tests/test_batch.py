import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from biopsy import batch, pipeline, provenance
from biopsy.batch import DistributedContext, run_batch
from biopsy.cli import batch as batch_cli
from biopsy.errors import ManifestError, SlideError
from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.labelmap import colourise, read_label_map, write_label_map
from biopsy.manifest import read_manifest
from biopsy.model import ModelInfo
from biopsy.pyramid import write_pyramid
from biopsy.scoring import load_score_config

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import (MPP, CountingScorer, assert_same_outputs,  # noqa: E402
                              marker_counts, paint_label_map, status_rows, write_cohort_manifest,
                              write_label_map_file)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort_manifest(tmp_path_factory.mktemp("cohort"), patients=3)


def batch_command(argv: list[str]) -> int:
    """``biopsy batch ARGV`` through its own parser (the CLI maps a BiopsyError to exit 2)."""
    parser = argparse.ArgumentParser()
    batch_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["batch", *argv])
    return args.func(args)


def test_failing_slide_is_recorded_and_the_others_finish(tmp_path):
    manifest = write_cohort_manifest(tmp_path / "in", patients=2, broken_row=True)
    out = tmp_path / "out"
    assert batch_command([str(manifest), "--from-labels", "--out", str(out), "--no-progress"]) == 1
    rows = {r["patient_id"] + r["timepoint"]: r for r in status_rows(out)}
    assert rows["PXpost"]["status"] == "failed" and "AnnotationError" in rows["PXpost"]["error"]
    assert rows["PXpost"]["row"] == "7"
    assert all(r["status"] == "done" for k, r in rows.items() if k != "PXpost")
    assert not (out / "slides" / "PX_post_px-post").exists()
    cohort = json.loads((out / "cohort.json").read_text())
    statuses = {c["patient_id"]: c["status"] for c in cohort["comparisons"]}
    assert statuses == {"P1": "compared", "P2": "compared", "PX": "not compared: row(s) 7 not scored"}
    # each pair was scored alike; a difference would be named here, as in its comparison.json
    assert [c.get("processing_differences") for c in cohort["comparisons"]] == [[], [], None]
    (group,) = cohort["groups"]
    assert group["patients"] == 2
    deposits = next(m for m in group["metrics"] if m["name"] == "hyaline_deposits")
    assert deposits["n"] == 2 and deposits["median_change"] < 0


@pytest.mark.parametrize("stop", ["cohort.csv", "comparing"])
def test_a_rerun_stopped_while_writing_the_cohort_leaves_no_cohort_json_of_the_run_before(
        cohort, tmp_path, monkeypatch, stop):
    """cohort.json is written last; the earlier run's stayed beside the new cohort.html, or
    beside the new status.csv and comparisons."""
    out = tmp_path / "out"
    assert batch_command([str(cohort), "--from-labels", "--out", str(out), "--no-progress"]) == 0
    write, compare_pairing = batch.write_text_atomic, batch._compare_pairing

    def stopped_at_the_csv(path, text):
        if path.name == stop:
            raise KeyboardInterrupt
        write(path, text)

    def stopped_comparing(*args):
        if stop == "comparing":
            raise KeyboardInterrupt
        return compare_pairing(*args)

    monkeypatch.setattr(batch, "write_text_atomic", stopped_at_the_csv)
    monkeypatch.setattr(batch, "_compare_pairing", stopped_comparing)
    with pytest.raises(KeyboardInterrupt):
        batch_command([str(cohort), "--from-labels", "--out", str(out), "--no-progress"])
    assert (out / "status.csv").exists() and not (out / "cohort.json").exists()


def test_a_rerun_skips_label_maps_that_record_their_slides_pixel_size(tmp_path, caplog):
    """Each was scored again: the folder's recipe took the recorded pixel size, the rerun's
    check the manifest's (none)."""
    manifest = write_cohort_manifest(tmp_path / "in", patients=1)
    for path in (tmp_path / "in").glob("*.ome.tif"):
        label_map = read_label_map(path)
        write_label_map(path, label_map.labels, label_map.mpp, label_map.class_names,
                        label_map.class_colours, slide_mpp=label_map.mpp / 2)
    out = tmp_path / "out"
    assert batch_command([str(manifest), "--from-labels", "--out", str(out), "--no-progress"]) == 0
    summaries = {p: p.read_bytes() for p in out.glob("slides/*/summary.json")}
    with caplog.at_level("WARNING"):
        assert batch_command([str(manifest), "--from-labels", "--out", str(out),
                              "--no-progress"]) == 0
    assert "scoring it again" not in caplog.text
    assert {p: p.read_bytes() for p in out.glob("slides/*/summary.json")} == summaries


def test_malformed_manifest_is_refused_before_scoring(tmp_path):
    manifest = write_cohort_manifest(tmp_path / "in", patients=1)
    manifest.write_text(manifest.read_text() + "P9,later,p1-pre.ome.tif\n")
    with pytest.raises(ManifestError, match="row 4: unknown timepoint 'later'"):
        batch_command([str(manifest), "--from-labels", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_rerun_skips_complete_folders_and_rescores_incomplete_ones(cohort, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    assert marker_counts(markers, "completed") == {f"P{n}_{t}_p{n}-{t}": 1
                                                   for n in (1, 2, 3) for t in ("pre", "post")}
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    # A folder without summary.json (e.g. copied in half) is not complete: it is scored again.
    (out / "slides" / "P2_post_p2-post" / "summary.json").unlink()
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    counts = marker_counts(markers, "completed")
    assert counts.pop("P2_post_p2-post") == 2 and set(counts.values()) == {1}
    assert_same_outputs(out, reference)


class FailingScorer(CountingScorer):
    """Fails on the slide of one folder name, as on an unreadable slide."""

    def __init__(self, marker_dir: Path, failing_folder: str):
        super().__init__(marker_dir)
        self.failing_folder = failing_folder

    def __call__(self, entry, out_dir: Path) -> None:
        if entry.folder_name == self.failing_folder:
            raise SlideError(f"{entry.slide}: unreadable")
        super().__call__(entry, out_dir)


def test_rerun_with_another_recipe_scores_again_and_never_mixes_recipes(cohort, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    assert set(marker_counts(markers, "completed").values()) == {1}  # same recipe: reused
    other = replace(load_score_config(), name="other thresholds")
    assert run_batch(cohort, out, CountingScorer(markers, config=other), progress=False) == 0
    assert set(marker_counts(markers, "completed").values()) == {2}  # another config: scored again
    summaries = [json.loads(p.read_text()) for p in (out / "slides").glob("*/summary.json")]
    assert len(summaries) == 6
    assert {s["provenance"]["config"]["name"] for s in summaries} == {"other thresholds"}

    # Back to the first recipe, but one slide fails (as every slide would with a wrong option):
    # its folder of the other recipe is kept, not deleted before its new one is whole, and its
    # patient is not compared rather than compared across recipes.
    assert run_batch(cohort, out, FailingScorer(markers, "P2_post_p2-post"), progress=False) == 1
    kept = json.loads((out / "slides" / "P2_post_p2-post" / "summary.json").read_text())
    assert kept["provenance"]["config"]["name"] == "other thresholds"
    assert not [p for p in (out / "slides").iterdir() if p.name.startswith(".")]
    cohort_json = json.loads((out / "cohort.json").read_text())
    statuses = {c["patient_id"]: c["status"] for c in cohort_json["comparisons"]}
    assert statuses == {"P1": "compared", "P2": "not compared: row(s) 5 not scored", "P3": "compared"}
    assert sorted(p.name for p in (out / "comparisons").iterdir()) == [
        "P1_pre_p1-pre_vs_post", "P3_pre_p3-pre_vs_post"]


def test_rerun_scores_again_a_slide_file_that_changed(tmp_path, monkeypatch, caplog):
    manifest = write_cohort_manifest(tmp_path / "cohort", patients=2)
    out, markers = tmp_path / "out", tmp_path / "markers"
    assert run_batch(manifest, out, CountingScorer(markers), progress=False) == 0
    # Unchanged files are known by path, size and time, without reading them again.
    monkeypatch.setattr(provenance, "file_sha256", None)
    assert run_batch(manifest, out, CountingScorer(markers), progress=False) == 0
    assert set(marker_counts(markers, "completed").values()) == {1}
    monkeypatch.undo()
    # The same bytes with a new time (a copy, a restore) are recognised by their hash.
    os.utime(manifest.parent / "p1-pre.ome.tif", ns=(0, 0))
    # A slide scanned again under the same name is scored again, from its new bytes.
    rescanned = manifest.parent / "p2-post.ome.tif"
    shutil.copyfile(manifest.parent / "p1-pre.ome.tif", rescanned)
    with caplog.at_level("WARNING"):
        assert run_batch(manifest, out, CountingScorer(markers), progress=False) == 0
    counts = marker_counts(markers, "completed")
    assert counts.pop("P2_post_p2-post") == 2 and set(counts.values()) == {1}
    assert f"scored from another version of {rescanned}" in caplog.text
    summary = json.loads((out / "slides" / "P2_post_p2-post" / "summary.json").read_text())
    assert summary["provenance"]["source"]["sha256"] == provenance.file_sha256(rescanned)
    assert summary["scores"] == json.loads(
        (out / "slides" / "P1_pre_p1-pre" / "summary.json").read_text())["scores"]


def test_a_pair_no_longer_compared_leaves_no_comparison_behind(tmp_path):
    """The follow-up file broken after a first run: its folder goes, and so must the pair's
    comparison (its report stayed beside a cohort.json that said "not compared")."""
    manifest = write_cohort_manifest(tmp_path / "cohort", patients=2)
    out = tmp_path / "out"
    arguments = [str(manifest), "--from-labels", "--out", str(out), "--no-progress"]
    assert batch_command(arguments) == 0
    compared = out / "comparisons" / "P2_pre_p2-pre_vs_post"
    assert (compared / "comparison.json").is_file()
    (manifest.parent / "p2-post.ome.tif").write_bytes(b"not a tiff")
    assert batch_command(arguments) == 1
    statuses = {c["patient_id"]: c for c in json.loads((out / "cohort.json").read_text())["comparisons"]}
    assert statuses["P2"]["status"].startswith("not compared") and statuses["P2"]["folder"] is None
    assert not compared.exists()
    assert (out / "comparisons" / "P1_pre_p1-pre_vs_post" / "comparison.json").is_file()


def test_every_patient_is_listed_and_pairs_the_manifest_drops_leave_no_comparison(tmp_path, capsys):
    """Patients without a follow-up vanished from cohort.json, and an earlier run's comparisons
    of patients taken out of the manifest stayed in comparisons/."""
    manifest = write_cohort_manifest(tmp_path / "cohort", patients=3)
    out = tmp_path / "out"
    assert run_batch(manifest, out, CountingScorer(tmp_path / "markers"), progress=False) == 0
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line for line in lines if not line.startswith(("P3,", "P2,post")))
                        + "\n")
    assert batch_command([str(manifest), "--from-labels", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(
        f"{out}: 1 of 1 comparisons, 0 slide(s) failed (status.csv), 1 slide(s) with no other "
        "timepoint; cohort.html")
    cohort_json = json.loads((out / "cohort.json").read_text())
    assert [(c["patient_id"], c["follow_up"], c["status"]) for c in cohort_json["comparisons"]] == [
        ("P1", "post", "compared"),
        ("P2", None, "not compared: no other timepoint of this patient and stain")]
    assert [p.name for p in (out / "comparisons").iterdir()] == ["P1_pre_p1-pre_vs_post"]
    assert "not compared: no other timepoint" in (out / "cohort.html").read_text()


def test_a_run_killed_between_replacing_renames_keeps_the_old_folder(cohort, tmp_path):
    """Killed after the old folder was moved aside, before the new one took its name: the next
    run put nothing back, and removed both."""
    out, markers = tmp_path / "out", tmp_path / "markers"
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    slides = out / "slides"
    old = (slides / "P2_post_p2-post" / "summary.json").read_bytes()
    os.rename(slides / "P2_post_p2-post", slides / ".replaced-P2_post_p2-post")
    shutil.copytree(slides / ".replaced-P2_post_p2-post", slides / ".partial-P2_post_p2-post")
    assert run_batch(cohort, out, FailingScorer(markers, "P2_post_p2-post"), progress=False) == 0
    assert (slides / "P2_post_p2-post" / "summary.json").read_bytes() == old  # put back, kept
    assert not [p.name for p in slides.iterdir() if p.name.startswith(".")]
    # killed so, then the row renamed in the manifest before the rerun: left for nobody
    os.rename(slides / "P3_post_p3-post", slides / ".replaced-P3_post_p3-post")
    shutil.copytree(slides / ".replaced-P3_post_p3-post", slides / ".partial-P3_post_p3-post")
    without = cohort.parent / "without-p3-post.csv"  # beside the label maps it names
    without.write_text("".join(line for line in cohort.read_text().splitlines(keepends=True)
                               if not line.startswith("P3,post")))
    assert run_batch(without, out, CountingScorer(markers), progress=False) == 0
    assert (slides / "P3_post_p3-post" / "summary.json").is_file()  # put back
    assert not [p.name for p in slides.iterdir() if p.name.startswith(".")]
    # killed after the new folder took its name: the old one is removed
    shutil.copytree(slides / "P1_pre_p1-pre", slides / ".replaced-P1_pre_p1-pre")
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    assert not [p.name for p in slides.iterdir() if p.name.startswith(".")]
    assert set(marker_counts(markers, "completed").values()) == {1}


def test_a_scored_folder_that_cannot_be_read_back_is_scored_again(cohort, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    (out / "slides" / "P2_post_p2-post" / "glomeruli.csv").unlink()
    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    counts = marker_counts(markers, "completed")
    assert counts.pop("P2_post_p2-post") == 2 and set(counts.values()) == {1}
    statuses = {c["patient_id"]: c["status"] for c in json.loads((out / "cohort.json").read_text())["comparisons"]}
    assert set(statuses.values()) == {"compared"}


def test_a_blank_slide_is_a_failed_row_not_a_comparison(tmp_path):
    """A slide without tissue is an error for scoring (DESIGN.md), so its pair is not compared."""
    manifest = write_cohort_manifest(tmp_path / "cohort", patients=2)
    write_label_map_file(manifest.parent / "p2-post.ome.tif",
                         np.zeros((200, 200), np.uint8))  # all background
    out = tmp_path / "out"
    assert batch_command([str(manifest), "--from-labels", "--out", str(out), "--no-progress"]) == 1
    rows = {r["patient_id"] + r["timepoint"]: r for r in status_rows(out)}
    assert rows["P2post"]["status"] == "failed"
    assert "TissueError" in rows["P2post"]["error"] and "no tissue found" in rows["P2post"]["error"]
    statuses = {c["patient_id"]: c["status"] for c in json.loads((out / "cohort.json").read_text())["comparisons"]}
    assert statuses == {"P1": "compared", "P2": "not compared: row(s) 5 not scored"}


def test_a_file_is_the_same_by_path_size_and_time_or_else_by_its_bytes(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(b"abcd")
    source = provenance.file_identity(path) | {"sha256": provenance.file_sha256(path)}
    assert provenance.is_same_file(source, path)
    moved = path.rename(tmp_path / "moved.tif")
    assert provenance.is_same_file(source, moved)
    moved.write_bytes(b"abce")  # same size, new bytes, new time
    os.utime(moved, ns=(1, 1))
    assert not provenance.is_same_file(source, moved)
    moved.write_bytes(b"abcde")
    assert not provenance.is_same_file(source, moved)
    # A folder scored before sizes and times were recorded is judged by its hash alone.
    assert provenance.is_same_file({"sha256": provenance.file_sha256(moved)}, moved)


def test_a_mirax_slide_is_known_by_its_data_files_not_its_index_alone(tmp_path):
    """A MIRAX slide's pixels are in the folder beside its small .mrxs index: new data under the
    same index is another slide; a slide moved whole (index and folder renamed) is the same."""
    index, folder = tmp_path / "slide.mrxs", tmp_path / "slide"
    index.write_bytes(b"[GENERAL]\n")
    folder.mkdir()
    (folder / "Slidedat.ini").write_bytes(b"[GENERAL]\nSLIDE_ID=1\n")
    (folder / "Data0000.dat").write_bytes(b"pixels of slide 1")
    assert provenance.slide_files(index) == [index, folder / "Data0000.dat", folder / "Slidedat.ini"]
    source = provenance.file_identity(index) | {"sha256": provenance.slide_sha256(index)}
    assert source["size_bytes"] == 10 + 21 + 17
    assert source["sha256"] != provenance.file_sha256(index)
    index.rename(tmp_path / "moved.mrxs")
    folder = folder.rename(tmp_path / "moved")
    assert provenance.is_same_file(source, tmp_path / "moved.mrxs")
    (folder / "Data0000.dat").write_bytes(b"pixels of slide 2")  # same index, same size
    assert not provenance.is_same_file(source, tmp_path / "moved.mrxs")
    # a one-file slide's hash is its file's, as recorded before slides of several files counted
    assert provenance.slide_sha256(folder / "Slidedat.ini") == provenance.file_sha256(
        folder / "Slidedat.ini")


def test_a_hamamatsu_vms_slide_is_known_by_the_files_its_index_names(tmp_path):
    """A VMS index names the JPEGs (a mosaic: "ImageFile(x,y)"), map and optimisation files
    beside it; they are the slide, other files of the folder are not."""
    index = tmp_path / "slide.vms"
    index.write_bytes(b"[Virtual Microscope Specimen]\nNoJpegColumns=2\nImageFile=slide.jpg\n"
                      b"  ImageFile(1,0)=slide_x1.jpg\nnot a key\nMapFile=slide_map.jpg\n"
                      b"Comment=\xe9chantillon\nOptimisationFile=slide.opt\n"
                      b"MacroImage=" + b"m" * 300 + b".jpg\n")  # indented, bad lines, Latin-1
    for name in ("slide.jpg", "slide_x1.jpg", "slide_map.jpg", "slide.opt", "notes.txt"):
        (tmp_path / name).write_bytes(b"bytes of " + name.encode())
    assert provenance.slide_files(index) == [index] + [
        tmp_path / n for n in ("slide.jpg", "slide.opt", "slide_map.jpg", "slide_x1.jpg")]
    source = provenance.file_identity(index) | {"sha256": provenance.slide_sha256(index)}
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in provenance.slide_files(index):
        path.rename(moved / path.name)
    assert provenance.is_same_file(source, moved / "slide.vms")
    (moved / "slide_x1.jpg").write_bytes(b"bytes of slide_x2.jpg")  # same size, new pixels
    assert not provenance.is_same_file(source, moved / "slide.vms")
    (tmp_path / "broken.vmu").write_bytes(b"\xff\xfe not a key file")
    assert provenance.slide_files(tmp_path / "broken.vmu") == [tmp_path / "broken.vmu"]


def test_slide_recipe_follows_what_changes_scores():
    info = ModelInfo("toy", {}, list(CLASS_NAMES), {}, MPP, 128, 3, {"mean": [0.0] * 3, "std": [1.0] * 3},
                     sha256="a" * 64, stain_reference=[1.5, 0.7])
    config, options = load_score_config(), pipeline.InferenceOptions("cpu", 16, 2)
    recipe = pipeline.slide_recipe(info, config, options, None)
    assert recipe == pipeline.slide_recipe(info, config, pipeline.InferenceOptions("cpu", 4, 8), None)
    # the one scale, however written, keeps the recipe of folders scored before scales existed
    one_scale = pipeline.inference_options("cpu", scales=(1,))
    assert recipe == pipeline.slide_recipe(info, config, one_scale, None)
    # and so does a search of factor 1 alone, which is no search
    assert pipeline.inference_options("cpu", mpp_search=[1]).mpp_search is None
    assert recipe == provenance.recipe_sha256(
        {"model_sha256": "a" * 64, "int8": False, "bf16": False, "tta": False,
         "stain_reference": [1.5, 0.7], "mpp_given": None, "config": config.as_dict()})
    on_gpu = pipeline.slide_recipe(info, config, pipeline.InferenceOptions("cuda", 16, 2), None)
    assert on_gpu == pipeline.slide_recipe(info, config, pipeline.InferenceOptions("cuda:1", 4, 8), None)
    changed = [on_gpu,  # bf16
               pipeline.slide_recipe(replace(info, sha256="b" * 64), config, options, None),
               pipeline.slide_recipe(replace(info, stain_reference=None), config, options, None),
               pipeline.slide_recipe(info, replace(config, name="x"), options, None),
               pipeline.slide_recipe(info, config, replace(options, int8=True), None),
               pipeline.slide_recipe(info, config, replace(options, tta=True), None),
               pipeline.slide_recipe(info, config, replace(options, scales=(1.0, 1.41)), None),
               pipeline.slide_recipe(info, config, replace(options, mpp_search=(1.0, 1.41)), None),
               pipeline.slide_recipe(info, config, options, 0.25)]
    assert len({recipe, *changed}) == 10


KILLABLE_RUN = """
import sys
sys.path.insert(0, {tests!r})
from synthetic_scored import CountingScorer
from biopsy.batch import run_batch
run_batch({manifest!r}, {out!r}, CountingScorer({markers!r}, delay_s=0.4), progress=False)
"""


def test_kill_9_halfway_then_rerun_scores_each_slide_once(cohort, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    script = KILLABLE_RUN.format(tests=str(REPO / "tests"), manifest=str(cohort), out=str(out),
                                 markers=str(markers))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    first = out / "slides" / "P1_pre_p1-pre" / "summary.json"
    deadline = time.monotonic() + 60
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # Nothing under a final name is incomplete; the slide in flight is only in a .partial- folder.
    finals = [p for p in (out / "slides").iterdir() if not p.name.startswith(".partial-")]
    assert finals and all((p / "summary.json").is_file() for p in finals)
    assert len(finals) < 6 and not (out / "cohort.json").exists()
    interrupted = marker_counts(markers, "completed")

    assert run_batch(cohort, out, CountingScorer(markers), progress=False) == 0
    completed, started = marker_counts(markers, "completed"), marker_counts(markers, "started")
    assert len(completed) == 6 and set(completed.values()) == {1}
    assert sum(started.values()) <= 6 + 1  # at most the slide in flight at the kill was begun twice
    assert all(completed[name] == 1 for name in interrupted)

    uninterrupted = tmp_path / "uninterrupted"
    assert run_batch(cohort, uninterrupted, CountingScorer(tmp_path / "m2"), progress=False) == 0
    assert_same_outputs(out, uninterrupted)


def colour_lookup_model(class_colours: list[tuple[int, int, int]]) -> torch.nn.Module:
    """1x1 conv whose argmax is the class of the nearest class colour (inputs scaled 0..1):
    a slide painted in class colours is segmented into exactly its painted classes."""
    colours = torch.tensor(class_colours, dtype=torch.float32) / 255
    model = torch.nn.Conv2d(3, len(class_colours), 1)
    with torch.no_grad():
        model.weight.copy_(50 * 2 * colours[:, :, None, None])
        model.bias.copy_(-50 * (colours**2).sum(1))
    return model.eval()


def test_slides_are_segmented_then_scored_like_their_label_maps(tmp_path):
    labels = paint_label_map(["hyaline_deposits", "global_sclerosis", "cellular_crescent",
                              "normal", "segmental_sclerosis", "fibrous_crescent"], 0.3, 0.3)
    colours = [CLASS_COLOURS[name] for name in CLASS_NAMES]
    slide = tmp_path / "pre.tif"
    write_pyramid(slide, [colourise(labels, colours)], labels.shape, MPP, style="generic",
                  compression="zlib", min_level_px=64)
    write_label_map_file(tmp_path / "pre.ome.tif", labels)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,timepoint,slide\nP1,pre,pre.tif\nP1,post,pre.ome.tif\n")
    info = ModelInfo("toy", {}, list(CLASS_NAMES), {n: list(c) for n, c in CLASS_COLOURS.items()},
                     MPP, 128, 3, {"mean": [0.0] * 3, "std": [1.0] * 3})
    scorer = pipeline.SlideScorer(colour_lookup_model(colours), info, Path("toy.safetensors"),
                                   load_score_config(), pipeline.InferenceOptions("cpu", 4, 0))
    entries = read_manifest(manifest)
    from_slide, from_labels = tmp_path / "from_slide", tmp_path / "from_labels"
    scorer(entries[0], from_slide)
    pipeline.LabelMapScorer(load_score_config())(entries[1], from_labels)
    assert ((from_slide / "glomeruli.csv").read_text() == (from_labels / "glomeruli.csv").read_text())
    slide_summary, labels_summary = (json.loads((f / "summary.json").read_text())
                                     for f in (from_slide, from_labels))
    assert slide_summary["provenance"]["source"]["kind"] == "slide"
    assert slide_summary["provenance"]["model"]["path"] == "toy.safetensors"
    assert slide_summary["provenance"]["recipe_sha256"] == scorer.recipe(entries[0])
    assert labels_summary["provenance"]["recipe_sha256"] == pipeline.label_map_recipe(load_score_config())
    scores = slide_summary["scores"]
    expected = labels_summary["scores"]
    assert scores["glomeruli"] == expected["glomeruli"]
    assert scores["activity_index"] == expected["activity_index"]
    assert scores["burdens"] == pytest.approx(expected["burdens"], rel=0.02)


def test_scoring_options_turn_stain_normalisation_off(monkeypatch):
    """batch and compare take --no-stain-normalisation: the scorer gets a model without its reference."""
    info = ModelInfo("toy", {}, list(CLASS_NAMES), {}, MPP, 128, 3, {"mean": [0.0] * 3, "std": [1.0] * 3},
                     stain_reference=[1.5, 0.7])
    monkeypatch.setattr(pipeline, "load_model", lambda path, device, int8: (None, info, Path("toy")))
    monkeypatch.setattr(pipeline, "SlideScorer", lambda model, info, *rest: info.stain_reference)
    parser = argparse.ArgumentParser()
    batch_cli.add_scoring_arguments(parser, "slides")
    assert batch_cli.make_scorer(parser.parse_args([]), "cpu") == [1.5, 0.7]
    assert batch_cli.make_scorer(parser.parse_args(["--no-stain-normalisation"]), "cpu") is None


def test_ranks_take_the_gpus_in_turn(monkeypatch):
    """More ranks than GPUs share them round-robin; without CUDA every rank runs on the CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [DistributedContext(rank, 6, rank % 3).device for rank in range(6)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:0", "cuda:1", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DistributedContext(1, 2, 1).device == "cpu"
