"""Cheap synthetic class maps with chosen lesions, and scored-slide folders made from them.

Used by the comparison, batch and report tests: a map of a few hundred pixels a side at 2 µm/px,
glomeruli as discs (lesions painted in), cortex as a grid of tubules in interstitium; and the
checks of a batch's output folder.
"""

import csv
import os
import time
from pathlib import Path

import numpy as np

from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.labelmap import read_label_map, write_label_map
from biopsy.pipeline import LabelMapScorer, score_label_map_file
from biopsy.scoring import ScoreConfig, load_score_config

MPP = 2.0
RADIUS_PX = 40
SPACING_PX = 120
CELL_PX = 25
C = {name: i for i, name in enumerate(CLASS_NAMES)}


def paint_label_map(lesions: list[str], fibrosis_fraction: float = 0.1,
                    atrophy_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A uint8 class map (CLASS_NAMES order): one glomerulus per entry of ``lesions`` ("normal",
    "global_sclerosis", "segmental_sclerosis", "cellular_crescent", "fibrous_crescent",
    "hyaline_deposits", or several joined by "+"), in cortex with the given fractions of
    fibrotic interstitial cells and atrophic tubules."""
    rng = np.random.default_rng(seed)
    columns = 6
    rows = max(1, -(-len(lesions) // columns))
    shape = (rows * SPACING_PX + 2 * CELL_PX, columns * SPACING_PX + 2 * CELL_PX)
    labels = np.zeros(shape, np.uint8)
    labels[CELL_PX // 2:-CELL_PX // 2, CELL_PX // 2:-CELL_PX // 2] = C["tissue"]
    yy, xx = np.mgrid[:CELL_PX, :CELL_PX] - (CELL_PX - 1) / 2
    tubule = np.hypot(yy, xx) <= 9
    for row in range(CELL_PX, shape[0] - CELL_PX, CELL_PX):
        for col in range(CELL_PX, shape[1] - CELL_PX, CELL_PX):
            cell = labels[row:row + CELL_PX, col:col + CELL_PX]
            if rng.random() < fibrosis_fraction:
                cell[:] = C["fibrosis"]
            cell[tubule] = C["atrophic_tubule"] if rng.random() < atrophy_fraction else C["tubule"]
    for number, lesion in enumerate(lesions):
        centre = (CELL_PX + (number // columns) * SPACING_PX + SPACING_PX // 2,
                  CELL_PX + (number % columns) * SPACING_PX + SPACING_PX // 2)
        _paint_glomerulus(labels, centre, lesion.split("+"))
    return labels


def _paint_glomerulus(labels: np.ndarray, centre: tuple[int, int], lesions: list[str]) -> None:
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    radius = np.hypot(yy - centre[0], xx - centre[1])
    angle = np.arctan2(yy - centre[0], xx - centre[1])
    disc = radius <= RADIUS_PX
    labels[disc] = C["tuft"]
    labels[(radius <= RADIUS_PX + 6) & ~disc] = C["tissue"]  # Bowman's space keeps them apart
    if "global_sclerosis" in lesions:
        labels[radius <= 32] = C["sclerosis"]
    if "segmental_sclerosis" in lesions:
        labels[(radius <= 30) & (angle > 0) & (angle < 1.2)] = C["sclerosis"]
    if "hyaline_deposits" in lesions:
        labels[(np.abs(radius - 22) <= 1.5) & disc] = C["hyaline_deposit"]
    for crescent in ("cellular_crescent", "fibrous_crescent"):
        if crescent in lesions:
            arc = angle < -1.5 if crescent == "cellular_crescent" else angle > 1.9
            labels[(radius > RADIUS_PX - 7) & disc & arc] = C[crescent]


def write_label_map_file(path: Path, labels: np.ndarray) -> Path:
    write_label_map(path, labels, MPP, CLASS_NAMES, CLASS_COLOURS)
    return path


def scored_folder(tmp_path: Path, name: str, lesions: list[str], **cortex) -> Path:
    """The scored-slide folder ``tmp_path/name`` of a painted label map, as ``biopsy score
    --from-labels`` writes it."""
    labels_path = write_label_map_file(tmp_path / f"{name}.ome.tif", paint_label_map(lesions, **cortex))
    score_label_map_file(labels_path, tmp_path / name, load_score_config())
    return tmp_path / name


class CountingScorer:
    """A batch scorer of label-map "slides" (:class:`biopsy.pipeline.LabelMapScorer`) that leaves
    a marker file when each call starts and another when it has finished, so tests can count
    scorings across processes."""

    def __init__(self, marker_dir: Path, delay_s: float = 0.0, config: ScoreConfig | None = None):
        self.marker_dir, self.delay_s = Path(marker_dir), delay_s
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.scorer = LabelMapScorer(config or load_score_config())

    def __call__(self, entry, out_dir: Path) -> None:
        tag = f"{entry.folder_name}.{os.getpid()}.{time.monotonic_ns()}.rank{os.environ.get('RANK', 0)}"
        (self.marker_dir / f"started.{tag}").touch()
        time.sleep(self.delay_s)
        self.scorer(entry, out_dir)
        (self.marker_dir / f"completed.{tag}").touch()

    def recipe(self, entry) -> str:
        return self.scorer.recipe(entry)


def marker_counts(marker_dir: Path, kind: str) -> dict[str, int]:
    """Folder name -> number of ``kind`` ("started" / "completed") markers."""
    counts: dict[str, int] = {}
    for path in Path(marker_dir).glob(f"{kind}.*"):
        name = path.name.split(".")[1]
        counts[name] = counts.get(name, 0) + 1
    return counts


def write_cohort_manifest(folder: Path, patients: int = 3, broken_row: bool = False) -> Path:
    """Label maps of ``patients`` patients (pre: active disease, post: remission) and their
    manifest; with ``broken_row`` one more patient whose follow-up file is not a label map."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,timepoint,slide"]
    active = ["hyaline_deposits", "cellular_crescent", "normal", "segmental_sclerosis",
              "hyaline_deposits+cellular_crescent", "global_sclerosis"] * 2
    remission = ["normal"] * 9 + ["global_sclerosis"] * 3
    for number in range(1, patients + 1):
        for timepoint, lesions, fibrosis in (("pre", active, 0.3), ("post", remission, 0.1)):
            name = f"p{number}-{timepoint}.ome.tif"
            write_label_map_file(folder / name, paint_label_map(lesions, fibrosis, 0.2, seed=number))
            lines.append(f"P{number},{timepoint},{name}")
    if broken_row:
        write_label_map_file(folder / "px-pre.ome.tif", paint_label_map(active, 0.3, seed=9))
        (folder / "px-post.ome.tif").write_bytes(b"not a tiff")
        lines += ["PX,pre,px-pre.ome.tif", "PX,post,px-post.ome.tif"]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


