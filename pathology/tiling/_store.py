"""The Zarr v3 tile store: layout, provenance, resume bookkeeping.

Layout of ``STORE.zarr`` (a Zarr v3 group; everything readable with plain ``zarr.open``)::

    zarr.json            attributes: "ome" (OME-NGFF 0.5 multiscales, for napari and other viewers)
                         and "pathology" (format, provenance, grid, tiling parameters; no PHI)
    0/                   image at the target mpp, (3, H, W) uint8 (c, y, x), chunk = one tile,
                         sharded by ``shard_tiles x shard_tiles`` tiles; only tissue chunks exist
                         (fill value 255 = white glass)
    1/ 2/ 3/             the same image reduced 2x, 4x, 8x (2x2 block means) for viewers
    tissue_mask          (h, w) uint8 0/255 tissue mask at thumbnail scale (attrs: downsample_xy)
    tiles/               the tile table, one row per tissue tile, as 1-D arrays:
                         row, col, x, y (output px), l0_x, l0_y, l0_w, l0_h (level-0 px), tissue
    progress/shards      (shard rows, shard cols) uint8: 1 = shard written completely, 2 = written
                         with unreadable tiles; one file per shard, set after the shard's image data

A task writes one whole shard (and the matching pyramid chunks) and only then sets its progress
flag. Zarr's local store writes every file atomically, so a run killed at any instant leaves each
shard either complete and flagged, or to be redone: a rerun redoes exactly the unflagged shards.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pathology.errors import OutputExistsError, PathologyError
from pathology.tiling._grid import TileGrid

__all__ = ["FORMAT", "FORMAT_VERSION", "PYRAMID_LEVELS", "StoreMismatchError", "TileStore"]

FORMAT = "pathology.tiles"
FORMAT_VERSION = 1
#: Reduced copies for viewers: 2x, 4x, 8x.
PYRAMID_LEVELS = 3
_TABLE_COLUMNS = ("row", "col", "x", "y", "l0_x", "l0_y", "l0_w", "l0_h", "tissue")


class StoreMismatchError(OutputExistsError):
    """An existing store was made from another slide or with other parameters."""


def image_codecs(codec: str) -> dict[str, Any]:
    """Zarr v3 ``compressors``/``serializer`` arguments for a codec name (see README for the choice)."""
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if codec == "lz4":
        return {"compressors": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.noshuffle)]}
    if codec == "zstd":
        return {"compressors": [ZstdCodec(level=1)]}
    if codec == "none":
        return {"compressors": None}
    raise PathologyError(f"unknown codec {codec!r}; choose lz4, zstd or none")


@dataclass
class TileStore:
    """An open tile store (see module docstring for the layout)."""

    path: Path
    group: Any  # zarr.Group

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        grid: TileGrid,
        table: dict[str, NDArray[Any]],
        tissue_mask: NDArray[np.bool_],
        tissue_downsample_xy: tuple[float, float],
        provenance: dict[str, Any],
        params: dict[str, Any],
        shard_tiles: int,
        codec: str,
        overwrite: bool = False,
    ) -> TileStore:
        """Create a new, empty store; refuses to replace an existing path unless ``overwrite``."""
        import zarr

        p = Path(path)
        if p.exists():
            if not overwrite:
                raise OutputExistsError(f"{p}: already exists; pass --overwrite to replace it")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        w, h = grid.out_size
        t = grid.tile_px
        shard_px = t * shard_tiles
        rows, cols = grid.shape
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "params": params,
            "grid": grid.to_dict(),
            "shard_tiles": shard_tiles,
            "codec": codec,
            "provenance": provenance,
            "n_tissue_tiles": len(table["row"]),
        }
        group = zarr.open_group(p, mode="w-", zarr_format=3)
        codecs = image_codecs(codec)
        # write_empty_chunks=True: zarr 3.1's fill-value check costs ~0.4 ms per chunk on its single
        # event-loop thread (more than LZ4 itself) and halves whole-shard write rates. A glass chunk
        # inside a tissue shard then costs a few bytes of LZ4; all-glass shards are never written.
        common: dict[str, Any] = {
            "dtype": "uint8",
            "fill_value": 255,
            "dimension_names": ("c", "y", "x"),
            "config": {"write_empty_chunks": True},
        }
        group.create_array(
            "0",
            shape=(3, h, w),
            chunks=(3, t, t),
            shards=(3, shard_px, shard_px),
            **codecs,
            **common,
        )
        for lvl in range(1, PYRAMID_LEVELS + 1):
            block = max(1, shard_px >> lvl)
            group.create_array(
                str(lvl),
                shape=(3, -(-h // 2**lvl), -(-w // 2**lvl)),
                chunks=(3, block, block),
                **codecs,
                **common,
            )
        mask_arr = group.create_array(
            "tissue_mask",
            shape=tissue_mask.shape,
            chunks=tissue_mask.shape,
            dtype="uint8",
            fill_value=0,
            dimension_names=("y", "x"),
        )
        mask_arr[...] = tissue_mask.astype(np.uint8) * 255
        mask_arr.attrs["downsample_xy"] = list(tissue_downsample_xy)
        tiles = group.create_group("tiles")
        n = len(table["row"])
        for name in _TABLE_COLUMNS:
            col = np.asarray(table[name])
            arr = tiles.create_array(
                name, shape=(n,), chunks=(max(n, 1),), dtype=col.dtype, fill_value=0
            )
            if n:
                arr[...] = col
        prog = group.create_group("progress")
        srows, scols = -(-rows // shard_tiles), -(-cols // shard_tiles)
        prog.create_array(
            "shards",
            shape=(srows, scols),
            chunks=(1, 1),
            dtype="uint8",
            fill_value=0,
            dimension_names=("shard_row", "shard_col"),
        )
        root_attrs: dict[str, Any] = {"ome": _ome_metadata(grid, p.name), "pathology": attrs}
        group.attrs.update(root_attrs)
        return cls(p, group)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> TileStore:
        """Open an existing store; raises a one-line error when it is not a tile store."""
        import zarr

        p = Path(path)
        try:
            group = zarr.open_group(p, mode=mode, zarr_format=3)
            meta: Any = group.attrs["pathology"]
        except Exception as exc:
            raise PathologyError(
                f"{p}: not a pathology tile store ({type(exc).__name__}: {exc})"
            ) from exc
        if meta.get("format") != FORMAT:
            raise PathologyError(f"{p}: not a pathology tile store (format {meta.get('format')!r})")
        return cls(p, group)

    # ------------------------------------------------------------------ accessors

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs["pathology"])

    @property
    def image(self) -> Any:
        """The (3, H, W) uint8 image array at the target mpp."""
        return self.group["0"]

    @property
    def shard_progress(self) -> NDArray[np.uint8]:
        return np.asarray(self.group["progress/shards"][...])

    def table(self) -> dict[str, NDArray[Any]]:
        """The tile table as columns (one row per tissue tile)."""
        return {name: np.asarray(self.group[f"tiles/{name}"][...]) for name in _TABLE_COLUMNS}

    def is_complete(self) -> bool:
        return bool((self.shard_progress[self._needed_shards()] > 0).all())

    def _needed_shards(self) -> NDArray[np.bool_]:
        st = int(self.meta["shard_tiles"])
        t = self.table()
        needed = np.zeros(self.group["progress/shards"].shape, dtype=bool)
        needed[t["row"] // st, t["col"] // st] = True
        return needed

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed writer left behind (zarr writes ``*.partial`` then renames)."""
        n = 0
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
            n += 1
        return n

    def mark_shard(self, shard_rc: tuple[int, int], status: int) -> None:
        self.group["progress/shards"][shard_rc[0], shard_rc[1]] = np.uint8(status)

    def read_tile(self, row: int, col: int, *, overlap_px: int | None = None) -> NDArray[np.uint8]:
        """Tile ``(row, col)`` as (3, T, T) uint8 with ``overlap_px`` (default: the store's) on each
        side; pixels outside the image are white."""
        g = self.meta["grid"]
        t, o = int(g["tile_px"]), int(g["overlap_px"] if overlap_px is None else overlap_px)
        w, h = g["out_size"]
        x0, y0 = col * t - o, row * t - o
        side = t + 2 * o
        out = np.full((3, side, side), 255, dtype=np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if xb > xa and yb > ya:
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = self.image[:, ya:yb, xa:xb]
        return out


def _ome_metadata(grid: TileGrid, name: str) -> dict[str, Any]:
    """OME-NGFF 0.5 multiscales (+ omero rendering hints) for the image pyramid."""
    mpp = grid.mpp
    datasets = [
        {
            "path": str(lvl),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, mpp * 2**lvl, mpp * 2**lvl]}
            ],
        }
        for lvl in range(PYRAMID_LEVELS + 1)
    ]
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
            }
        ],
        "omero": {
            "rdefs": {"model": "color"},
            "channels": [
                {
                    "label": c,
                    "color": col,
                    "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                    "active": True,
                }
                for c, col in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
            ],
        },
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_mismatch(existing: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """First difference between two parameter dicts, as ``key: old -> new``; None when equal."""
    for key in sorted(set(existing) | set(wanted)):
        a, b = existing.get(key), wanted.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            return f"{key}: {a!r} in the store, {b!r} now"
    return None
