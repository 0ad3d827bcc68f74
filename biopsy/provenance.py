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


def slide_files(path: str | Path) -> list[Path]:
    """The files that hold a slide: the file itself and, for a MIRAX slide (``.mrxs``), the files
    of the folder of the same name beside it, which hold its pixels (the ``.mrxs`` is a small
    index)."""
    path = Path(path)
    folder = path.with_suffix("")
    if path.suffix.lower() != ".mrxs" or not folder.is_dir():
        return [path]
    return [path] + sorted(p for p in folder.iterdir() if p.is_file())


def slide_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a slide: its file's (:func:`file_sha256`); for a slide of several files
    (:func:`slide_files`), that of a text of lines: the index's SHA-256, then "<name> <SHA-256>"
    for each data file, named within its folder so that a slide renamed whole keeps its hash."""
    index, *data = slide_files(path)
    if not data:
        return file_sha256(index)
    lines = [file_sha256(index)] + [f"{p.name} {file_sha256(p)}" for p in data]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def file_identity(path: str | Path) -> dict:
    """What tells cheaply that a file (or a slide of several, :func:`slide_files`) is unchanged:
    its resolved path, size and latest modification time."""
    stats = [p.stat() for p in slide_files(path)]
    return {"path": str(Path(path).resolve()), "size_bytes": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats)}


def is_same_file(source: dict, path: str | Path) -> bool:
    """Whether ``path`` holds the bytes that an output's ``source`` provenance (``path``,
    ``size_bytes``, ``mtime_ns``, ``sha256``) was made from: when path, size and time all match,
    without reading it; otherwise by SHA-256 (:func:`slide_sha256`), so a moved or copied file
    still matches."""
    identity = file_identity(path)
    if all(source.get(key) == value for key, value in identity.items()):
        return True
    if source.get("size_bytes", identity["size_bytes"]) != identity["size_bytes"]:
        return False
    return source.get("sha256") == slide_sha256(path)


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
