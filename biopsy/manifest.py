"""Batch manifests: one CSV row per slide, validated in full before any slide is scored.

Columns: ``patient_id``, ``timepoint`` (``pre``/``post`` or an ISO date ``YYYY-MM-DD``),
``slide`` (path relative to the manifest, or absolute), and optionally ``stain`` and ``mpp``.
Column names match whatever their case. Other columns are ignored, and so are rows with every
cell empty (a spreadsheet's trailing ``,,,``) and empty cells past the header's. Errors name the
spreadsheet row (the header is row 1; blank lines count).

A patient's baseline is its earliest timepoint (``pre`` before ``post``; dates in calendar order);
slides of different stains are compared stain with stain. Stain names match whatever their case:
each is spelled as on its first row.
"""

import csv
import datetime
import re
from dataclasses import dataclass, replace
from pathlib import Path

from biopsy.errors import ManifestError, MppError, SlideError
from biopsy.slide import SLIDE_MPP_RANGE_UM, file_stem, is_slide_mpp, open_slide

REQUIRED_COLUMNS = ("patient_id", "timepoint", "slide")
OPTIONAL_COLUMNS = ("stain", "mpp")
NAMED_TIMEPOINTS = ("pre", "post")
_UNSAFE_FILENAME_CHARS = re.compile(r"[^\w.-]+")  # \w: letters and digits of any script


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest row.

    ``row`` is the spreadsheet row number (header = 1); ``slide`` is an absolute path.
    """

    row: int
    patient_id: str
    timepoint: str
    slide: Path
    stain: str = ""
    mpp: float | None = None

    @property
    def order_key(self) -> tuple[int, int]:
        """Sort key of the timepoint: ``pre`` < ``post``; dates by calendar day."""
        if self.timepoint in NAMED_TIMEPOINTS:
            return (0, NAMED_TIMEPOINTS.index(self.timepoint))
        return (1, datetime.date.fromisoformat(self.timepoint).toordinal())

    @property
    def folder_name(self) -> str:
        """Output folder name ``<patient>_<timepoint>[_<stain, lower case>]_<slide name without
        its suffix>``, made safe for file systems."""
        stem = file_stem(self.slide)
        stain = [self.stain.casefold()] if self.stain else []  # the same whichever row spells it
        parts = (self.patient_id, self.timepoint, *stain, stem)
        return "_".join(_safe(part) for part in parts)


@dataclass(frozen=True)
class Pairing:
    """A patient's baseline slide and one later slide of the same stain."""

    baseline: ManifestEntry
    follow_up: ManifestEntry
    follow_up_number: int  # 1 for the first follow-up after baseline, 2 for the next, ...


def _safe(text: str) -> str:
    return _UNSAFE_FILENAME_CHARS.sub("_", text).strip("._") or "_"


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read and validate a manifest; raise :class:`ManifestError` naming the row and the fix."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            records = csv.reader(handle)  # blank lines come as [], so each record is a row
            columns = _columns(path, next(records, []))
            entries = [_parse_row(path, row_number, columns, cells)
                       for row_number, cells in enumerate(records, start=2)
                       if any(cell.strip() for cell in cells)]
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text ({error}); save the manifest as CSV UTF-8"
                            ) from error
    except (OSError, csv.Error) as error:
        raise ManifestError(f"{path}: cannot read the manifest ({error})") from error
    if not entries:
        raise ManifestError(f"{path}: the manifest lists no slides; add one row per slide")
    entries = _spell_stains_alike(entries)
    _check_unique(path, entries)
    _check_timepoints_comparable(path, entries)
    _check_pixel_sizes(path, entries)
    return entries


def _columns(path: Path, header: list[str]) -> list[str]:
    """The header's column names in lower case, refused without the required ones or with one
    of the manifest's own twice."""
    columns = [name.strip().lower() for name in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; the header "
                            f"needs {', '.join(REQUIRED_COLUMNS)} (optional: "
                            f"{', '.join(OPTIONAL_COLUMNS)})")
    repeated = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if columns.count(c) > 1]
    if repeated:
        raise ManifestError(f"{path}: column(s) {', '.join(repeated)} appear more than once in "
                            "the header; keep one of each")
    return columns


