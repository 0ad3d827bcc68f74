"""Resumable cohort batch jobs: score every slide of a manifest once, then compare and summarise.

Layout of the output folder ``OUT``::

    slides/<patient>_<timepoint>[_<stain>]_<stem>/   one scored slide (summary.json written last)
    slides/.partial-<name>/                 a slide being scored; renamed into place when whole
    status/rank-<r>.csv                     each rank's progress, rewritten after every slide
    status.csv                              every slide: done or failed, with the error
    comparisons/<baseline>_vs_<timepoint>/  comparison.json, comparison.csv, report.html (only
                                            the manifest's pairs: others are removed)
    cohort.json, cohort.csv, cohort.html    per-metric statistics over patients; every patient
                                            and stain, compared or not (and why)

A slide folder is scored in a ``.partial-`` folder and renamed into place only once its
``summary.json`` exists, so a folder under its final name is always complete: a rerun (or a rank
that restarts after a crash) skips it and scores the rest. A folder is skipped only when its
provenance records the scorer's recipe (model, int8, bf16, test-time augmentation, pixel-size
search, stain reference, given mpp, scoring config: :func:`biopsy.pipeline.slide_recipe`); one
scored another way is scored again, and replaced once the new folder is whole. A slide that fails
keeps its earlier folder (a wrong option on a rerun must not delete a cohort's work), but its row
is failed and its pairs are not compared, so the cohort never mixes recipes.
So is a folder whose slide file has changed since (a slide scanned again under the same name):
unchanged size and time say it has not without reading it, else its SHA-256 is compared.
Under ``torchrun`` the manifest is sharded by rank (``entries[rank::world_size]``); rank 0 writes
the cohort outputs after a barrier.
"""

import csv
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from biopsy.atomic import write_text_atomic
from biopsy.cohort import cohort_statistics, render_cohort
from biopsy.compare import write_comparison
from biopsy.errors import BiopsyError
from biopsy.manifest import ManifestEntry, Pairing, pair_timepoints, read_manifest, unpaired
from biopsy.provenance import is_same_file
from biopsy.report import model_cautions
from biopsy.scorefolder import read_score_folder

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
COHORT_FORMAT = "biopsy.cohort/1"
COHORT_COLUMNS = ("stain", "follow_up_number", "name", "label", "family", "unit", "n",
                  "n_nonzero", "median_change", "ci_low", "ci_high", "wilcoxon_statistic",
                  "p_value", "q_value", "patients_improved", "patients_unchanged",
                  "patients_worsened", "patients_left_out")
STATUS_COLUMNS = ("row", "patient_id", "timepoint", "stain", "slide", "folder", "status", "error")


class Scorer(Protocol):
    """Scores one slide into an (empty) folder, writing summary.json last; its provenance's
    ``recipe_sha256`` is ``recipe(entry)``."""

    def __call__(self, entry: ManifestEntry, out_dir: Path) -> None: ...

    def recipe(self, entry: ManifestEntry) -> str: ...


@dataclass(frozen=True)
class SlideStatus:
    entry: ManifestEntry
    folder: Path
    status: str  # "done", "failed" or "pending"
    error: str = ""


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def device(self) -> str:
        """This rank's GPU, or the CPU on a machine without CUDA. Local ranks take the machine's
        GPUs in turn (``cuda:LOCAL_RANK % GPUs``): with more ranks than GPUs, ranks share one,
        so one slide's scoring on the CPU overlaps another's segmentation on the GPU."""
        import torch

        return f"cuda:{self.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def distributed_context() -> DistributedContext:
    """Rank and world size from torchrun's environment; joins a gloo process group when > 1 rank.

    The group is only used for barriers, so gloo serves CPU and GPU nodes alike; its timeout is a
    day because ranks that finish their shard early wait there for the slowest one.
    """
    context = DistributedContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                                 int(os.environ.get("LOCAL_RANK", 0)))
    if context.world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(days=1))
    return context


