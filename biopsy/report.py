"""``report.html``: one pre/post comparison as a single self-contained HTML file.

Everything is inline (images as base64 PNG, charts as SVG, no scripts, no external links), so the
file can be mailed or archived as is. Every string that comes from the user or from input files
(patient id, paths, class and model names) goes through :func:`html.escape`.

Sections: headline tables (activity and chronicity apart), per-metric bars and intervals, the NIH
component table, side-by-side overviews with glomeruli outlined in the colour of their lesion call,
a gallery of glomerulus crops per lesion, and provenance.
"""

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from biopsy.atomic import write_text_atomic
from biopsy.errors import AnnotationError, SlideError
from biopsy.labelmap import colourise, read_label_map
from biopsy.scorefolder import ScoredSlide
from biopsy.scoring import LESIONS
from biopsy.slide import BRIGHTFIELD_CHANNELS, Slide, open_slide

OVERVIEW_MAX_PX = 760
CROP_PX = 128
CROPS_PER_LESION = 8
# Outline colour of each lesion call; a glomerulus with several takes the first in this order.
# Okabe and Ito's palette, told apart by colour-blind readers too.
LESION_COLOURS: dict[str, tuple[int, int, int]] = {
    "cellular_crescent": (213, 94, 0), "endocapillary_hypercellularity": (204, 121, 167),
    "hyaline_deposits": (0, 114, 178), "global_sclerosis": (0, 0, 0),
    "fibrous_crescent": (86, 180, 233), "segmental_sclerosis": (230, 159, 0),
    "normal": (0, 158, 115)}
VERDICT_COLOURS = {"improved": "#0072b2", "worsened": "#d55e00", "unchanged": "#666",
                   "not assessed": "#aaa"}
