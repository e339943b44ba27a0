"""Error hierarchy of the pipeline.

Every error a user can cause (a bad path, a corrupt slide, a missing mpp, a malformed table) is a
:class:`PathologyError`. Subclasses also inherit the matching built-in type, so callers that catch
``FileNotFoundError`` or ``ValueError`` keep working. Messages are one line: the file or value, what was
expected, and the fix.
"""

from __future__ import annotations

import os

__all__ = [
    "ConfigError",
    "CorruptSlideError",
    "EmptySlideError",
    "MissingMppError",
    "NotASlideError",
    "OutputExistsError",
    "PathologyError",
    "SlideError",
    "SlideNotFoundError",
    "TileReadError",
]


class PathologyError(Exception):
    """Base class of every error the pipeline raises on bad input or bad configuration."""


class SlideError(PathologyError):
    """A slide file cannot be used. ``path`` is the file concerned."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[SlideError], tuple[str, str]]:
        # Rebuild from (path, problem), not from args: errors cross process boundaries (Dask).
        return (type(self), (self.path, self.problem))


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The path does not exist (or is a directory that is not a slide)."""


class EmptySlideError(SlideError, ValueError):
    """The file exists but has zero bytes (an interrupted copy or download)."""


class NotASlideError(SlideError, ValueError):
    """The file is not a format OpenSlide or the image readers understand."""


class CorruptSlideError(SlideError, ValueError):
    """The file claims a slide format but its contents cannot be read."""


class MissingMppError(SlideError, ValueError):
    """The slide records no usable pixel size and the caller gave none."""


class TileReadError(SlideError, OSError):
    """A region of an otherwise valid slide cannot be decoded."""


class ConfigError(PathologyError, ValueError):
    """A configuration file or value is invalid."""


class OutputExistsError(PathologyError, FileExistsError):
    """An output already exists and would be overwritten; pass ``--overwrite`` to replace it."""