def leave_process_group() -> None:
    """Leave the process group :func:`distributed_context` joined, if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def slide_folder(out_dir: Path, entry: ManifestEntry) -> Path:
    return Path(out_dir) / "slides" / entry.folder_name


def is_complete(folder: Path) -> bool:
    return (folder / SUMMARY_FILE).is_file()


def why_score(folder: Path, entry: ManifestEntry, recipe: str) -> str | None:
    """Why ``entry``'s folder must be scored (again), or None when it may be kept: it is whole
    and readable, of ``recipe``, and made from the bytes the manifest's slide file holds now."""
    if not is_complete(folder):
        return "not scored"
    try:
        provenance = read_score_folder(folder).summary["provenance"]
        recorded, source = provenance["recipe_sha256"], provenance["source"]
    except BiopsyError as error:
        return str(error)
    except (KeyError, TypeError):
        return "summary.json is not a scored slide's"
    if recorded != recipe:
        return ("scored another way (model, int8, bf16, tta, scales, mpp search, stain reference, "
                "mpp or scoring config)")
    try:
        same = is_same_file(source, entry.slide)
    except OSError as error:
        return f"cannot check it against {entry.slide} ({error})"
    return None if same else f"scored from another version of {entry.slide}"


def score_into_folder(entry: ManifestEntry, out_dir: Path, score: Scorer) -> None:
    """Score one slide into a ``.partial-`` folder, which then takes the place of what is under
    the final name (incomplete, or scored another way). A slide that fails leaves that as it was.
    """
    folder = slide_folder(out_dir, entry)
    _clean_up_after_a_kill(folder)  # a .replaced- folder put back, not removed, where it is all
    partial = folder.with_name(f".partial-{folder.name}")
    replaced = folder.with_name(f".replaced-{folder.name}")
    partial.mkdir(parents=True)
    try:
        score(entry, partial)
        if not is_complete(partial):
            raise RuntimeError(f"scoring {entry.slide} wrote no {SUMMARY_FILE}")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        os.rename(folder, replaced)
    os.rename(partial, folder)
    shutil.rmtree(replaced, ignore_errors=True)


def _clean_up_after_a_kill(folder: Path) -> None:
    """What a run killed in :func:`score_into_folder` left of ``folder``: its ``.partial-`` folder
    removed; the old folder it was replacing put back where the new one never arrived, or removed
    where it did."""
    shutil.rmtree(folder.with_name(f".partial-{folder.name}"), ignore_errors=True)
    replaced = folder.with_name(f".replaced-{folder.name}")
    if replaced.exists():
        if folder.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(replaced, folder)


def _clean_up_other_kills(out_dir: Path, names: set[str]) -> None:
    """:func:`_clean_up_after_a_kill` for the folders of rows the manifest no longer has (a run
    killed while replacing one, its row removed or renamed before this run)."""
    for leftover in Path(out_dir, "slides").glob(".*-*"):
        prefix, _, name = leftover.name.partition("-")
        if prefix in (".partial", ".replaced") and name not in names:
            _clean_up_after_a_kill(leftover.with_name(name))


def score_shard(entries: list[ManifestEntry], out_dir: Path, score: Scorer,
                rank: int = 0, progress: bool = True) -> list[SlideStatus]:
    """Score this rank's slides one by one; a failure is recorded and the next slide goes on."""
    statuses = {e.row: SlideStatus(e, slide_folder(out_dir, e), "pending") for e in entries}
    reasons = {}
    for entry in entries:
        folder = statuses[entry.row].folder
        _clean_up_after_a_kill(folder)
        reasons[entry.row] = why_score(folder, entry, score.recipe(entry))
        if reasons[entry.row] is None:
            statuses[entry.row] = SlideStatus(entry, folder, "done")
    already_done = sum(s.status == "done" for s in statuses.values())
    status_file = Path(out_dir) / "status" / f"rank-{rank}.csv"
    write_status(status_file, list(statuses.values()))
    bar = tqdm(total=len(entries), initial=already_done, unit="slide", disable=not progress,
               desc=f"rank {rank}" if rank else "slides")
    failed = 0
    for entry in entries:
        if statuses[entry.row].status == "done":
            continue
        started = time.perf_counter()
        if reasons[entry.row] != "not scored":
            log.warning("%s: %s; scoring it again", statuses[entry.row].folder,
                        reasons[entry.row])
        try:
            score_into_folder(entry, out_dir, score)
            statuses[entry.row] = SlideStatus(entry, statuses[entry.row].folder, "done")
            log.info("scored %s in %.1f s", entry.slide, time.perf_counter() - started)
        except Exception as error:  # a failing slide must not stop the cohort
            failed += 1
            if not isinstance(error, BiopsyError):
                log.warning("scoring %s failed", entry.slide, exc_info=True)
            message = f"{type(error).__name__}: {error}"
            statuses[entry.row] = SlideStatus(entry, statuses[entry.row].folder, "failed", message)
        write_status(status_file, list(statuses.values()))
        bar.update(1)
        bar.set_postfix(done=bar.n - failed, failed=failed)
    bar.close()
    return list(statuses.values())


