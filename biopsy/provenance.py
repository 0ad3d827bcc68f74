"""What an output records about where it came from: file hashes and package versions."""

import hashlib
import importlib.metadata
import json
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def recipe_sha256(recipe: dict) -> str:
    """Hex SHA-256 of a JSON-ready dict, independent of key order: a fingerprint of how an
    output was made, recorded in its provenance so that a rerun can tell whether it may reuse it."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