SLIDE_FILES = ("summary.json", "glomeruli.csv", "cortex_tiles.csv", "objects.geojson", "overview.png")


def status_rows(out: Path) -> list[dict]:
    with open(out / "status.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every output of two batch runs is identical: byte for byte, except the label maps, whose
    OME-XML carries a fresh UUID per file: their classes, mpp and class table must be equal."""
    names = sorted(p.name for p in (a / "slides").iterdir())
    assert names == sorted(p.name for p in (b / "slides").iterdir())
    assert not [n for n in names if n.startswith(".partial-")]
    for name in names:
        for file in SLIDE_FILES:
            assert (a / "slides" / name / file).read_bytes() == (b / "slides" / name / file).read_bytes(), file
        maps = [read_label_map(folder / "slides" / name / "labels.ome.tif") for folder in (a, b)]
        assert np.array_equal(maps[0].labels, maps[1].labels)
        assert (maps[0].mpp, maps[0].class_names) == (maps[1].mpp, maps[1].class_names)
    for file in ("status.csv", "cohort.json", "cohort.csv", "cohort.html"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    for comparison in (a / "comparisons").iterdir():
        for file in ("comparison.json", "comparison.csv", "report.html"):
            assert (comparison / file).read_bytes() == (b / "comparisons" / comparison.name / file).read_bytes()