def _check_pixel_sizes(path: Path, entries: list[ManifestEntry]) -> None:
    """Refuse the manifest if a slide has no pixel size, from its file or its row: found before
    anything is scored, not hours into a cohort. An unreadable slide is left to its row, which
    fails while the batch goes on."""
    lacking = []
    for entry in entries:
        if entry.mpp is None:
            try:
                with open_slide(entry.slide):
                    pass
            except MppError as error:
                lacking.append(f"row {entry.row} ({error})")
            except SlideError:
                pass
    if lacking:
        raise ManifestError(f"{path}: give these slides' pixel size in an mpp column (µm/px): "
                            + "; ".join(lacking))


def _parse_row(path: Path, row_number: int, columns: list[str], cells: list[str]) -> ManifestEntry:
    where = f"{path} row {row_number}"
    if any(cell.strip() for cell in cells[len(columns):]):
        raise ManifestError(f"{where}: more cells than header columns; quote cells that hold commas")
    values = dict(zip(columns, (cell.strip() for cell in cells + [""] * len(columns))))
    for column in REQUIRED_COLUMNS:
        if not values[column]:
            raise ManifestError(f"{where}: empty {column}; every row needs {', '.join(REQUIRED_COLUMNS)}")
    timepoint = _parse_timepoint(where, values["timepoint"])
    slide = Path(values["slide"]).expanduser()
    slide = (slide if slide.is_absolute() else path.parent / slide).resolve()
    if not slide.exists():
        raise ManifestError(f"{where}: slide file {slide} not found; slide paths are relative "
                            f"to the manifest's folder {path.parent.resolve()}")
    return ManifestEntry(row=row_number, patient_id=values["patient_id"], timepoint=timepoint,
                         slide=slide, stain=values.get("stain", ""),
                         mpp=_parse_mpp(where, values.get("mpp", "")))


def _parse_timepoint(where: str, text: str) -> str:
    if text.lower() in NAMED_TIMEPOINTS:
        return text.lower()
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ManifestError(f"{where}: unknown timepoint {text!r}; use pre, post or an ISO date "
                            "such as 2024-03-31") from None


def _parse_mpp(where: str, text: str) -> float | None:
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not is_slide_mpp(mpp):
        low, high = SLIDE_MPP_RANGE_UM
        raise ManifestError(f"{where}: mpp {text!r} is not a slide's pixel size ({low:g} to "
                            f"{high:g} µm/px); leave it empty to use the slide's metadata")
    return mpp


def _spell_stains_alike(entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """Each stain as first spelled: "pas" on a later row becomes "PAS"."""
    spelling: dict[str, str] = {}
    return [replace(e, stain=spelling.setdefault(e.stain.casefold(), e.stain)) for e in entries]


def _check_unique(path: Path, entries: list[ManifestEntry]) -> None:
    seen: dict[tuple, int] = {}
    for entry in entries:
        keys = (
            ("patient, timepoint and stain", entry.patient_id, entry.timepoint, entry.stain),
            ("slide file", entry.slide),
            (f"output folder name {entry.folder_name}", entry.folder_name),
        )
        for key in keys:
            if key in seen:
                fix = ("rename one of the two slide files" if key[1] == entry.folder_name
                       else "remove one of the two rows")
                raise ManifestError(f"{path} row {entry.row}: duplicate of row {seen[key]} (same "
                                    f"{key[0]}); {fix}")
            seen[key] = entry.row


def _check_timepoints_comparable(path: Path, entries: list[ManifestEntry]) -> None:
    first_kind: dict[str, ManifestEntry] = {}
    for entry in entries:
        other = first_kind.setdefault(entry.patient_id, entry)
        if other.order_key[0] != entry.order_key[0]:
            raise ManifestError(f"{path} row {entry.row}: patient {entry.patient_id!r} mixes "
                                f"pre/post and dates (rows {other.row} and {entry.row}); use "
                                "either pre/post or dates for one patient")


def pair_timepoints(entries: list[ManifestEntry]) -> list[Pairing]:
    """Each patient's (and stain's) baseline paired with every later timepoint, in manifest order."""
    pairings = []
    for group in _by_patient_and_stain(entries):
        baseline, *follow_ups = sorted(group, key=lambda e: e.order_key)
        pairings += [Pairing(baseline, f, number) for number, f in enumerate(follow_ups, start=1)]
    return pairings


def unpaired(entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """The slides with no other timepoint of their patient and stain: nothing to compare with."""
    return [group[0] for group in _by_patient_and_stain(entries) if len(group) == 1]


def _by_patient_and_stain(entries: list[ManifestEntry]) -> list[list[ManifestEntry]]:
    groups: dict[tuple[str, str], list[ManifestEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.patient_id, entry.stain), []).append(entry)
    return list(groups.values())
