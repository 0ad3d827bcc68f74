"""Write files so that they are complete or absent: write to a temporary name, then rename."""

import os
import re
import shutil
from collections.abc import Sequence
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
    stem, suffix = _stem_and_suffix(path)
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


def remove_temporaries(folder: str | Path, names: Sequence[str]) -> None:
    """Remove what writers of the files ``names`` in ``folder`` left when killed: their
    :func:`atomic_path` temporaries and :mod:`biopsy.pyramid`'s spool folders, each named with
    the process id of its writer (``.<stem>.tmp-<pid><suffix>``, ``.<name>.spool-<pid>-...``),
    where that process has ended."""
    folder = Path(folder)
    for name in names:
        stem, suffix = _stem_and_suffix(Path(name))
        patterns = (rf"\.{re.escape(stem)}\.tmp-(\d+){re.escape(suffix)}",
                    rf"\.{re.escape(name)}\.spool-(\d+)-.*")
        for leftover in folder.glob(".*"):
            match = next((m for p in patterns if (m := re.fullmatch(p, leftover.name))), None)
            if match is None or _is_running(int(match.group(1))):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _stem_and_suffix(path: Path) -> tuple[str, str]:
    """``labels.ome.tif`` -> (``labels``, ``.ome.tif``)."""
    suffix = "".join(path.suffixes)
    return (path.name[: len(path.name) - len(suffix)] if suffix else path.name), suffix
