"""Reading output tiles from a slide: one reader per worker, block means or antialiased resampling.

The tiler's hot path. A tile is read at the grid's pyramid level and reduced to the target
resolution: an exact ``k x k`` block mean when the grid is snapped (the usual case), else an
antialiased resize over the exact fractional source box.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology.slide import SlideReader, block_mean, open_slide
from pathology.tiling._grid import TileGrid

__all__ = ["ReaderSpec", "render_tile", "worker_reader"]


@dataclass(frozen=True)
class ReaderSpec:
    """How a worker opens the slide (picklable, so process workers can open their own handle).

    Attributes
    ----------
    path : str
        Slide file.
    slide_mpp : float or None
        Override of the scan's pixel size.
    direct : bool
        Read TIFF-family slides straight from their tiles (see ``_direct``) instead of OpenSlide.
    """

    path: str
    slide_mpp: float | None = None
    direct: bool = False


_local = threading.local()


def worker_reader(spec: ReaderSpec) -> Any:
    """The calling thread's (or process's) open reader for ``spec``: opened once, then reused.

    One handle per worker thread: OpenSlide handles are safe to share, but a handle reopened after a
    damaged tile (see :class:`~pathology.slide.OpenSlideReader`) must not pull the rug from under
    another thread's read, and the direct TIFF reader keeps per-handle decode state.
    """
    cache: dict[ReaderSpec, Any] | None = getattr(_local, "readers", None)
    if cache is None:
        cache = _local.readers = {}
    reader = cache.get(spec)
    if reader is None:
        reader = open_reader(spec)
        cache[spec] = reader
    return reader


def open_reader(spec: ReaderSpec) -> Any:
    """Open the reader ``spec`` describes (OpenSlide, or the direct TIFF path over it)."""
    base = open_slide(spec.path, mpp=spec.slide_mpp)
    if spec.direct:
        from pathology.tiling._direct import DirectTiffReader

        return DirectTiffReader(Path(spec.path), base)
    return base


def render_tile(
    reader: SlideReader, grid: TileGrid, out_xywh: tuple[int, int, int, int]
) -> NDArray[np.uint8]:
    """Pixels of one output box at the grid's resolution.

    Parameters
    ----------
    reader : SlideReader
        An open slide.
    grid : TileGrid
        The grid (level, factor) to render with.
    out_xywh : (x, y, w, h)
        Box in output pixels; may leave the image (outside reads as white glass).

    Returns
    -------
    ndarray (h, w, 3) uint8
    """
    x, y, w, h = (int(v) for v in out_xywh)
    l0_xy, level_size, src_box = grid.level_region((x, y, w, h))
    if grid.snapped:
        k = int(grid.factor)
        if hasattr(reader, "read_region_reduced"):
            return reader.read_region_reduced(l0_xy, grid.level, level_size, k)
        return block_mean(reader.read_region(l0_xy, grid.level, level_size), k)
    region = reader.read_region(l0_xy, grid.level, level_size)
    from PIL import Image

    # Antialiased reduction over the exact fractional box (Pillow widens the filter support by
    # the reduction factor, so this does not alias).
    resized = Image.fromarray(region).resize((w, h), Image.Resampling.LANCZOS, box=src_box)
    return np.asarray(resized)
