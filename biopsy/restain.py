"""A slide re-stained and rotated: the same tissue as another staining run and orientation show it.

Scores must not depend on stain intensity or on how the section lies on the glass (SCORING.md,
pre/post comparison). :func:`restain_slide` writes a copy of a brightfield slide turned by quarter
turns and with a :class:`StainShift` applied, as a pyramidal tiled TIFF with its pixel size, so
that ``biopsy score`` reads it like any slide. It streams row bands of the output (each a strip
of the source), so memory holds one band, never the slide.

Geometry: ``quarter_turns = k`` turns the image as ``numpy.rot90(image, k)``, counter-clockwise on
screen; the source level-0 pixel ``(x, y)`` of a ``width x height`` slide lands on
``(y, width - 1 - x)`` for one turn, ``(width - 1 - x, height - 1 - y)`` for two,
``(height - 1 - y, x)`` for three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from skimage.color import hed_from_rgb, hsv2rgb, rgb2hsv, rgb_from_hed

from biopsy.errors import SlideError
from biopsy.pyramid import write_pyramid
from biopsy.slide import BRIGHTFIELD_CHANNELS, Slide, open_slide, require_square_pixels

STYLES = {".svs": "aperio", ".ome.tif": "ome", ".ome.tiff": "ome", ".tif": "generic",
          ".tiff": "generic"}  # by suffix, the longer ones first
# each 8-bit level's optical density, -ln(level / 255), level 0 read as 1 (float32)
DENSITY_OF_LEVEL = (-np.log(np.maximum(np.arange(256), 1) / 255)).astype(np.float32)
_CHUNK_PX = 4096  # columns of a band re-coloured at a time (bounds the float copies)


@dataclass(frozen=True)
class StainShift:
    """A fixed stain change: each stain's amount scaled, then the hue turned.

    ``haematoxylin``, ``eosin`` and ``dab`` multiply the concentrations of the HED colour
    deconvolution (Ruifrok & Johnston 2001, scikit-image's ``rgb_from_hed``): 0.8 is 20 % fainter,
    1.2 20 % stronger. Other stains fall on these axes too: PAS magenta mostly on eosin, trichrome
    blue on haematoxylin, eosin pink and trichrome red on eosin and DAB. ``hue_deg`` turns the
    HSV hue by that many degrees. Unstained glass (pure white) stays white; near-white glass stays
    near white.
    """

    haematoxylin: float = 1.0
    eosin: float = 1.0
    dab: float = 1.0
    hue_deg: float = 0.0

    def __post_init__(self) -> None:
        for name in ("haematoxylin", "eosin", "dab"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"StainShift.{name} must be a non-negative factor, got {value}")
        if not np.isfinite(self.hue_deg):
            raise ValueError(f"StainShift.hue_deg must be a number of degrees, got {self.hue_deg}")

    def density_matrix(self) -> np.ndarray:
        """(3, 3) map of optical density row vectors: ``od_shifted = od @ matrix``.

        The concentrations are ``od @ hed_from_rgb`` (up to scikit-image's constant log factor,
        which cancels); scaled and recombined with ``rgb_from_hed``. Done here without
        scikit-image's ``rgb2hed``, which clips negative concentrations, so that a shift of 1 is
        exactly the identity.
        """
        scales = np.diag([self.haematoxylin, self.eosin, self.dab])
        return hed_from_rgb @ scales @ rgb_from_hed

    @property
    def is_identity(self) -> bool:
        """Whether the shift leaves every pixel as it is."""
        return (self.haematoxylin, self.eosin, self.dab, self.hue_deg % 360) == (1, 1, 1, 0)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """The shifted copy of an (..., 3) uint8 RGB image."""
        if self.is_identity:
            return rgb.copy()
        density = -np.log(np.maximum(rgb, 1).astype(np.float32) / 255)
        shifted = np.exp(-(density @ self.density_matrix().astype(np.float32)))  # 0..1
        shifted = np.clip(shifted, 0, 1)
        if self.hue_deg % 360:
            hsv = rgb2hsv(shifted)
            hsv[..., 0] = (hsv[..., 0] + self.hue_deg / 360) % 1
            shifted = hsv2rgb(hsv)
        return np.rint(shifted * 255).astype(np.uint8)


def rotated_xy(x: float, y: float, dimensions: tuple[int, int], quarter_turns: int) -> tuple[float, float]:
    """Where level-0 pixel ``(x, y)`` of a slide of ``dimensions = (width, height)`` lands after
    ``quarter_turns`` (see module docstring)."""
    width, height = dimensions
    turns = quarter_turns % 4
    if turns == 1:
        return y, width - 1 - x
    if turns == 2:
        return width - 1 - x, height - 1 - y
    if turns == 3:
        return height - 1 - y, x
    return x, y


def restain_slide(source: str | Path, destination: str | Path, shift: StainShift = StainShift(), *,
                  quarter_turns: int = 0, mpp: float | None = None, band_px: int = 256,
                  compression: str = "jpeg", quality: int = 90) -> None:
    """Write ``destination``: ``source`` turned by ``quarter_turns`` with ``shift`` applied.

    The format follows the suffix: ``.svs`` (Aperio style), ``.tif``/``.tiff`` (generic tiled
    TIFF) or ``.ome.tif`` (pyramidal OME-TIFF); complete or absent. The pyramid is rebuilt from
    level 0; the pixel size is the source's (``mpp`` overrides it), x and y swapped by odd turns.

    Raises
    ------
    SlideError : unreadable source, not a brightfield RGB slide, destination of another format or
        the source itself.
    MppError : pixel size unknown, or pixels not square.
    """
    source, destination = Path(source), Path(destination)
    style = _style(destination)
    if destination.resolve() == source.resolve():
        raise SlideError(f"{destination}: is the source slide; write the copy to another path")
    with open_slide(source, mpp=mpp) as slide:
        if slide.channel_names != BRIGHTFIELD_CHANNELS or slide.dtype != np.uint8:
            raise SlideError(f"{source}: restaining needs a brightfield 8-bit RGB slide, this one "
                             f"has channels {slide.channel_names} ({slide.dtype})")
        require_square_pixels(slide, "the restained copy")
        width, height = slide.dimensions
        shape_px = (width, height) if quarter_turns % 2 else (height, width)
        record = {"restained_from": source.name, "quarter_turns": quarter_turns % 4,
                  "stain_shift": asdict(shift)}
        write_pyramid(destination, _bands(slide, shift, quarter_turns, band_px), shape_px, slide.mpp[0],
                      style=style, compression=compression, quality=quality,
                      description_extra=_description(style, record))


def _bands(slide: Slide, shift: StainShift, quarter_turns: int, band_px: int):
    """Row bands of the turned, shifted slide: each read as one strip of the source's level 0."""
    width, height = slide.dimensions
    turns = quarter_turns % 4
    out_height = width if turns % 2 else height
    for top in range(0, out_height, band_px):
        rows = min(band_px, out_height - top)
        if turns == 0:
            strip = slide.read_level(0, 0, top, width, rows)
        elif turns == 1:
            strip = slide.read_level(0, width - top - rows, 0, rows, height)
        elif turns == 2:
            strip = slide.read_level(0, 0, height - top - rows, width, rows)
        else:
            strip = slide.read_level(0, top, 0, rows, height)
        band = np.rot90(strip, turns)
        yield np.concatenate([shift.apply(band[:, left:left + _CHUNK_PX])
                              for left in range(0, band.shape[1], _CHUNK_PX)], axis=1)


def _style(destination: Path) -> str:
    name = destination.name.lower()
    for suffix, style in STYLES.items():
        if name.endswith(suffix):
            return style
    raise SlideError(f"{destination}: unknown output format; name it .svs, .tif or .ome.tif")


def _description(style: str, record: dict) -> dict:
    """The transform, recorded in the output's metadata in the style's own form."""
    if style == "aperio":
        text = json.dumps(record).replace("|", "/")  # "|" separates the Aperio fields
        return {"Title": f"{record['restained_from']} restained", "Restain": text}
    if style == "generic":
        return record
    return {"Description": json.dumps(record)}
