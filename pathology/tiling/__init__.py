"""Tiling: a slide's tissue at a target resolution into a chunked, resumable Zarr v3 store.

>>> from pathology.tiling import tile_slide, TileStore
>>> result = tile_slide("slide.svs", "slide.zarr", target_mpp=0.5)  # doctest: +SKIP
>>> TileStore.open("slide.zarr").read_tile(3, 7).shape  # doctest: +SKIP
(3, 256, 256)
"""

from __future__ import annotations

from pathology.tiling._grid import TileGrid, plan_grid
from pathology.tiling._read import render_tile
from pathology.tiling._run import TilePlan, TilingResult, plan_tissue_tiles, tile_slide
from pathology.tiling._store import StoreMismatchError, TileStore

__all__ = [
    "StoreMismatchError",
    "TileGrid",
    "TilePlan",
    "TileStore",
    "TilingResult",
    "plan_grid",
    "plan_tissue_tiles",
    "render_tile",
    "tile_slide",
]
