"""The synthetic training set: ``python -m training synth CONFIG`` writes it into ``data.root``.

Slide ``i`` is ``biopsy synth`` with preset ``presets[i % len(presets)]``, stain
``stains[i % len(stains)]``, seed ``first_seed + i`` and the config's profile overrides, in folder
``synth-<seed>-<stain>`` (its case id; the stain for ``data.stain_pattern``). Folders already
complete (``truth.json`` present) are kept, so an interrupted run resumes.
"""

from pathlib import Path

from tqdm import tqdm

from biopsy.errors import ConfigError
from biopsy.synth import generate_slide, load_profile
from training.config import Config


def generate_training_set(config: Config, root: str | Path | None = None, first_seed: int | None = None,
                          slides: int | None = None) -> list[Path]:
    """Generate the slides (``root``, ``first_seed``, ``slides`` override the config, e.g. for a
    held-out test set) and return their folders."""
    if config.synth is None:
        raise ConfigError(f"{config.source}: no 'synth' section; this config does not describe a "
                          "synthetic training set")
    root = Path(root or config.data.root)
    first_seed = config.synth.first_seed if first_seed is None else first_seed
    count = config.synth.slides if slides is None else slides
    folders = []
    for i in tqdm(range(count), desc="synth", unit="slide"):
        stain = config.synth.stains[i % len(config.synth.stains)]
        folder = root / f"synth-{first_seed + i}-{stain}"
        if not (folder / "truth.json").is_file():
            preset = config.synth.presets[i % len(config.synth.presets)]
            profile = load_profile(None, preset, seed=first_seed + i,
                                   **{**config.synth.profile, "stain": stain})
            generate_slide(profile, folder)
        folders.append(folder)
    return folders
