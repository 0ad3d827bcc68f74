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


USER_ERRORS = (BiopsyError, OSError)  # what the command-line tools report on one line


def user_message(error: Exception) -> str:
    """The error's one-line text; for the file system's, the file first: ``PATH: No space left on
    device``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)
