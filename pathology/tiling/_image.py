"""The tile store's image, rendered from the slide on demand instead of read from Zarr.

:class:`SlideImage` looks like the store's ``0`` array to a reader that slices it: shape
``(3, H, W)`` uint8 at the grid's mpp, and ``image[:, y0:y1, x0:x1]`` returns exactly the pixels
:func:`~pathology.tiling.tile_slide` would have written there. Those are defined tile by tile: a
tissue tile is :func:`~pathology.tiling.render_tile` of its (clipped) box, everything else
(tiles below the tissue threshold, unreadable tiles) is white glass. So a slice is assembled from
the tissue tiles it touches, each rendered with the tiler's own call:

- a tile wholly inside the slice: rendered as the tiler renders it;
- a tile the slice only clips (the scoring halo reaching into a neighbour): when the grid is an
  exact block mean over whole level pixels (``snapped`` and an integer level downsample, the usual
  case) only the clipped part is rendered, which gives the same pixels; otherwise (Lanczos
  resampling, or a level whose downsample is fractional, where OpenSlide interpolates sub-pixel
  origins) the whole tile is rendered and cut, since a part would not resample identically.

Frames as in :mod:`pathology.tiling._grid`: ``out_*`` pixels of the image at the grid's mpp,
``tile_rc`` (row, col) of a tile.

Thread safety: every calling thread reads through its own slide handle, opened on its first
read and closed by :meth:`SlideImage.close`; the record of unreadable tiles is locked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology.errors import TileReadError
from pathology.tiling._grid import TileGrid
from pathology.tiling._read import ReaderSpec, open_reader, render_tile

__all__ = ["PerThread", "SlideImage"]


class PerThread:
    """One handle per calling thread (a slide reader, a TIFF source), opened by ``opener`` on the
    thread's first :meth:`get`; :meth:`close` closes them all, and a later ``get`` opens anew."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Any] = []

    def get(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._opener()
            with self._lock:
                self._open.append(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            handles, self._open = self._open, []
        self._local = threading.local()
        for handle in handles:
            handle.close()


class SlideImage:
    """A ``(3, H, W)`` uint8 array-like over the tissue tiles of a slide, read on demand.

    Parameters
    ----------
    spec : ReaderSpec
        How each thread opens the slide (choose ``direct`` as the tiler would, for the same pixels).
    grid : TileGrid
    tiles_rc : ndarray (n, 2) int
        The tissue tiles (the store's tile table); every other tile reads as white glass.

    Attributes
    ----------
    shape : (3, H, W)
    dtype : numpy.dtype
    """

    def __init__(self, spec: ReaderSpec, grid: TileGrid, tiles_rc: NDArray[np.integer]) -> None:
        self.spec = spec
        self.grid = grid
        w, h = grid.out_size
        self.shape = (3, h, w)
        self.dtype = np.dtype(np.uint8)
        rows, cols = grid.shape
        self._tissue = np.zeros((rows, cols), bool)
        rc = np.asarray(tiles_rc, np.int64).reshape(-1, 2)
        self._tissue[rc[:, 0], rc[:, 1]] = True
        # Parts of a tile render like the whole only for exact block means on whole level pixels.
        self._parts_exact = grid.snapped and float(grid.level_downsample).is_integer()
        self._failed: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()
        self._readers = PerThread(lambda: open_reader(self.spec))

    def _reader(self) -> Any:
        """The calling thread's slide handle (one per thread, see the module docstring)."""
        return self._readers.get()

    def close(self) -> None:
        """Close every thread's slide handle (a later read opens a new one)."""
        self._readers.close()

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ array-like reading

    def __getitem__(self, key: Any) -> NDArray[np.uint8]:
        """``image[:, y0:y1, x0:x1]`` (unit steps, bounds inside the image) as (3, h, w) uint8."""
        if not (
            isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, slice) for k in key)
        ):
            raise TypeError(f"SlideImage takes image[:, y0:y1, x0:x1]; got {key!r}")
        _, h, w = self.shape
        ys, xs = key[1].indices(h), key[2].indices(w)
        if ys[2] != 1 or xs[2] != 1:
            raise TypeError("SlideImage slices take unit steps")
        region = self.read_box((xs[0], ys[0], max(0, xs[1] - xs[0]), max(0, ys[1] - ys[0])))
        return region[key[0]]

    def read_box(self, out_xywh: tuple[int, int, int, int]) -> NDArray[np.uint8]:
        """Pixels of an output box inside the image, (3, h, w) uint8, as the store holds them."""
        x0, y0, bw, bh = (int(v) for v in out_xywh)
        x1, y1 = x0 + bw, y0 + bh
        block = np.full((bh, bw, 3), 255, np.uint8)
        if bw <= 0 or bh <= 0:
            return block.transpose(2, 0, 1)
        t = self.grid.tile_px
        rows = slice(y0 // t, (y1 - 1) // t + 1)
        cols = slice(x0 // t, (x1 - 1) // t + 1)
        hits = np.argwhere(self._tissue[rows, cols])
        if not len(hits):
            return block.transpose(2, 0, 1)
        reader = self._reader()
        tiles = hits + np.array([rows.start, cols.start])
        for (r, c), (tx, ty, tw, th) in zip(
            tiles.tolist(), self.grid.out_box(tiles).tolist(), strict=True
        ):
            # The part of tile (r, c) inside the box.
            ax, ay = max(tx, x0), max(ty, y0)
            bx, by = min(tx + tw, x1), min(ty + th, y1)
            whole = (ax, ay, bx, by) == (tx, ty, tx + tw, ty + th)
            try:
                if whole or self._parts_exact:
                    pixels = render_tile(reader, self.grid, (ax, ay, bx - ax, by - ay))
                else:
                    tile = render_tile(reader, self.grid, (tx, ty, tw, th))
                    pixels = tile[ay - ty : by - ty, ax - tx : bx - tx]
            except TileReadError as exc:  # left white, as the tiler leaves it
                with self._lock:
                    self._failed.setdefault((r, c), f"tile row {r}, col {c}: {exc}")
                continue
            block[ay - y0 : by - y0, ax - x0 : bx - x0] = pixels
        return block.transpose(2, 0, 1)

    def read_tile(self, row: int, col: int, *, overlap_px: int = 0) -> NDArray[np.uint8]:
        """Tile ``(row, col)`` as (3, T + 2 overlap, T + 2 overlap) uint8, white outside the image:
        the same as :meth:`pathology.tiling.TileStore.read_tile`."""
        t, o = self.grid.tile_px, int(overlap_px)
        _, h, w = self.shape
        x0, y0 = col * t - o, row * t - o
        side = t + 2 * o
        out = np.full((3, side, side), 255, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if xb > xa and yb > ya:
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = self.read_box((xa, ya, xb - xa, yb - ya))
        return out

    # ------------------------------------------------------------------ unreadable tiles

    def any_failed(self, tiles_rc: NDArray[np.integer]) -> bool:
        """Whether any of these tiles could not be read (once tried)."""
        with self._lock:
            failed = set(self._failed)
        return any((int(r), int(c)) in failed for r, c in np.asarray(tiles_rc).reshape(-1, 2))

    @property
    def failed_tiles(self) -> list[str]:
        """One line per unreadable tile met so far, in (row, col) order."""
        with self._lock:
            return [self._failed[k] for k in sorted(self._failed)]
