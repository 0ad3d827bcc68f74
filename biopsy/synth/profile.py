"""Lesion profiles: what a synthetic slide shows, as fractions of glomeruli and of cortex.

A profile is plain data (YAML and CLI flags). Lesion fractions are exact counts over the slide's
glomeruli (rounded), so a profile with 40 % global sclerosis over 20 glomeruli draws 8 of them.
Presets live in ``configs/synth/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path


from biopsy.errors import ConfigError
from biopsy.resources import CONFIG_DIR, read_yaml_mapping

PRESET_DIR = CONFIG_DIR / "synth"
STAINS = ("pas", "he", "trichrome")
GLOMERULAR_FRACTIONS = ("global_sclerosis", "segmental_sclerosis", "cellular_crescent",
                        "fibrous_crescent", "hyaline_deposit", "endocapillary_hypercellularity")


@dataclass(frozen=True)
class LesionProfile:
    """Everything that decides a synthetic slide, besides the code.

    Fractions are of glomeruli (0..1); ``deposit_burden`` is the deposit area as a fraction of the
    tuft of each affected glomerulus; ``fibrosis_percent`` and ``atrophy_percent`` are the targets
    for interstitial fibrosis (% of tubulointerstitial cortex) and tubular atrophy (% of tubular
    area), met to within a few percent (the truth reports the exact values). Fibrosis widens the
    interstitium around atrophic tubules, so fibrosis far above atrophy cannot be met: with no
    atrophy the interstitium between normal tubules caps it near 20 %.

    ``endocapillary_hypercellularity`` is a fraction of the glomeruli (none globally sclerosed):
    their tufts hold about 2.5 times the normal nuclei, many inside narrowed capillary lumina.
    ``inflammation_percent`` is the share of the cortex covered by patches of dense mononuclear
    infiltrate in the interstitium. The truth scores both from the drawn nuclei with the shared
    nuclear-density functions, so its percentages differ from these targets by tile granularity.
    """

    name: str = "custom"
    glomeruli: int = 20
    global_sclerosis: float = 0.0
    segmental_sclerosis: float = 0.0
    cellular_crescent: float = 0.0
    fibrous_crescent: float = 0.0
    hyaline_deposit: float = 0.0
    endocapillary_hypercellularity: float = 0.0
    deposit_burden: float = 0.08
    fibrosis_percent: float = 10.0
    atrophy_percent: float = 10.0
    inflammation_percent: float = 0.0
    cores: int = 1
    core_length_mm: float = 6.0
    core_width_mm: float = 1.0
    stain: str = "pas"
    seed: int = 0
    mpp: float = 0.5
    label_mpp: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.glomeruli < 0:
            problems.append("glomeruli must be >= 0")
        for name in GLOMERULAR_FRACTIONS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be a fraction between 0 and 1")
        if self.global_sclerosis + self.segmental_sclerosis > 1.0:
            problems.append("global_sclerosis + segmental_sclerosis must not exceed 1")
        if self.global_sclerosis + self.cellular_crescent + self.fibrous_crescent > 1.0 + 1e-9:
            problems.append("global_sclerosis + cellular_crescent + fibrous_crescent must not exceed 1 "
                            "(one crescent per glomerulus, none on a globally sclerosed one)")
        if self.global_sclerosis + self.endocapillary_hypercellularity > 1.0 + 1e-9:
            problems.append("global_sclerosis + endocapillary_hypercellularity must not exceed 1")
        if self.global_sclerosis + self.hyaline_deposit > 1.0 + 1e-9:
            problems.append("global_sclerosis + hyaline_deposit must not exceed 1")
        if not 0.02 <= self.deposit_burden <= 0.4:
            problems.append("deposit_burden must be between 0.02 and 0.4")
        for name in ("fibrosis_percent", "atrophy_percent", "inflammation_percent"):
            if not 0.0 <= getattr(self, name) <= 80.0:
                problems.append(f"{name} must be between 0 and 80")
        if not 1 <= self.cores <= 3:
            problems.append("cores must be 1, 2 or 3")
        if not 0.5 <= self.core_length_mm <= 60.0 or not 0.4 <= self.core_width_mm <= 2.0:
            problems.append("core_length_mm must be 0.5..60 and core_width_mm 0.4..2")
        if self.stain not in STAINS:
            problems.append(f"stain must be one of {', '.join(STAINS)}")
        if self.mpp not in (0.25, 0.5) or self.label_mpp not in (1.0, 2.0):
            problems.append("mpp must be 0.25 or 0.5 and label_mpp 1.0 or 2.0")
        if problems:
            raise ConfigError(f"lesion profile {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_profile(path: str | Path | None = None, preset: str | None = None,
                 **overrides) -> LesionProfile:
    """A profile from a preset name and/or a YAML file, then ``overrides`` (None values ignored).

    The YAML file is merged over the preset, so it only needs the keys it changes.
    """
    values: dict = {}
    if preset is not None:
        preset_path = PRESET_DIR / f"{preset}.yaml"
        if not preset_path.is_file():
            raise ConfigError(f"no synthetic preset {preset!r}; choose one of {', '.join(preset_names())}")
        values |= read_yaml_mapping(preset_path, "lesion profile")
    if path is not None:
        values |= read_yaml_mapping(Path(path), "lesion profile")
    values |= {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(LesionProfile)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path or preset}: unknown profile key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(known))}")
    for field in fields(LesionProfile):  # "many" glomeruli failed as "'<' not supported ..."
        value = values.get(field.name, field.default)
        if field.type in ("int", "float") and (isinstance(value, bool) or not isinstance(
                value, int if field.type == "int" else (int, float))):
            raise ConfigError(f"{path or preset}: {field.name} must be a "
                              f"{'whole number' if field.type == 'int' else 'number'}, got {value!r}")
    try:
        return LesionProfile(**values)
    except TypeError as error:
        raise ConfigError(f"{path or preset}: {error}") from None
