"""Synthetic renal biopsy slides with exact ground truth (``biopsy synth``).

``generate_slide(profile, out_dir)`` writes one slide folder, ``generate_pair(...)`` a synthetic
patient's baseline and follow-up; ``load_profile(path, preset, **overrides)`` resolves a profile.
"""

from biopsy.synth.profile import LesionProfile, load_profile, preset_names
from biopsy.synth.slide import generate_pair, generate_slide

__all__ = ["LesionProfile", "generate_pair", "generate_slide", "load_profile", "preset_names"]