def write_status(path: Path, statuses: list[SlideStatus]) -> None:
    """Write statuses as CSV (one row per slide, in manifest order), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STATUS_COLUMNS)
    for s in sorted(statuses, key=lambda s: s.entry.row):
        writer.writerow([s.entry.row, s.entry.patient_id, s.entry.timepoint, s.entry.stain,
                         str(s.entry.slide), f"slides/{s.folder.name}", s.status,
                         " ".join(s.error.split())])
    write_text_atomic(path, buffer.getvalue())


def read_status(path: Path) -> dict[int, tuple[str, str]]:
    """Row number -> (status, error) from a status CSV."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {int(r["row"]): (r["status"], r["error"]) for r in csv.DictReader(handle)}


def wait_for_all_ranks(context: DistributedContext) -> None:
    """The barrier, polled: a rank that waits hours for the slowest one still ends on SIGTERM
    (Python runs signal handlers only between its own instructions, not inside gloo's wait)."""
    if context.world_size > 1:
        import torch.distributed as dist

        waiting = dist.barrier(async_op=True)
        while not waiting.is_completed():
            time.sleep(0.2)
        waiting.wait()  # raises what the barrier met


def run_batch(manifest_path: str | Path, out_dir: str | Path, score: Scorer,
              context: DistributedContext = DistributedContext(), progress: bool = True) -> int:
    """Score this rank's share of the manifest; rank 0 then writes status.csv and the cohort,
    while the other ranks wait for it (torchrun ends every rank once one exits non-zero).

    Returns the number of failed slides over every rank on rank 0 (which logs them), 0 on the
    others. The manifest is validated in full before any slide is scored.
    """
    out_dir = Path(out_dir)
    entries = read_manifest(manifest_path)
    if context.rank == 0:  # the other ranks touch only the manifest's own folder names
        _clean_up_other_kills(out_dir, {e.folder_name for e in entries})
    shard = entries[context.rank::context.world_size]
    score_shard(shard, out_dir, score, context.rank, progress)
    wait_for_all_ranks(context)
    failed = _write_outputs(entries, out_dir, context) if context.rank == 0 else 0
    wait_for_all_ranks(context)
    return failed


def _write_outputs(entries: list[ManifestEntry], out_dir: Path, context: DistributedContext) -> int:
    """status.csv from every rank's and the cohort; the number of failed slides."""
    (out_dir / "cohort.json").unlink(missing_ok=True)  # written last: the mark of a whole set
    merged: dict[int, tuple[str, str]] = {}
    for rank in range(context.world_size):
        merged.update(read_status(out_dir / "status" / f"rank-{rank}.csv"))
    all_statuses = [SlideStatus(e, slide_folder(out_dir, e), *merged[e.row]) for e in entries]
    write_status(out_dir / "status.csv", all_statuses)
    failed = [s for s in all_statuses if s.status == "failed"]
    write_cohort_outputs(entries, out_dir, {s.entry.row for s in failed})
    for s in failed:
        log.error("row %d (%s) failed: %s", s.entry.row, s.entry.slide, s.error)
    return len(failed)


