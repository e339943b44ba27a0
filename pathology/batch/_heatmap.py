"""``heatmap.png``: a per-tile value (e.g. positive cells per mm²) over the slide thumbnail.

Planes: ``thumb`` pixels (row, col) and the tile grid (``tile_rc``). Tile ``(r, c)`` covers thumbnail
rows ``r * t .. (r + 1) * t`` and columns ``c * t .. (c + 1) * t`` with ``t = tile_px_thumb``.

The figure is drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas, never pyplot), so
nothing leaks into a caller's pyplot state; layout, size and dpi are fixed, so the same inputs
give the same PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pathology._io import write_bytes

__all__ = ["heatmap_array", "heatmap_png", "write_heatmap"]

_DPI = 100
#: Longest side of the drawn thumbnail in output pixels: small thumbnails are enlarged to at
#: least ``_MIN_SIDE_PX``, large ones shrunk to ``_MAX_SIDE_PX`` (the PNG stays <= ~1200 px).
_MAX_SIDE_PX = 1000
_MIN_SIDE_PX = 500
#: Output pixels around the image: left, right (colour bar and its label), bottom, top (title).
_PAD_PX = (20, 150, 20, 50)
_ALPHA = 0.6
_CMAP = "viridis"


def heatmap_array(
    tiles_rc: NDArray[np.integer],
    values: NDArray[np.floating],
    grid_shape: tuple[int, int] | None = None,
) -> NDArray[np.float64]:
    """Grid of per-tile values, NaN where no tile was scored.

    Parameters
    ----------
    tiles_rc : ndarray (n, 2) int
        Row and column of each scored tile on the tile grid.
    values : ndarray (n,) float
        Value of each tile. A tile listed twice keeps its last value.
    grid_shape : (int, int), optional
        Rows and columns of the grid; default just large enough for ``tiles_rc``. Tiles outside
        it are dropped.

    Returns
    -------
    ndarray (rows, cols) float64
    """
    rc = np.asarray(tiles_rc, dtype=np.int64).reshape(-1, 2)
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if rc.shape[0] != vals.shape[0]:
        raise ValueError(
            f"tiles_rc has {rc.shape[0]} tiles but values has {vals.shape[0]}; pass one value per tile"
        )
    if grid_shape is None:
        grid_shape = (
            int(rc[:, 0].max(initial=-1)) + 1,
            int(rc[:, 1].max(initial=-1)) + 1,
        )
    grid = np.full(grid_shape, np.nan)
    inside = (rc >= 0).all(1) & (rc[:, 0] < grid_shape[0]) & (rc[:, 1] < grid_shape[1])
    grid[rc[inside, 0], rc[inside, 1]] = vals[inside]
    return grid


def _default_vmax(values: NDArray[np.float64]) -> float:
    """99th percentile of the finite values; 1 when there is none or it is 0 (a scale of 0-1
    reads better than 0-1e-9 on a slide without a single positive cell)."""
    finite = values[np.isfinite(values)]
    top = float(np.percentile(finite, 99)) if finite.size else 0.0
    return top if top > 1e-9 else 1.0


def heatmap_png(
    thumb: NDArray[np.uint8],
    tiles_rc: NDArray[np.integer],
    values: NDArray[np.floating],
    *,
    tile_px_thumb: float,
    title: str,
    label: str,
    vmax: float | None = None,
    provenance: dict[str, str] | None = None,
) -> bytes:
    """The PNG bytes of :func:`write_heatmap` (parameters there)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    img = np.asarray(thumb)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"thumb must be an (h, w, 3) RGB image, got shape {img.shape}")
    if not tile_px_thumb > 0:
        raise ValueError(f"tile_px_thumb must be > 0 thumbnail pixels, got {tile_px_thumb!r}")
    h, w = img.shape[:2]
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    grid = heatmap_array(tiles_rc, vals)
    top = _default_vmax(vals) if vmax is None else max(float(vmax), 1e-9)

    long_side = max(h, w)
    scale = min(_MAX_SIDE_PX / long_side, max(1.0, _MIN_SIDE_PX / long_side))
    img_w, img_h = round(w * scale), round(h * scale)
    left, right, bottom, top_pad = _PAD_PX
    fig_w, fig_h = img_w + left + right, img_h + bottom + top_pad
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
    ax.imshow(img, extent=(0, w, h, 0), interpolation="antialiased")
    norm = Normalize(0.0, top)
    overlay: ScalarMappable = ScalarMappable(norm=norm, cmap=_CMAP)
    if grid.size:
        rows, cols = grid.shape
        overlay = ax.imshow(
            np.ma.masked_invalid(grid),  # unscored tiles stay transparent
            extent=(0, cols * tile_px_thumb, rows * tile_px_thumb, 0),
            cmap=_CMAP,
            norm=norm,
            alpha=_ALPHA,
            interpolation="nearest",
        )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    cax = fig.add_axes(((left + img_w + 20) / fig_w, bottom / fig_h, 18 / fig_w, img_h / fig_h))
    bar = fig.colorbar(overlay, cax=cax)
    if bar.solids is not None:
        bar.solids.set_alpha(1.0)  # the scale itself in full colour, not faded like the overlay
    bar.set_label(label, fontsize=10)
    bar.ax.tick_params(labelsize=9)
    fig.text(0.5, 1.0 - 12 / fig_h, title, ha="center", va="top", fontsize=12)
    buf = io.BytesIO()
    # PNG text chunks: provenance travels with the picture (PIL: Image.open(p).text).
    meta: dict[str, str | None] = {"Software": None}
    meta.update({f"pathology:{k}": str(v) for k, v in (provenance or {}).items()})
    fig.savefig(buf, format="png", dpi=_DPI, metadata=meta)
    return buf.getvalue()


def write_heatmap(
    path: Path,
    thumb: NDArray[np.uint8],
    tiles_rc: NDArray[np.int64],
    values: NDArray[np.floating],
    *,
    tile_px_thumb: float,
    title: str,
    label: str,
    vmax: float | None = None,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Draw ``values`` per tile over the slide thumbnail and write it as a PNG, atomically.

    Parameters
    ----------
    path : Path
        Output PNG (``heatmap.png``).
    thumb : ndarray (h, w, 3) uint8
        RGB thumbnail of the slide region the tile grid starts at.
    tiles_rc : ndarray (n, 2) int64
        Row and column of each scored tile on the tile grid.
    values : ndarray (n,) float
        Value per tile, e.g. positive cells per mm². NaN tiles are left uncoloured.
    tile_px_thumb : float
        Size of one tile in thumbnail pixels.
    title : str
        Figure title (e.g. slide id, marker and call).
    label : str
        Colour bar label, with units.
    vmax : float, optional
        Top of the colour scale (at least 1e-9); default the 99th percentile of ``values``, so
        a few extreme tiles do not wash out the rest, or 1 when that is 0 (no positive tile).
        The bottom is 0; values above the top take the top colour.
    provenance : dict, optional
        Written as PNG text chunks ``pathology:<key>`` (software, model, marker hash, ...).

    Returns
    -------
    Path
        ``path``. The image shows the thumbnail at 500-1000 px on its long side (plus a colour
        bar and the title), with the values over scored tiles as a semi-transparent colour map;
        unscored areas show the plain thumbnail.
    """
    png = heatmap_png(
        thumb,
        tiles_rc,
        values,
        tile_px_thumb=tile_px_thumb,
        title=title,
        label=label,
        vmax=vmax,
        provenance=provenance,
    )
    return write_bytes(path, png)
