"""Tile grid at a target resolution: which pyramid level to read, and where every tile lies.

Coordinate planes:

- ``l0_*``: level-0 pixels of the slide (OpenSlide's frame).
- ``level_*``: pixels of the pyramid level read (``level_downsample`` level-0 px each).
- ``out_*``: pixels of the output image at ``target_mpp`` (what the Zarr store holds);
  tile ``(row, col)`` covers ``out`` pixels ``[col*tile_px, (col+1)*tile_px) x [row*tile_px, ...)``.
- ``tile_rc``: (row, col) of a tile; ``overlap_px`` extends each tile on all sides when it is read.

One output pixel spans ``factor`` level pixels. When ``factor`` is within ``mpp_tolerance`` of an
integer ``k`` (the usual case: 0.25 um/px scans read at 0.5 um/px, or 0.499 um/px read as 0.5), the
grid snaps to it: output pixels are exact k x k block means of level pixels and the store records the
effective mpp. Otherwise tiles are resampled with an antialiasing filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pathology.errors import ConfigError

__all__ = ["TileGrid", "plan_grid"]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a slide lie at a target resolution.

    Attributes
    ----------
    l0_size : (w, h)
        Slide level-0 size in pixels.
    slide_mpp : float
        Microns per level-0 pixel.
    target_mpp : float
        Microns per output pixel asked for.
    tile_px : int
        Tile edge in output pixels (the grid stride).
    overlap_px : int
        Extra output pixels on every side of a tile when read for scoring.
    level : int
        Pyramid level read.
    level_downsample : float
        Level-0 pixels per level pixel of ``level``.
    factor : float
        Level pixels per output pixel (>= 1 up to tolerance). An integer when ``snapped``.
    snapped : bool
        ``factor`` is an exact integer: outputs are block means, no resampling filter.
    """

    l0_size: tuple[int, int]
    slide_mpp: float
    target_mpp: float
    tile_px: int
    overlap_px: int
    level: int
    level_downsample: float
    factor: float
    snapped: bool

    @property
    def mpp(self) -> float:
        """Effective microns per output pixel (the target, or the snapped neighbour of it)."""
        return self.slide_mpp * self.level_downsample * self.factor

    @property
    def l0_per_out(self) -> float:
        """Level-0 pixels per output pixel."""
        return self.level_downsample * self.factor

    @property
    def out_size(self) -> tuple[int, int]:
        """(w, h) of the output image: every level-0 pixel is covered, the last tiles may be partial."""
        w0, h0 = self.l0_size
        return (math.ceil(w0 / self.l0_per_out - 1e-9), math.ceil(h0 / self.l0_per_out - 1e-9))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        w, h = self.out_size
        return (math.ceil(h / self.tile_px), math.ceil(w / self.tile_px))

    @property
    def n_tiles(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def tile_rc(self) -> NDArray[np.int64]:
        """(N, 2) (row, col) of every tile in row-major order."""
        rows, cols = self.shape
        rr, cc = np.mgrid[0:rows, 0:cols]
        return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)

    def out_box(self, tile_rc: NDArray[np.integer], *, overlap: bool = False) -> NDArray[np.int64]:
        """Output-pixel boxes (N, 4) as (x, y, w, h), clipped to the image unless ``overlap``.

        With ``overlap`` the box extends ``overlap_px`` on each side and may leave the image (what a
        scorer reads; outside the image is white glass).
        """
        rc = np.atleast_2d(np.asarray(tile_rc, dtype=np.int64))
        x = rc[:, 1] * self.tile_px
        y = rc[:, 0] * self.tile_px
        if overlap:
            o = self.overlap_px
            side = self.tile_px + 2 * o
            return np.stack([x - o, y - o, np.full_like(x, side), np.full_like(y, side)], axis=1)
        w, h = self.out_size
        return np.stack(
            [x, y, np.minimum(self.tile_px, w - x), np.minimum(self.tile_px, h - y)], axis=1
        )

    def l0_box(self, tile_rc: NDArray[np.integer], *, overlap: bool = False) -> NDArray[np.float64]:
        """Level-0 boxes (N, 4) as (x, y, w, h) in (fractional) level-0 pixels of the given tiles."""
        return self.out_box(tile_rc, overlap=overlap).astype(np.float64) * self.l0_per_out

    def level_region(
        self, out_xywh: tuple[int, int, int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float, float, float]]:
        """What to read at ``level`` to render an output box.

        Returns
        -------
        l0_xy : (int, int)
            Level-0 origin to pass to ``read_region``.
        level_size : (w, h)
            Level pixels to read.
        src_box : (x0, y0, x1, y1)
            The exact (fractional) source box inside the region read, for the resampler.
        """
        x, y, w, h = out_xywh
        f = self.factor
        lx0, ly0 = x * f, y * f
        lx1, ly1 = (x + w) * f, (y + h) * f
        ix0, iy0 = math.floor(lx0 + 1e-9), math.floor(ly0 + 1e-9)
        ix1, iy1 = math.ceil(lx1 - 1e-9), math.ceil(ly1 - 1e-9)
        ds = self.level_downsample
        l0_xy = (round(ix0 * ds), round(iy0 * ds))
        return l0_xy, (ix1 - ix0, iy1 - iy0), (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)

    def to_dict(self) -> dict[str, object]:
        return {
            "l0_size": list(self.l0_size),
            "slide_mpp": self.slide_mpp,
            "target_mpp": self.target_mpp,
            "mpp": self.mpp,
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "level": self.level,
            "level_downsample": self.level_downsample,
            "factor": self.factor,
            "snapped": self.snapped,
            "out_size": list(self.out_size),
            "grid_shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TileGrid:
        """The grid :meth:`to_dict` described (derived keys are ignored)."""
        size: list[int] = list(d["l0_size"])  # type: ignore[call-overload]
        return cls(
            l0_size=(int(size[0]), int(size[1])),
            slide_mpp=float(d["slide_mpp"]),  # type: ignore[arg-type]
            target_mpp=float(d["target_mpp"]),  # type: ignore[arg-type]
            tile_px=int(d["tile_px"]),  # type: ignore[call-overload]
            overlap_px=int(d["overlap_px"]),  # type: ignore[call-overload]
            level=int(d["level"]),  # type: ignore[call-overload]
            level_downsample=float(d["level_downsample"]),  # type: ignore[arg-type]
            factor=float(d["factor"]),  # type: ignore[arg-type]
            snapped=bool(d["snapped"]),
        )


def plan_grid(
    l0_size: tuple[int, int],
    level_downsamples: tuple[float, ...],
    slide_mpp: float,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    overlap_px: int = 0,
    mpp_tolerance: float = 0.02,
) -> TileGrid:
    """Choose the level and the grid for a slide.

    The level read is the coarsest whose resolution is at or above the target (its mpp at most
    ``target_mpp * (1 + mpp_tolerance)``), so tiles are only ever reduced, never enlarged.

    Parameters
    ----------
    l0_size : (w, h)
        Level-0 size.
    level_downsamples : tuple of float
        Per level, level-0 px per level px.
    slide_mpp : float
        Microns per level-0 pixel.
    target_mpp : float
        Wanted microns per output pixel.
    tile_px, overlap_px : int
        Tile edge and per-side overlap in output pixels.
    mpp_tolerance : float
        Relative difference under which the grid snaps to an integer block size instead of resampling.

    Raises
    ------
    ConfigError
        Invalid sizes, or a target finer than the slide's level 0 (upsampling invents detail).
    """
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise ConfigError(
            f"--mpp must be a positive number of microns per pixel, got {target_mpp!r}"
        )
    if not 16 <= tile_px <= 8192:
        raise ConfigError(f"--tile must be between 16 and 8192 px, got {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ConfigError(
            f"--overlap must be >= 0 and smaller than the tile ({tile_px} px), got {overlap_px}"
        )
    if target_mpp < slide_mpp * (1 - mpp_tolerance):
        raise ConfigError(
            f"target {target_mpp} um/px is finer than the slide's level 0 ({slide_mpp:.4g} um/px); "
            f"choose --mpp >= {slide_mpp:.4g}"
        )
    level = 0
    for i, ds in enumerate(level_downsamples):
        if slide_mpp * ds <= target_mpp * (1 + mpp_tolerance):
            level = i
    ds = float(level_downsamples[level])
    factor = target_mpp / (slide_mpp * ds)
    k = max(1, round(factor))
    snapped = abs(factor - k) / factor <= mpp_tolerance
    if snapped:
        factor = float(k)
    return TileGrid(
        l0_size=(int(l0_size[0]), int(l0_size[1])),
        slide_mpp=float(slide_mpp),
        target_mpp=float(target_mpp),
        tile_px=int(tile_px),
        overlap_px=int(overlap_px),
        level=level,
        level_downsample=ds,
        factor=float(factor),
        snapped=snapped,
    )
