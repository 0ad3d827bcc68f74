"""Write files so that they are complete or absent: write to a temporary name, then rename."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix of ``path`` (``.tmp-<pid>.ome.tif``) so that writers that
    choose their format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def remove_temporaries(folder: str | Path) -> None:
    """Remove what a killed writer left in ``folder``: :func:`atomic_path`'s temporary files and
    :mod:`biopsy.pyramid`'s spool folders (hidden names: ``.<name>.tmp-<pid>...``,
    ``.<name>.spool-...``)."""
    for leftover in Path(folder).glob(".*"):
        if ".tmp-" in leftover.name and leftover.is_file():
            leftover.unlink(missing_ok=True)
        elif ".spool-" in leftover.name and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
