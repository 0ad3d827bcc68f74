import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biopsy.batch import slide_folder, write_cohort_outputs
from biopsy.compare import compare_scored, write_comparison
from biopsy.manifest import read_manifest
from biopsy.pipeline import score_label_map_file
from biopsy.report import render_report
from biopsy.scorefolder import read_score_folder
from biopsy.scoring import load_score_config

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import paint_label_map, scored_folder, write_label_map_file  # noqa: E402

EVIL = '<script>alert("x")</script>'


class Collector(HTMLParser):
    """Tags with their attributes, and the text, of an HTML document."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Collector:
    collector = Collector()
    collector.feed(html_text)
    return collector


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    baseline = read_score_folder(scored_folder(
        tmp, "pre", ["hyaline_deposits+cellular_crescent"] * 10 + ["normal", "segmental_sclerosis"]))
    follow_up = read_score_folder(scored_folder(tmp, "post", ["normal"] * 9 + ["global_sclerosis"] * 3))
    comparison = write_comparison(tmp / "out", baseline, follow_up, patient_id=EVIL)
    return tmp / "out", comparison


def test_report_is_self_contained(report):
    out, _ = report
    document = parse((out / "report.html").read_text())
    images = [attrs for tag, attrs in document.tags if tag == "img"]
    # overviews; baseline: deposits and crescents (8 shown of 10 each), normal, segmental;
    # follow-up: normal (8 of 9), global sclerosis
    assert len(images) == 2 + (8 + 8 + 1 + 1) + (8 + 3)
    for tag, attrs in document.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for name in ("src", "href"):
            assert name not in attrs or attrs[name].startswith("data:image/png;base64,"), (tag, attrs)
    for attrs in images:
        png = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert png.format == "PNG" and png.width > 0


def test_user_strings_are_escaped(report):
    out, comparison = report
    text = (out / "report.html").read_text()
    assert EVIL not in text and "&lt;script&gt;" in text
    assert comparison["patient_id"] == EVIL
    assert EVIL in "".join(parse(text).text)  # shown to the reader as text


def test_processing_differences_are_shown_escaped(report):
    out, comparison = report
    assert comparison["processing_differences"] == []
    assert "processed differently" not in (out / "report.html").read_text()
    baseline, follow_up = (read_score_folder(out.parent / name) for name in ("pre", "post"))
    text = render_report(comparison | {"processing_differences": [EVIL]}, baseline, follow_up)
    assert "processed differently" in text and EVIL not in text
    assert EVIL in "".join(parse(text).text)


def test_report_shows_both_families_the_components_and_provenance(report):
    out, comparison = report
    text = "".join(parse((out / "report.html").read_text()).text)
    for heading in ("Activity", "Chronicity", "NIH activity and chronicity components",
                    "Overviews", "Glomeruli by lesion", "Provenance"):
        assert heading in text
    assert "fibrinoid necrosis" in text and "not assessed" in text
    for key in ("baseline", "follow_up"):
        assert comparison[key]["source"]["sha256"] in text
    written = json.loads((out / "comparison.json").read_text())
    assert written == comparison
    assert (out / "comparison.csv").read_text().splitlines()[0].startswith("name,label,family")


def test_an_index_with_no_component_assessed_reads_not_assessed(tmp_path):
    baseline = read_score_folder(scored_folder(tmp_path, "pre", ["normal"] * 3))
    follow_up = read_score_folder(scored_folder(tmp_path, "post", ["normal"] * 3))
    for slide in (baseline, follow_up):
        activity = slide.summary["scores"]["activity_index"]
        activity |= {"score": None, "assessed_max": 0, "partial": True}
    html_text = render_report(compare_scored(baseline, follow_up), baseline, follow_up)
    text = "".join(parse(html_text).text)
    assert "None" not in text and text.count("not assessed (no component)") == 2


def test_every_lesion_call_has_its_own_outline_colour():
    """Endocapillary hypercellularity fell back to the colour of normal glomeruli."""
    from biopsy.report import LESION_COLOURS, lesion_colour
    from biopsy.scoring import LESIONS

    assert set(LESION_COLOURS) == set(LESIONS)
    assert len(set(LESION_COLOURS.values())) == len(LESIONS)
    assert lesion_colour(("endocapillary_hypercellularity",)) != LESION_COLOURS["normal"]


def test_indices_over_other_components_are_marked_partial_and_not_drawn_as_a_change(tmp_path):
    """No glomeruli at follow-up: its chronicity index sums 2 of 4 components. The values stood
    side by side as bars, as if one fell from the other."""
    baseline = read_score_folder(scored_folder(tmp_path, "pre", ["segmental_sclerosis"] * 6))
    follow_up = read_score_folder(scored_folder(tmp_path, "post", []))
    comparison = compare_scored(baseline, follow_up)
    chronicity = next(m for m in comparison["metrics"] if m["name"] == "chronicity_index")
    assert chronicity["verdict"] == "not assessed" and chronicity["components"] is None
    html_text = render_report(comparison, baseline, follow_up)
    row = next(r for r in html_text.split("<tr>") if r.startswith("<td>NIH chronicity index"))
    assert "(partial)" in row and "<rect" not in row


def test_cohort_html_escapes_patient_ids(tmp_path):
    lines = ["patient_id,timepoint,slide"]
    for patient, lesions in ((EVIL, ["hyaline_deposits"] * 12), ("P&2", ["normal"] * 12)):
        for timepoint in ("pre", "post"):
            name = f"{len(lines)}.ome.tif"
            write_label_map_file(tmp_path / name, paint_label_map(lesions if timepoint == "pre"
                                                                  else ["normal"] * 12))
            lines.append(f'"{patient}",{timepoint},{name}')
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    entries = read_manifest(tmp_path / "manifest.csv")
    out = tmp_path / "out"
    for entry in entries:
        score_label_map_file(entry.slide, slide_folder(out, entry), load_score_config())
    write_cohort_outputs(entries, out)
    text = (out / "cohort.html").read_text()
    assert EVIL not in text and "P&2" not in text and "P&amp;2" in text
    hrefs = [attrs["href"] for tag, attrs in parse(text).tags if tag == "a"]
    assert all(h.startswith("comparisons/") and (out / h).is_file() for h in hrefs) and len(hrefs) == 2


def test_pictures_come_from_the_slide_when_its_file_is_at_hand(tmp_path):
    folder = scored_folder(tmp_path, "pre", ["hyaline_deposits"] * 3)
    summary = json.loads((folder / "summary.json").read_text())
    height, width = summary["label_map"]["shape_px"]
    slide_path = tmp_path / "slide.png"
    Image.new("RGB", (width, height), (10, 200, 10)).save(slide_path)
    summary["provenance"]["source"] = {"kind": "slide", "path": str(slide_path)}
    (folder / "summary.json").write_text(json.dumps(summary))
    scored = read_score_folder(folder)
    comparison = write_comparison(tmp_path / "out", scored, scored)
    text = (tmp_path / "out" / "report.html").read_text()
    assert "3 glomeruli (slide)" in text
    crops = [attrs["src"] for tag, attrs in parse(text).tags if tag == "img" and attrs["alt"] == "G1"]
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(crops[0].split(",", 1)[1]))))
    assert (crop == (10, 200, 10)).all(axis=-1).mean() > 0.8  # the slide, with an outline drawn
    assert comparison["metrics"][0]["difference"] == 0
