"""Where the bundled configuration files are.

In a checkout (and an editable install) they are the repository's top-level ``configs/``; a wheel
ships the same files as ``biopsy/configs/`` (see ``[tool.setuptools.package-dir]`` in pyproject).
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

CONFIG_DIR: Path = next(
    (candidate for candidate in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")
     if candidate.is_dir()),
    _PACKAGE_DIR.parent / "configs",
)
