"""Errors a user can cause. The CLI prints their message on one line and exits non-zero.

Each message names the file (or setting) at fault and, where there is one, the fix. The file
system's errors (``OSError``: an output folder that cannot be made, a full disk) are the user's
too: :data:`USER_ERRORS`.
"""


class BiopsyError(Exception):
    """Base of every error caused by input the user gave, not by a bug."""


class SlideError(BiopsyError):
    """A slide file that is missing, unreadable, truncated or of an unsupported format."""


class MppError(SlideError):
    """A slide whose pixel size (µm/px) is neither in its metadata nor given by the user."""


class TissueError(SlideError):
    """A slide (or label map) in which no tissue is found: nothing to score."""


class ConfigError(BiopsyError):
    """A YAML configuration that is missing, malformed or holds an invalid value."""


class AnnotationError(BiopsyError):
    """A malformed annotation file: GeoJSON, COCO JSON or label map."""


class CheckpointError(BiopsyError):
    """A model checkpoint that is missing, of another format, or that does not fit the slide."""


class DeviceError(BiopsyError):
    """A torch device (--device) that is not one, or not on this machine."""


class ManifestError(BiopsyError):
    """A malformed batch manifest: missing column, unknown timepoint, duplicate row, missing file."""


USER_ERRORS = (BiopsyError, OSError)  # what the command-line tools may report on one line


def user_message(error: BaseException) -> str | None:
    """The one-line message of an error the user caused: ours, or the file system's (``PATH:
    reason``, the destination of a rename; the reason alone where no path is known: a full
    disk). None for any other, a bug's, whose traceback is kept: an ``OSError`` without an error
    number is not the file system's (a DataLoader worker's error, raised again)."""
    if isinstance(error, BiopsyError):
        return str(error)
    if isinstance(error, OSError) and error.errno is not None:
        path = error.filename2 if error.filename2 is not None else error.filename
        reason = error.strerror or str(error)
        return reason if path is None else f"{path}: {reason}"
    return None
