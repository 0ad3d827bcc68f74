"""The ``biopsy`` command: a thin layer over library functions.

Each sub-command lives in its own module with ``add_parser(subparsers)`` that registers it and sets
``func``. Errors the user can cause (:data:`biopsy.errors.USER_ERRORS`: ours, and the file system's)
are printed on one line and exit with status 2; nothing else is caught.
"""

import argparse
import functools
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from biopsy import __version__
from biopsy.errors import USER_ERRORS, user_message

COMMAND_MODULES = ["info", "tissue", "score", "batch", "compare", "segment", "calibrate", "synth",
                   "demo", "restain"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biopsy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"biopsy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"biopsy.cli.{name}").add_parser(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, SLURM, ``docker stop``), unwound as Ctrl-C is, so that the partial
    outputs a command was writing are removed."""


def _terminate(main_pid: int, signal_number: int, frame) -> None:
    if os.getpid() != main_pid:  # a forked worker inherited the handler: end as SIGTERM does
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)
    raise Terminated


def _first_missing(path: Path | None) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (None: ``path`` exists, or
    is None)."""
    missing = None
    for folder in () if path is None else (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_made_folders(out: Path, first_made: Path | None) -> None:
    """The output folder, or the output file's folders, and their parents that a failed or
    stopped command made, where they hold nothing."""
    if first_made is None:
        return
    for folder in (out, *out.parents):
        if folder.is_dir():
            if any(folder.iterdir()):
                return
            folder.rmdir()
        elif folder.exists():  # a file
            return
        if folder == first_made:
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    handling = (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN)
    if handling:
        previous = signal.signal(signal.SIGTERM, functools.partial(_terminate, os.getpid()))
    out = getattr(args, "out", None)  # where it points: the parents of x/../keep/new are not keep's
    out = Path(os.path.realpath(out)) if isinstance(out, Path) else None
    first_made = _first_missing(out)
    try:
        return args.func(args) or 0
    except USER_ERRORS as error:
        if (message := user_message(error)) is None:
            raise
        print(f"biopsy {args.command}: error: {message}", file=sys.stderr)
        _remove_made_folders(out, first_made)
        return 2
    except KeyboardInterrupt as interrupt:
        _remove_made_folders(out, first_made)
        terminated = isinstance(interrupt, Terminated)
        print(f"biopsy {args.command}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if handling:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
