"""Stains as colours of materials, per-slide variation, and drift between a patient's biopsies.

The renderer draws densities of five materials (cytoplasm, PAS-positive matrix such as basement
membranes and mesangium, collagen, hyaline, nuclear chromatin). A stain gives each material the
RGB it shows at density 1 on white glass; colours mix by Beer-Lambert (optical densities add).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MATERIALS = ("cytoplasm", "matrix", "collagen", "hyaline", "nuclei")


@dataclass(frozen=True)
class Stain:
    """RGB of each material at density 1 (``MATERIALS`` order) and of the bare glass."""

    name: str
    colours: tuple[tuple[float, float, float], ...]
    glass_rgb: tuple[float, float, float] = (246.0, 245.0, 247.0)

    def optical_density(self) -> np.ndarray:
        """(5, 3) float32 optical density per material and RGB channel."""
        return (-np.log(np.clip(np.asarray(self.colours, np.float64), 1, 255) / 255)).astype(np.float32)

    def glass_density(self) -> np.ndarray:
        return (-np.log(np.asarray(self.glass_rgb, np.float64) / 255)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"name": self.name, "glass_rgb": [round(c, 1) for c in self.glass_rgb],
                "colours": {m: [round(c, 1) for c in rgb] for m, rgb in zip(MATERIALS, self.colours)}}


PRESETS = {
    # Periodic acid-Schiff with haematoxylin: magenta basement membranes, mesangium and
    # sclerosis; pale pink-violet cytoplasm; faint interstitial collagen; blue-violet nuclei.
    "pas": Stain("pas", ((214, 170, 214), (172, 52, 156), (228, 206, 228), (206, 66, 178),
                         (78, 66, 138))),
    # Haematoxylin and eosin: pink cytoplasm, pale pink membranes and collagen, bright glassy
    # eosinophilic hyaline, blue nuclei.
    "he": Stain("he", ((236, 150, 190), (226, 128, 176), (242, 196, 218), (232, 96, 160),
                       (70, 62, 140))),
    # Masson trichrome: red cytoplasm, blue basement membranes and collagen, red (fuchsinophilic)
    # hyaline, dark nuclei.
    "trichrome": Stain("trichrome", ((206, 96, 120), (120, 140, 210), (150, 176, 226),
                                     (200, 50, 80), (62, 52, 82))),
}


def vary_stain(stain: Stain, rng: np.random.Generator, amount: float = 1.0) -> Stain:
    """The same stain as another lab day shows it: each material's intensity and the colour
    balance shifted at random (scale of the shifts: ``amount``)."""
    density = stain.optical_density()
    intensity = np.exp(rng.normal(0, 0.12 * amount, (len(MATERIALS), 1)))
    balance = np.exp(rng.normal(0, 0.05 * amount, (1, 3)))
    return _with_density(stain, density * intensity * balance)


def drift_stain(stain: Stain, rng: np.random.Generator) -> Stain:
    """A follow-up biopsy stained years later: haematoxylin stronger or weaker, the main stain
    (PAS / eosin / trichrome) fainter, the colour balance cooler or warmer: one consistent shift."""
    density = stain.optical_density()
    nuclei = rng.uniform(0.85, 1.2)
    main = rng.uniform(0.7, 0.9)
    factors = np.array([main, main, main, main, nuclei], np.float32)[:, None]
    balance = np.exp(np.array([rng.normal(0, 0.06), 0.0, rng.normal(0, 0.06)]))[None, :]
    return _with_density(stain, density * factors * balance)


def _with_density(stain: Stain, density: np.ndarray) -> Stain:
    colours = 255 * np.exp(-density)
    return Stain(stain.name, tuple(tuple(float(c) for c in rgb) for rgb in colours), stain.glass_rgb)
