"""Band-wise rendering of a layout: the RGB slide at level 0 and the truth label / instance maps.

Each band draws only the objects whose row range meets it (``Layout.select``). The RGB band is
drawn as material densities (``stain.MATERIALS``) with a margin of rows above and below (so blur
and shapes cut by the band edge continue seamlessly), textured, turned into colour by
Beer-Lambert, blurred slightly, and cropped. Labels are painted from the same outlines, in the same
order, at the label map's coarser pixel size.

Pixel convention (as ``biopsy.geojson``): pixel (row, col) of a map whose pixels are ``s``
level-0 pixels wide covers x in [col * s, (col + 1) * s), so level-0 x maps to col ``x / s - 0.5``.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from biopsy.classes import CLASS_NAMES
from biopsy.synth.layout import Layout
from biopsy.synth.stain import Stain
from biopsy.synth.texture import Textures

BAND_PX = 512
MARGIN_PX = 12
SHIFT = 4  # cv2 sub-pixel bits
LABEL = {name: index for index, name in enumerate(CLASS_NAMES)}

# Material densities (cytoplasm, matrix, collagen, hyaline) of each drawn part.
INTERSTITIUM = (0.12, 0.12, 0.30, 0.0)
FIBROSIS = (0.03, 0.10, 0.95, 0.0)
PROXIMAL = (0.85, 0.10, 0.0, 0.0)
DISTAL = (0.50, 0.06, 0.0, 0.0)
ATROPHIC = (0.45, 0.12, 0.0, 0.0)
MEMBRANE = (0.0, 1.0, 0.0, 0.0)
BRUSH_BORDER = (0.35, 0.55, 0.0, 0.0)
CAST = (0.10, 0.35, 0.0, 0.55)
ADVENTITIA = (0.05, 0.15, 0.85, 0.0)
MEDIA = (0.75, 0.22, 0.05, 0.0)
EMPTY = (0.0, 0.0, 0.0, 0.0)
CAPSULE = (0.0, 0.85, 0.30, 0.0)
SCARRED_SPACE = (0.02, 0.10, 0.55, 0.0)
TUFT = (0.38, 0.42, 0.0, 0.0)
LOOP_WALL = (0.08, 1.0, 0.0, 0.0)
CELLULAR_CRESCENT = (0.70, 0.14, 0.05, 0.0)
FIBROUS_CRESCENT = (0.06, 0.55, 0.85, 0.0)
SCLEROSIS = (0.04, 1.15, 0.12, 0.0)
DEPOSIT = (0.0, 0.15, 0.0, 1.15)
RED_CELL = (0.45, 0.05, 0.0, 0.18)
PLASMA = (0.06, 0.02, 0.0, 0.0)


class Canvas:
    """Drawing on arrays that cover level-0 window x0.., y0.. at ``scale`` level-0 px per pixel.

    ``exact``: draw each shape in a mask of its own bounding box and paste it, so that a pixel's
    value does not depend on where the window starts (cv2 clips shapes at the image edge, which
    moves their edges by a pixel). Label maps are drawn exactly; RGB bands need not be.
    """

    def __init__(self, arrays: list[np.ndarray], x0: float, y0: float, scale: float,
                 exact: bool = False) -> None:
        self.arrays, self.x0, self.y0, self.scale, self.exact = arrays, x0, y0, scale, exact

    def _points(self, vertices: np.ndarray) -> np.ndarray:
        u = (vertices - (self.x0, self.y0)) / self.scale - 0.5
        return np.round(u * (1 << SHIFT)).astype(np.int32)

    def _stamp(self, points: np.ndarray, pad: int, values: list, draw) -> None:
        """``draw(mask, points)`` in a mask around ``points`` (fixed point), pasted as ``values``."""
        low = (points.min(0) >> SHIFT) - pad
        high = (points.max(0) >> SHIFT) + pad + 2
        height, width = self.arrays[0].shape[:2]
        r0, c0, r1, c1 = max(low[1], 0), max(low[0], 0), min(high[1], height), min(high[0], width)
        if r0 >= r1 or c0 >= c1:
            return
        mask = np.zeros((high[1] - low[1], high[0] - low[0]), np.uint8)
        draw(mask, points - (low << SHIFT))
        inside = mask[r0 - low[1]:r1 - low[1], c0 - low[0]:c1 - low[0]].astype(bool)
        for array, value in zip(self.arrays, values):
            array[r0:r1, c0:c1][inside] = value

    def fill(self, vertices_list: list[np.ndarray], values: list) -> None:
        if not vertices_list:
            return
        points = [self._points(v) for v in vertices_list]
        if self.exact:
            for p in points:
                self._stamp(p, 0, values, lambda mask, q: cv2.fillPoly(mask, [q], 1, cv2.LINE_8, SHIFT))
            return
        for array, value in zip(self.arrays, values):
            cv2.fillPoly(array, points, _scalar(value), cv2.LINE_8, SHIFT)

    def stroke(self, vertices_list: list[np.ndarray], thickness_px: float, values: list) -> None:
        if not vertices_list:
            return
        points = [self._points(v) for v in vertices_list]
        thickness = max(1, int(round(thickness_px / self.scale)))
        for array, value in zip(self.arrays, values):
            cv2.polylines(array, points, True, _scalar(value), thickness, cv2.LINE_8, SHIFT)

    def circles(self, circles: np.ndarray, values: list, thickness_px: np.ndarray | None = None) -> None:
        """Filled circles (x, y, r), or rings of ``thickness_px`` centred on radius r."""
        for k, (x, y, r) in enumerate(circles[:, :3]):
            centre = self._points(np.array([[x, y]], np.float64))
            radius = int(round(r / self.scale * (1 << SHIFT)))
            thickness = -1 if thickness_px is None else max(1, int(round(thickness_px[k] / self.scale)))
            if self.exact:
                reach = (radius >> SHIFT) + max(thickness, 0) + 1
                self._stamp(centre, reach, values, lambda mask, q: cv2.circle(
                    mask, (int(q[0, 0]), int(q[0, 1])), radius, 1, thickness, cv2.LINE_8, SHIFT))
                continue
            for array, value in zip(self.arrays, values):
                cv2.circle(array, (int(centre[0, 0]), int(centre[0, 1])), radius, _scalar(value),
                           thickness, cv2.LINE_8, SHIFT)

    def ellipses(self, table: np.ndarray, values: list, grow_px: float = 0.0) -> None:
        """Filled ellipses from rows (x, y, long semi-axis, axis ratio, angle deg), grown by ``grow_px``."""
        for x, y, r, ratio, angle in table[:, :5]:
            centre = self._points(np.array([[x, y]], np.float64))[0]
            axes = (int(round((r + grow_px) / self.scale * (1 << SHIFT))),
                    int(round((r * ratio + grow_px) / self.scale * (1 << SHIFT))))
            for array, value in zip(self.arrays, values):
                cv2.ellipse(array, (int(centre[0]), int(centre[1])), axes, float(angle), 0, 360,
                            _scalar(value), -1, cv2.LINE_8, SHIFT)


def _scalar(value) -> tuple:
    return tuple(float(v) for v in value) if isinstance(value, tuple) else (float(value),)


# --- RGB -----------------------------------------------------------------------------------------

def rgb_bands(layout: Layout, stain: Stain, textures: Textures,
              band_px: int = BAND_PX) -> Iterator[np.ndarray]:
    """Level-0 RGB row bands (uint8, full width), top to bottom."""
    height = layout.shape_px[0]
    for y0 in range(0, height, band_px):
        yield render_rgb(layout, stain, textures, y0, min(y0 + band_px, height))


def render_rgb(layout: Layout, stain: Stain, textures: Textures, y0: int, y1: int) -> np.ndarray:
    """The RGB rows [y0, y1) of the slide (uint8, (y1 - y0, width, 3))."""
    width = layout.shape_px[1]
    top, bottom = y0 - MARGIN_PX, y1 + MARGIN_PX
    height = bottom - top
    materials = np.zeros((height, width, 4), np.float32)
    nuclei = np.zeros((height, width), np.float32)
    canvas = Canvas([materials, nuclei], 0.0, float(top), 1.0)
    _paint_rgb(canvas, layout, top, bottom)
    for x, y, a, b, angle, darkness in layout.nuclei_in(top, bottom):
        cv2.ellipse(nuclei, ((float(x) - 0.5, float(y) - top - 0.5), (2 * float(a), 2 * float(b)),
                             float(angle)), float(darkness), -1, cv2.LINE_AA)
    _texture(materials, nuclei, textures, top, width)
    optical_density = stain.optical_density()
    density = cv2.transform(materials, optical_density[:4].T)  # per-pixel (4,) -> (3,) mix
    density += nuclei[..., None] * optical_density[4]
    density += stain.glass_density()
    rgb = cv2.exp(-density) * 255.0
    sigma = 0.35 / layout.mpp
    rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
    rgb += textures.rows("fine", top + 251, height)[..., None] * 6 - 3
    return np.clip(rgb[MARGIN_PX:MARGIN_PX + y1 - y0] + 0.5, 0, 255).astype(np.uint8)


def _paint_rgb(canvas: Canvas, layout: Layout, top: int, bottom: int) -> None:
    um = 1.0 / layout.mpp
    both = lambda value: [value, 0.0]  # noqa: E731 - materials, and no nucleus
    canvas.fill([layout.cores[i] for i in layout.select("cores", top, bottom)], both(INTERSTITIUM))
    canvas.fill([layout.fibrosis[i] for i in layout.select("fibrosis", top, bottom)], both(FIBROSIS))
    tubules = [layout.tubules[i] for i in layout.select("tubules", top, bottom)]
    for tubule in tubules:
        value = {"proximal": PROXIMAL, "distal": DISTAL, "atrophic": ATROPHIC}[_tubule_kind(tubule)]
        canvas.fill([tubule.outer], both(tuple(v * tubule.stain_factor for v in value)))
    for atrophic in (False, True):
        chosen = [t.outer for t in tubules if t.atrophic == atrophic]
        canvas.stroke(chosen, (3.2 if atrophic else 1.1) * um, both(MEMBRANE))
    canvas.fill([t.lumen for t in tubules if t.lumen is not None], both(EMPTY))
    canvas.stroke([t.lumen for t in tubules if t.proximal and t.lumen is not None], 1.4 * um,
                  both(BRUSH_BORDER))
    canvas.fill([t.lumen for t in tubules if t.cast], both(CAST))
    arteries = [layout.arteries[i] for i in layout.select("arteries", top, bottom)]
    canvas.fill([a.outer for a in arteries], both(ADVENTITIA))
    canvas.fill([a.media for a in arteries], both(MEDIA))
    canvas.stroke([a.lamina for a in arteries], 1.2 * um, both(MEMBRANE))
    canvas.fill([a.lumen for a in arteries], both(EMPTY))
    for i in layout.select("glomeruli", top, bottom):
        g = layout.glomeruli[i]
        canvas.fill([g.capsule], both(CAPSULE))
        scarred = "global_sclerosis" in g.lesions
        canvas.fill([g.capsule_inner], both(SCARRED_SPACE if scarred else EMPTY))
        canvas.fill([g.tuft], both(TUFT))
        if len(g.loops):
            canvas.ellipses(g.loops, both(LOOP_WALL), grow_px=0.8 * um)
            canvas.ellipses(g.loops, both(PLASMA))
            red_cells = g.loops[g.loops[:, 5] > 0].copy()
            red_cells[:, 2] *= 0.55
            canvas.ellipses(red_cells, both(RED_CELL))
        if g.crescent is not None:
            crescent = CELLULAR_CRESCENT if g.crescent_kind == "cellular_crescent" else FIBROUS_CRESCENT
            canvas.fill([g.crescent], both(crescent))
        if g.sclerosis is not None:
            canvas.fill([g.sclerosis], both(SCLEROSIS))
        if len(g.wire_loops):
            canvas.circles(g.wire_loops, both(DEPOSIT), thickness_px=g.wire_loops[:, 3])
        if len(g.thrombi):
            canvas.circles(g.thrombi, both(DEPOSIT))


def _tubule_kind(tubule) -> str:
    return "atrophic" if tubule.atrophic else "proximal" if tubule.proximal else "distal"


def _texture(materials: np.ndarray, nuclei: np.ndarray, textures: Textures, top: int, width: int) -> None:
    """Granular cytoplasm, fibrillar collagen, smooth glassy matrix and hyaline, chromatin."""
    height = materials.shape[0]
    fine = textures.rows("fine", top, height)
    mottle = textures.rows("mottle", top, height)
    slow = 0.85 + 0.3 * textures.slow(top, 0, height, width)
    materials[..., 0] *= (0.55 + 0.6 * fine) * (0.8 + 0.4 * mottle) * slow
    materials[..., 1] *= (0.95 + 0.1 * mottle) * slow
    materials[..., 2] *= (0.1 + 1.5 * textures.rows("fibrils", top, height)) * slow
    materials[..., 3] *= 0.97 + 0.06 * mottle
    nuclei *= (0.75 + 0.5 * fine) * slow


# --- labels --------------------------------------------------------------------------------------

def label_bands(layout: Layout, label_mpp: float, band_px: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels uint8, instances int32) row bands of the truth maps at ``label_mpp``, top to bottom."""
    scale = label_mpp / layout.mpp
    height, width = label_shape(layout, label_mpp)
    for row in range(0, height, band_px):
        yield render_labels(layout, scale, 0, row, width, min(band_px, height - row))


