"""pathology: whole-slide IHC scoring from OpenSlide to patient strata.

The public surface is small and light to import; stage modules import torch, dask and zarr lazily.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pathology")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from pathology.errors import MissingMppError, PathologyError
from pathology.slide import SlideInfo, SlideReader, open_slide

__all__ = [
    "MissingMppError",
    "PathologyError",
    "SlideInfo",
    "SlideReader",
    "__version__",
    "open_slide",
]