def write_cohort_outputs(entries: list[ManifestEntry], out_dir: Path,
                         failed_rows: set[int] = frozenset()) -> dict:
    """Compare each patient's baseline with each follow-up, then write the cohort statistics.

    Statistics are computed per group of comparisons that are independent across patients: one
    group per stain and follow-up number (first follow-up after baseline, second, ...). A pair
    with a row in ``failed_rows`` is not compared; nor is a slide with no other timepoint of its
    patient and stain, which is listed as such.
    """
    pairs = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for pairing in pair_timepoints(entries):
        record, comparison = _compare_pairing(pairing, out_dir, failed_rows)
        pairs.append(record)
        if comparison is not None:
            groups.setdefault((pairing.baseline.stain, pairing.follow_up_number), []).append(comparison)
    for entry in unpaired(entries):
        log.warning("row %d: patient %s has no other timepoint%s; not compared", entry.row,
                    entry.patient_id, f" of stain {entry.stain}" if entry.stain else "")
        pairs.append({"patient_id": entry.patient_id, "stain": entry.stain,
                      "baseline": entry.timepoint, "follow_up": None, "follow_up_number": None,
                      "folder": None, "status": "not compared: no other timepoint of this patient "
                                                "and stain"})
    _remove_other_comparisons(out_dir, {p["folder"] for p in pairs})
    cohort = {
        "format": COHORT_FORMAT,
        "groups": [{"stain": stain, "follow_up_number": number, "patients": len(comparisons),
                    "metrics": cohort_statistics(comparisons)}
                   for (stain, number), comparisons in sorted(groups.items())],
        "comparisons": pairs,
    }
    write_text_atomic(out_dir / "cohort.html", render_cohort(cohort))
    write_text_atomic(out_dir / "cohort.csv", _cohort_csv(cohort))
    write_text_atomic(out_dir / "cohort.json", json.dumps(cohort, indent=2, allow_nan=False))
    return cohort


def _remove_other_comparisons(out_dir: Path, kept: set[str | None]) -> None:
    """Remove the comparison folders of pairs the manifest no longer makes (an earlier run's)."""
    for folder in (out_dir / "comparisons").glob("*"):
        if folder.is_dir() and f"comparisons/{folder.name}" not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def _compare_pairing(pairing: Pairing, out_dir: Path, failed_rows: set[int]
                     ) -> tuple[dict, dict | None]:
    baseline, follow_up = pairing.baseline, pairing.follow_up
    folder = Path("comparisons") / f"{baseline.folder_name}_vs_{follow_up.timepoint}"
    record = {"patient_id": baseline.patient_id, "stain": baseline.stain,
              "baseline": baseline.timepoint, "follow_up": follow_up.timepoint,
              "follow_up_number": pairing.follow_up_number, "folder": folder.as_posix(),
              "status": "compared"}
    missing = [e for e in (baseline, follow_up)
               if e.row in failed_rows or not is_complete(slide_folder(out_dir, e))]
    if missing:
        return record | {"status": "not compared: row(s) " + ", ".join(str(e.row) for e in missing)
                         + " not scored", "folder": None}, None
    try:
        comparison = write_comparison(out_dir / folder,
                                      read_score_folder(slide_folder(out_dir, baseline)),
                                      read_score_folder(slide_folder(out_dir, follow_up)),
                                      baseline.patient_id)
    except BiopsyError as error:
        return record | {"status": f"not compared: {error}", "folder": None}, None
    biopsies = (comparison["baseline"], comparison["follow_up"])
    return record | {"glomeruli": [b["glomeruli"] for b in biopsies],
                     "adequacy": [b["adequacy"] for b in biopsies],
                     "processing_differences": comparison["processing_differences"],
                     "cautions": sorted(set(model_cautions(comparison).values()))}, comparison


def _cohort_csv(cohort: dict) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, COHORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for group in cohort["groups"]:
        for metric in group["metrics"]:
            low, high = metric["median_change_ci"] or (None, None)
            writer.writerow(metric | {"stain": group["stain"], "ci_low": low, "ci_high": high,
                                      "follow_up_number": group["follow_up_number"]})
    return text.getvalue()
