"""What an output records about where it came from: file hashes and package versions."""

import configparser
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


# Keys of a Hamamatsu VMS / VMU index that name its data files ("ImageFile(x,y)" for the rest of
# a mosaic of JPEGs), as OpenSlide's hamamatsu reader takes them.
HAMAMATSU_FILE_KEYS = ("ImageFile", "MapFile", "OptimisationFile", "MacroImage")


def slide_files(path: str | Path) -> list[Path]:
    """The files that hold a slide: the file itself and, where it is a small index to others,
    the files that hold its pixels: for MIRAX (``.mrxs``) the files of the folder of the same
    name beside it, for Hamamatsu VMS / VMU (``.vms``, ``.vmu``) those its keys name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mrxs":
        return [path] + _mirax_files(path)
    if suffix in (".vms", ".vmu"):
        return [path] + _hamamatsu_files(path)
    return [path]


def _mirax_files(index: Path) -> list[Path]:
    folder = index.with_suffix("")
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _hamamatsu_files(index: Path) -> list[Path]:
    """The existing files named, relative to the index's folder, under :data:`HAMAMATSU_FILE_KEYS`
    (none where the index is not a key file: opening the slide reports that). Lines are read
    as a key file reader reads them: indented or not, those that are not "key=value" skipped."""
    keys = configparser.ConfigParser(interpolation=None, strict=False)
    keys.optionxform = str  # keys are case-sensitive
    try:
        text = index.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        keys.read_string("\n".join(line.strip() for line in text.splitlines()))
    except configparser.ParsingError:
        pass  # raised after reading every line: the good ones are in
    except (configparser.Error, OSError):
        return []
    named = {index.parent / value for section in keys.sections()
             for key, value in keys.items(section) if key.split("(")[0] in HAMAMATSU_FILE_KEYS}
    return sorted(p for p in named if _is_file(p))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, a folder not readable
        return False


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