def label_shape(layout: Layout, label_mpp: float) -> tuple[int, int]:
    scale = label_mpp / layout.mpp
    return int(np.ceil(layout.shape_px[0] / scale)), int(np.ceil(layout.shape_px[1] / scale))


def render_labels(layout: Layout, scale: float, col: int, row: int, width: int,
                  height: int) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (``CLASS_NAMES`` order) and glomerulus ids (0 = none) of a window of the
    label map whose pixels are ``scale`` level-0 px wide; the window starts at (col, row)."""
    labels = np.zeros((height, width), np.uint8)
    instances = np.zeros((height, width), np.int32)
    x0, y0 = col * scale, row * scale
    top, bottom = y0 - scale, y0 + (height + 1) * scale
    canvas = Canvas([labels], x0, y0, scale, exact=True)
    canvas.fill([layout.cores[i] for i in layout.select("cores", top, bottom)], [LABEL["tissue"]])
    canvas.fill([layout.fibrosis[i] for i in layout.select("fibrosis", top, bottom)], [LABEL["fibrosis"]])
    tubules = [layout.tubules[i] for i in layout.select("tubules", top, bottom)]
    canvas.fill([t.outer for t in tubules if not t.atrophic], [LABEL["tubule"]])
    canvas.fill([t.outer for t in tubules if t.atrophic], [LABEL["atrophic_tubule"]])
    # The artery is its visible wall and lumen; the adventitia, drawn almost like interstitium, is tissue.
    canvas.fill([layout.arteries[i].media for i in layout.select("arteries", top, bottom)], [LABEL["artery"]])
    both = Canvas([labels, instances], x0, y0, scale, exact=True)
    for i in layout.select("glomeruli", top, bottom):
        g = layout.glomeruli[i]
        canvas.fill([g.capsule], [LABEL["tissue"]])
        both.fill([g.tuft], [LABEL["tuft"], g.glomerulus_id])
        if g.crescent is not None:
            both.fill([g.crescent], [LABEL[g.crescent_kind], g.glomerulus_id])
        if g.sclerosis is not None:
            canvas.fill([g.sclerosis], [LABEL["sclerosis"]])
        if len(g.wire_loops):
            canvas.circles(g.wire_loops, [LABEL["hyaline_deposit"]], thickness_px=g.wire_loops[:, 3])
        if len(g.thrombi):
            canvas.circles(g.thrombi, [LABEL["hyaline_deposit"]])
    return labels, instances
