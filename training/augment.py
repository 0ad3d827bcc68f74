"""The augmentation pipeline: albumentations transforms listed in the config, applied to image + mask.

Each config entry names an albumentations transform and its arguments, e.g.::

    augment:
      - {transform: D4}                                # flips and rot90
      - {transform: Affine, scale: [0.8, 1.25], rotate: [-180, 180], fill: 255, fill_mask: 255, p: 0.5}
      - {transform: HEStain, method: random_preset, p: 0.5}   # stain jitter in HED space
      - {transform: HueSaturationValue, hue_shift_limit: 10, p: 0.5}
      - {transform: RandomBrightnessContrast, p: 0.5}
      - {transform: RandomGamma, p: 0.3}
      - {transform: GaussianBlur, sigma_limit: [0.1, 1.2], p: 0.2}
      - {transform: GaussNoise, std_range: [0.01, 0.05], p: 0.2}
      - {transform: ImageCompression, quality_range: [50, 95], p: 0.2}

Masks are resampled nearest-neighbour; give geometric transforms ``fill_mask: 255`` so pixels
from outside the patch are ignored by the loss.
"""

import inspect

import albumentations as A

from biopsy.errors import ConfigError


def build_augmentation(entries: list[dict], source: str) -> A.Compose:
    """An albumentations pipeline from config entries; :class:`ConfigError` for a bad entry."""
    transforms = []
    for index, entry in enumerate(entries):
        where = f"{source}: augment[{index}]"
        arguments = dict(entry)
        name = arguments.pop("transform", None)
        kind = getattr(A, name, None) if isinstance(name, str) else None
        if not (inspect.isclass(kind) and issubclass(kind, A.BasicTransform)):
            raise ConfigError(f"{where}: 'transform' must name an albumentations transform, got {name!r}")
        accepted = inspect.signature(kind).parameters
        unknown = sorted(set(arguments) - set(accepted))
        if unknown:
            raise ConfigError(f"{where}: {name} has no argument {unknown[0]!r} "
                              f"(accepted: {', '.join(accepted)})")
        arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
        try:
            transforms.append(kind(**arguments))
        except (ValueError, TypeError) as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"{where}: invalid arguments for {name} ({first_line})") from error
    return A.Compose(transforms)