VERDICT_DASHES = {"improved": "none", "worsened": "6 3", "unchanged": "2 3", "not assessed": "1 4"}
BASELINE_COLOUR, FOLLOW_UP_COLOUR = "#9e9e9e", "#0072b2"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:right;vertical-align:middle}th:first-child,td:first-child{text-align:left}
.verdict{font-weight:600}.na{color:#999}.pair{display:flex;gap:16px;flex-wrap:wrap}
.pair figure{margin:0}figcaption{font-size:12px;color:#555}.crops{display:flex;flex-wrap:wrap;gap:4px}
.crops figure{margin:0;text-align:center}.legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;border:2px solid;margin-right:4px;vertical-align:-2px}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
.warning{background:#fff4e5;border-left:4px solid #e65100;padding:4px 12px;margin:12px 0}
"""


def e(value) -> str:
    """Escaped text of any value (None shows as an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_report(comparison: dict, baseline: ScoredSlide, follow_up: ScoredSlide) -> str:
    """The HTML of ``report.html`` for a comparison (``compare.compare_scored``) of two slides."""
    patient = comparison["patient_id"] or "(no patient id)"
    sections = [
        f"<h1>Pre/post comparison: patient {e(patient)}</h1>",
        _slides_line(comparison),
        _model_cautions(comparison),
        _processing_differences(comparison),
        _metric_tables(comparison),
        "<h2>NIH activity and chronicity components</h2>",
        _component_table(baseline.summary["scores"], follow_up.summary["scores"]),
        "<h2>Overviews</h2>", _legend(), _overviews(baseline, follow_up),
        "<h2>Glomeruli by lesion</h2>", _gallery(baseline, follow_up),
        "<h2>Provenance</h2>", _provenance(comparison, baseline, follow_up),
    ]
    return page(f"Comparison {patient}", "\n".join(sections))


def _slides_line(comparison: dict) -> str:
    rows = []
    for key, title in (("baseline", "Baseline"), ("follow_up", "Follow-up")):
        s = comparison[key]
        source = (s.get("source") or {}).get("path")
        rows.append(f"<tr><td>{title}</td><td>{e(s['folder'])}</td><td>{e(source)}</td>"
                    f"<td>{s['glomeruli']}</td><td>{e(s['adequacy'])}</td><td>{s['cortex_tiles']} ({s['cortex_blocks']})</td></tr>")
    boot = comparison["bootstrap"]
    return ("<table><tr><th>biopsy</th><th>scored folder</th><th>source</th><th>glomeruli</th>"
            "<th>adequacy</th><th>cortex tiles (1 mm blocks)</th></tr>" + "".join(rows) + "</table>"
            f"<p>Difference = follow-up − baseline; lower is better for every metric. Interval "
            f"({boot['confidence']:.0%}): for a share of glomeruli with a lesion, Newcombe's hybrid "
            f"score interval; for a burden (mean over glomeruli), the shifts that a permutation "
            f"test of the two biopsies' glomeruli ({boot['replicates']} splits, or every one) does "
            f"not reject; for an area of the cortex, Welch's t over 1 mm blocks of cortex tiles "
            f"(fibrosis comes in patches: neighbouring tiles are not independent); for an index, "
            f"a percentile bootstrap, {boot['replicates']} replicates, seed {boot['seed']}; "
            f"{e(boot['resampled'])}. A metric improved (worsened) when its "
            "interval lies wholly below (above) zero. Each of the metrics is judged at 95 % on its "
            "own: in simulated patients whose kidney did not change, about three in ten had at "
            "least one such verdict by chance. \"Together (Holm)\": the verdicts that hold when "
            "the metrics are judged as one set, each method's p-value adjusted by Holm's "
            "step-down (95 % for the whole set: 3-7 % of those patients had one).</p>")


def model_cautions(comparison: dict) -> dict[str, str]:
    """Biopsy ("baseline", "follow_up") -> the caution its scoring recorded about its model."""
    cautions = {side: (comparison[side].get("model") or {}).get("caution")
                for side in ("baseline", "follow_up")}
    return {side: caution for side, caution in cautions.items() if caution}


def _model_cautions(comparison: dict) -> str:
    """A warning for each biopsy whose scoring recorded a caution about its model."""
    titles = {"baseline": "Baseline", "follow_up": "Follow-up"}
    items = "".join(f"<li>{titles[side]}: {e(caution)}.</li>"
                    for side, caution in model_cautions(comparison).items())
    return (f"<div class='warning'><p><b>Read these scores with care</b>:</p><ul>{items}</ul></div>"
            if items else "")


def _processing_differences(comparison: dict) -> str:
    differences = comparison.get("processing_differences") or []
    if not differences:
        return ""
    items = "".join(f"<li>{e(d)}</li>" for d in differences)
    return (f"<div class='warning'><p><b>The two biopsies were processed differently</b>; a "
            f"difference below may owe to that rather than to the tissue:</p><ul>{items}</ul></div>")


def _metric_tables(comparison: dict) -> str:
    parts = []
    for family in ("activity", "chronicity"):
        metrics = [m for m in comparison["metrics"] if m["family"] == family]
        rows = "".join(_metric_row(m, comparison) for m in metrics)
        parts.append(f"<h2>{family.capitalize()}</h2><table><tr><th>metric</th><th>unit</th>"
                     "<th>baseline</th><th>follow-up</th><th>values</th><th>difference</th>"
                     "<th>95% interval</th><th>change</th><th>verdict</th>"
                     "<th>together (Holm)</th></tr>"
                     f"{rows}</table>")
    parts.append(f'<p class="legend">Values: <i class="swatch" style="border-color:'
                 f'{BASELINE_COLOUR};background:{BASELINE_COLOUR}"></i>baseline, '
                 f'<i class="swatch" style="border-color:{FOLLOW_UP_COLOUR};background:'
                 f'{FOLLOW_UP_COLOUR}"></i>follow-up, each row on its own scale from 0. Change: '
                 "the difference (dot) and its interval (bar) about zero (grey line). An index "
                 "marked partial sums only the components assessed; two indices over different "
                 "components are not compared.</p>")
    return "\n".join(parts)


def _metric_row(m: dict, comparison: dict) -> str:
    interval = (f"[{number(m['ci_low'])}, {number(m['ci_high'])}]" if m["ci_low"] is not None
                else "—")
    colour = VERDICT_COLOURS[m["verdict"]]
    values = [number(m[key]) + _partial(m, key, comparison) for key in ("baseline", "follow_up")]
    return (f"<tr><td>{e(m['label'])}</td><td>{e(m['unit'])}</td><td>{values[0]}</td>"
            f"<td>{values[1]}</td><td>{_value_bars(m)}</td>"
            f"<td>{number(m['difference'])}</td><td>{interval}</td><td>{_interval_svg(m, colour)}</td>"
            f'<td class="verdict" style="color:{colour}">{e(m["verdict"])}</td>'
            f'<td class="verdict" style="color:{VERDICT_COLOURS[m["verdict_holm"]]}">'
            f'{e(m["verdict_holm"])}</td></tr>')


def _partial(m: dict, key: str, comparison: dict) -> str:
    """" (partial)" after an index value that sums only some of its components."""
    partial = (m["name"].endswith("_index") and m[key] is not None
               and comparison[key].get(f"{m['family']}_partial"))
    return " (partial)" if partial else ""


def _value_bars(m: dict, width: int = 160) -> str:
    """Baseline and follow-up as two horizontal bars on the same scale; none when the two are
    not compared (an index over other components)."""
    if m["verdict"] == "not assessed":
        return ""
    values = [m["baseline"], m["follow_up"]]
    top = max(values + [1e-9]) * 1.15
    bars = [f'<rect x="0" y="{2 + row * 11}" width="{value / top * width:.1f}" height="9" '
            f'fill="{colour}"/>'
            for row, (value, colour) in enumerate(zip(values, (BASELINE_COLOUR, FOLLOW_UP_COLOUR)))]
    return (f'<svg width="{width}" height="24" role="img"><title>baseline {number(values[0])}, '
            f'follow-up {number(values[1])}</title>{"".join(bars)}</svg>')


def _interval_svg(m: dict, colour: str, width: int = 170) -> str:
    """The difference as a point with its interval, on an axis symmetric about zero."""
    if m["ci_low"] is None:
        return ""
    reach = max(abs(m["ci_low"]), abs(m["ci_high"]), abs(m["difference"]), 1e-9) * 1.1
    x = lambda v: (v / reach + 1) * (width - 10) / 2 + 5  # noqa: E731
    return (f'<svg width="{width}" height="22" role="img"><title>difference '
            f'{number(m["difference"])}, interval [{number(m["ci_low"])}, {number(m["ci_high"])}]'
            f'</title><line x1="{x(0):.1f}" y1="1" x2="{x(0):.1f}" y2="21" stroke="#bbb"/>'
            f'<line x1="{x(m["ci_low"]):.1f}" y1="11" x2="{x(m["ci_high"]):.1f}" y2="11" '
            f'stroke="{colour}" stroke-width="3"/>'
            f'<circle cx="{x(m["difference"]):.1f}" cy="11" r="4" fill="{colour}"/></svg>')


def _component_table(baseline: dict, follow_up: dict) -> str:
    rows = []
    for index in ("activity_index", "chronicity_index"):
        for name, b in baseline[index]["components"].items():
            f = follow_up[index]["components"][name]
            rows.append(f"<tr><td>{e(name.replace('_', ' '))}</td><td>{e(index.split('_')[0])}</td>"
                        f"<td>{b['weight']}</td><td>{e(b['denominator'])}</td>"
                        f"{_component_cells(b)}{_component_cells(f)}</tr>")
        rows.append(f"<tr><th>{e(index.replace('_', ' '))}</th><td></td><td></td><td></td>"
                    f"{_index_cells(baseline[index])}{_index_cells(follow_up[index])}</tr>")
    return ("<table><tr><th>component</th><th>index</th><th>weight</th><th>of</th>"
            "<th>baseline %</th><th>bin</th><th>points</th><th>follow-up %</th><th>bin</th>"
            "<th>points</th></tr>" + "".join(rows) + "</table>")


def _component_cells(c: dict) -> str:
    if not c["assessed"]:
        return f'<td class="na" colspan="3" title="{e(c["reason"])}">not assessed</td>'
    return f"<td>{number(c['percent'])}</td><td>{c['bin']}</td><td>{c['points']}</td>"


def _index_cells(index: dict) -> str:
    if index["score"] is None:
        return '<td class="na" colspan="3">not assessed (no component)</td>'
    partial = (f" (partial: components worth {index['assessed_max']} assessed)"
               if index["partial"] else "")
    return f'<td colspan="3">{e(index["score"])} / {index["max"]}{partial}</td>'


def _legend() -> str:
    items = "".join(f'<span><i class="swatch" style="border-color:rgb{c}"></i>{e(n.replace("_", " "))}'
                    "</span>" for n, c in LESION_COLOURS.items())
    return f'<p class="legend">Glomerulus outline by lesion call: {items}</p>'


def _overviews(baseline: ScoredSlide, follow_up: ScoredSlide) -> str:
    figures = []
    for title, scored in (("Baseline", baseline), ("Follow-up", follow_up)):
        pictures = SlidePictures(scored)
        rgb, um_per_px = pictures.overview()
        image = pictures.outlined(rgb, (0.0, 0.0), um_per_px, scored.glomeruli, width=2)
        figures.append(f'<figure><img src="{png_data_uri(image)}" width="{image.width}" '
                       f'height="{image.height}" alt="{title} overview"><figcaption>{title}: '
                       f"{e(scored.folder.name)}, {len(scored.glomeruli)} glomeruli "
                       f"({pictures.kind})</figcaption></figure>")
    return f'<div class="pair">{"".join(figures)}</div>'


def lesion_colour(lesions) -> tuple[int, int, int]:
    return next((c for name, c in LESION_COLOURS.items() if name in lesions), LESION_COLOURS["normal"])


class SlidePictures:
    """Pictures of one scored slide: from the slide file when it is at hand (brightfield RGB),
    else from the class map in (lightened) class colours. Outlines come from ``objects.geojson``.
    """

    def __init__(self, scored: ScoredSlide):
        self.scored = scored
        self.level0_mpp = scored.summary["label_map"]["level0_mpp"]
        self.slide = _source_slide(scored, self.level0_mpp)
        self.kind = "slide" if self.slide is not None else "class map"
        self.rings = _outlines(scored)
        self._label_map: tuple[np.ndarray, float] | None = None

    def overview(self) -> tuple[np.ndarray, float]:
        """The whole slide at most OVERVIEW_MAX_PX a side, and its µm per pixel."""
        if self.slide is not None:
            um_per_px = max(self.slide.dimensions) * self.level0_mpp / OVERVIEW_MAX_PX
            return self.slide.thumbnail(max(um_per_px, self.level0_mpp)), max(um_per_px, self.level0_mpp)
        shape = self.scored.summary["label_map"]["shape_px"]
        level = 0
        while max(shape) / 2 ** (level + 1) >= OVERVIEW_MAX_PX * 0.75:
            level += 1
        try:
            rgb, mpp = _label_rgb(self.scored, level)
        except AnnotationError:  # fewer pyramid levels than that: level 0 is always there
            rgb, mpp = _label_rgb(self.scored, 0)
        scale = min(1.0, OVERVIEW_MAX_PX / max(rgb.shape[:2]))
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.NEAREST)), mpp * rgb.shape[1] / size[0]

    def region(self, x: float, y: float, side_um: float, size_px: int) -> np.ndarray:
        """The square of ``side_um`` with level-0 top-left (x, y), as ``size_px`` a side."""
        if self.slide is not None:
            return self.slide.read(round(x), round(y), (size_px, size_px), side_um / size_px)
        if self._label_map is None:
            self._label_map = _label_rgb(self.scored, 0)
        rgb, mpp = self._label_map
        to_map = self.level0_mpp / mpp
        left, top, side = round(x * to_map), round(y * to_map), max(1, round(side_um / mpp))
        padded = np.full((side, side, 3), 255, np.uint8)
        rows = slice(max(top, 0), max(min(top + side, rgb.shape[0]), 0))
        cols = slice(max(left, 0), max(min(left + side, rgb.shape[1]), 0))
        padded[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = rgb[rows, cols]
        return np.asarray(Image.fromarray(padded).resize((size_px, size_px), Image.NEAREST))

    def outlined(self, rgb: np.ndarray, origin_xy: tuple[float, float], um_per_px: float,
                 glomeruli, width: int) -> Image.Image:
        """``rgb`` (level-0 top-left ``origin_xy``, ``um_per_px``) with glomerulus outlines."""
        image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
        draw = ImageDraw.Draw(image)
        zoom = self.level0_mpp / um_per_px
        for g in glomeruli:
            for ring in self.rings.get(g.glomerulus_id, []):
                points = (ring + 0.5 - origin_xy) * zoom
                draw.polygon([tuple(p) for p in points], outline=lesion_colour(g.lesions), width=width)
        return image


def _source_slide(scored: ScoredSlide, level0_mpp: float) -> Slide | None:
    """The slide a folder was scored from, if its file is still there and is RGB brightfield."""
    source = scored.summary["provenance"].get("source") or {}
    path = source.get("path")
    if source.get("kind") == "label_map" or not path or not Path(path).is_file():
        return None
    try:
        slide = open_slide(path, mpp=level0_mpp)
    except SlideError:
        return None
    return slide if slide.channel_names == BRIGHTFIELD_CHANNELS and slide.dtype == np.uint8 else None


def _label_rgb(scored: ScoredSlide, level: int = 0) -> tuple[np.ndarray, float]:
    """A level of the class map of a scored slide in class colours, lightened; and its mpp."""
    label_map = read_label_map(scored.folder / "labels.ome.tif", level)
    rgb = colourise(label_map.labels, [label_map.class_colours[n] for n in label_map.class_names])
    return (rgb // 2 + 127).astype(np.uint8), label_map.mpp


def _outlines(scored: ScoredSlide) -> dict[int, list[np.ndarray]]:
    """Glomerulus id -> exterior rings (level-0 px, (x, y)) from ``objects.geojson``."""
    features = json.loads((scored.folder / "objects.geojson").read_text(encoding="utf-8"))["features"]
    rings = {}
    for feature in features:
        name = feature["properties"].get("name", "")
        geometry = feature["geometry"]
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        if name.startswith("G") and name[1:].isdigit():
            rings[int(name[1:])] = [np.asarray(p[0], float) for p in polygons]
    return rings


def _gallery(baseline: ScoredSlide, follow_up: ScoredSlide) -> str:
    slides = [("baseline", baseline, SlidePictures(baseline)),
              ("follow-up", follow_up, SlidePictures(follow_up))]
    rows = []
    for lesion in LESIONS:
        cells = []
        for title, scored, pictures in slides:
            chosen = [g for g in scored.glomeruli if lesion in (g.lesions or ("normal",))]
            shown = chosen
            if len(chosen) > CROPS_PER_LESION:  # spread over the slide, deterministically
                shown = [chosen[i] for i in np.linspace(0, len(chosen) - 1, CROPS_PER_LESION)
                         .round().astype(int)]
            crops = "".join(_crop_figure(g, pictures) for g in shown)
            cells.append(f"<td><b>{title}</b>: {len(chosen)} of {len(scored.glomeruli)}"
                         f'<div class="crops">{crops}</div></td>')
        rows.append(f"<tr><th>{e(lesion.replace('_', ' '))}</th>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _crop_figure(g, pictures: SlidePictures) -> str:
    """One glomerulus, centred, 1.4 equivalent diameters wide, outlined in its lesion colour."""
    side_um = 1.4 * g.equivalent_diameter_um
    half_px = side_um / 2 / pictures.level0_mpp
    origin = (g.centroid_x_px + 0.5 - half_px, g.centroid_y_px + 0.5 - half_px)
    rgb = pictures.region(*origin, side_um, CROP_PX)
    image = pictures.outlined(rgb, origin, side_um / CROP_PX, [g], width=2)
    return (f'<figure><img src="{png_data_uri(image)}" width="{CROP_PX}" height="{CROP_PX}" '
            f'alt="G{g.glomerulus_id}"><figcaption>G{g.glomerulus_id}</figcaption></figure>')


def _provenance(comparison: dict, baseline: ScoredSlide, follow_up: ScoredSlide) -> str:
    parts = []
    for title, scored in (("Baseline", baseline), ("Follow-up", follow_up)):
        provenance = scored.summary["provenance"]
        source = provenance.get("source") or {}
        model = provenance.get("model") or {}
        parts.append(
            f"<h3>{title}</h3><table>"
            f"<tr><td>source</td><td>{e(source.get('path'))}</td></tr>"
            f"<tr><td>source SHA-256</td><td><code>{e(source.get('sha256'))}</code></td></tr>"
            f"<tr><td>model</td><td>{e(model.get('name') or model.get('path') or 'none (label map scored)')}</td></tr>"
            f"<tr><td>model SHA-256</td><td><code>{e(model.get('sha256'))}</code></td></tr>"
            f"<tr><td>software</td><td>{e(json.dumps(provenance.get('software')))}</td></tr></table>"
            f"<details><summary>scoring configuration</summary><pre>"
            f"{e(json.dumps(provenance.get('config'), indent=2))}</pre></details>")
    parts.append(f"<p>Comparison: <code>{e(comparison['format'])}</code>, bootstrap "
                 f"<code>{e(json.dumps(comparison['bootstrap']))}</code></p>")
    return "\n".join(parts)


def write_report(path: str | Path, comparison: dict, baseline: ScoredSlide,
                 follow_up: ScoredSlide) -> None:
    write_text_atomic(path, render_report(comparison, baseline, follow_up))

