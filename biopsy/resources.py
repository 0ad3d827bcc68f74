"""The bundled configuration files: where they are, and reading a YAML config.

In a checkout (and an editable install) they are the repository's top-level ``configs/``; a wheel
ships the same files as ``biopsy/configs/`` (see ``[tool.setuptools.package-dir]`` in pyproject).
"""

from pathlib import Path

import yaml

from biopsy.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent

CONFIG_DIR: Path = next(
    (candidate for candidate in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")
     if candidate.is_dir()),
    _PACKAGE_DIR.parent / "configs",
)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping at the top of a YAML file; :class:`ConfigError` naming ``path`` otherwise.

    ``what`` says what the file is for in messages ("scoring config", "lesion profile").
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read {what}: no such file; give an existing YAML file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what} ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]}); "
                          f"fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping of keys to values")
    return data
