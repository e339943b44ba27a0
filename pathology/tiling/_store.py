"""The Zarr v3 tile store: layout, provenance, resume bookkeeping.

Layout of ``STORE.zarr`` (a Zarr v3 group; everything readable with plain ``zarr.open``)::

    zarr.json            attributes: "ome" (OME-NGFF 0.5 multiscales, for napari and other viewers)
                         and "pathology" (format, provenance, grid, tiling parameters; no PHI)
    0/                   image at the target mpp, (3, H, W) uint8 (c, y, x), sharded by
                         ``shard_tiles x shard_tiles`` tiles (one file per shard; only shards with
                         tissue exist, fill value 255 = white glass); inner chunks of
                         ``chunk_tiles x chunk_tiles`` tiles (2 x 2 since format 2, one tile in
                         format 1 stores, which stay readable and resumable)
    1/ 2/ 3/             the same image reduced 2x, 4x, 8x (2x2 block means) for viewers, one chunk
                         per shard
    tissue_mask          (h, w) uint8 0/255 tissue mask at thumbnail scale (attrs: downsample_xy)
    tiles/               the tile table, one row per tissue tile, as 1-D arrays:
                         row, col, x, y (output px), l0_x, l0_y, l0_w, l0_h (level-0 px), tissue
    progress/shards      (shard rows, shard cols) uint8: 1 = shard written completely, 2 = written
                         with unreadable tiles; one file per shard, set after the shard's image data

A task writes one whole shard (and the matching pyramid chunks, :meth:`TileStore.write_shard`) and
only then sets its progress flag. Zarr's local store writes every file atomically, so a run killed
at any instant leaves each shard either complete and flagged, or to be redone: a rerun redoes
exactly the unflagged shards.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pathology.errors import OutputExistsError, PathologyError
from pathology.tiling._grid import TileGrid

__all__ = ["FORMAT", "FORMAT_VERSION", "PYRAMID_LEVELS", "StoreMismatchError", "TileStore"]

FORMAT = "pathology.tiles"
#: 2: inner chunks of ``chunk_tiles x chunk_tiles`` tiles (format 1: one tile). Readers slice the
#: arrays, so both read the same; only the write cost differs (README, "Store cost").
FORMAT_VERSION = 2
#: Inner chunk edge in tiles (when it divides ``shard_tiles``): zarr-python's cost per chunk
#: (event-loop tasks, a thread hand-off, a copy out of the shard) was most of the store's CPU time
#: with one-tile chunks; 2 x 2 tiles keeps a single-tile read to one ~0.8 MB chunk.
CHUNK_TILES = 2
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
    _writers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
        chunk_tiles: int | None = None,
    ) -> TileStore:
        """Create a new, empty store; refuses to replace an existing path unless ``overwrite``.

        ``chunk_tiles`` (inner chunk edge in tiles) defaults to :data:`CHUNK_TILES` where that
        divides ``shard_tiles``, else 1; 1 gives the format-1 layout (tests of old stores).
        """
        import zarr

        p = Path(path)
        if p.exists():
            if not overwrite:
                raise OutputExistsError(f"{p}: already exists; pass --overwrite to replace it")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        w, h = grid.out_size
        t = grid.tile_px
        shard_px = t * shard_tiles
        if chunk_tiles is None:
            chunk_tiles = CHUNK_TILES if shard_tiles % CHUNK_TILES == 0 else 1
        if chunk_tiles < 1 or shard_tiles % chunk_tiles:
            raise PathologyError(f"chunk_tiles {chunk_tiles} must divide shard_tiles {shard_tiles}")
        chunk_px = t * chunk_tiles
        rows, cols = grid.shape
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if chunk_tiles != 1 else 1,
            "params": params,
            "grid": grid.to_dict(),
            "shard_tiles": shard_tiles,
            "chunk_tiles": chunk_tiles,
            "codec": codec,
            "provenance": provenance,
            "n_tissue_tiles": len(table["row"]),
        }
        group = zarr.open_group(p, mode="w-", zarr_format=3)
        codecs = image_codecs(codec)
        common: dict[str, Any] = {
            "dtype": "uint8",
            "fill_value": 255,
            "dimension_names": ("c", "y", "x"),
        }
        group.create_array(
            "0",
            shape=(3, h, w),
            chunks=(3, chunk_px, chunk_px),
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
        version = meta.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise StoreMismatchError(
                f"{p}: tile store format_version {version!r}, this pathology reads 1 to "
                f"{FORMAT_VERSION}; upgrade pathology or re-tile with --overwrite"
            )
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

    def _writer(self, name: str) -> Any:
        """Image array ``name`` opened once for writing, without zarr's fill-value check.

        ``write_empty_chunks`` is a run-time setting, not stored metadata: an array reopened from
        the group has the default (False), and zarr then compares every chunk with the fill value
        before encoding it, which cost as much CPU as LZ4 itself (README, "Store cost"). A glass
        chunk inside a tissue shard then costs a few bytes of LZ4; all-glass shards are never
        written at all.
        """
        arr = self._writers.get(name)
        if arr is None:
            arr = self._writers[name] = self.group[name].with_config({"write_empty_chunks": True})
        return arr

    def write_shard(self, y0: int, x0: int, block_chw: NDArray[np.uint8]) -> None:
        """Write the image block at ``(y0, x0)`` and its 2x, 4x, 8x reductions, one zarr call each.

        Parameters
        ----------
        y0, x0 : int
            Top-left in ``out`` pixels; a multiple of the shard edge (so the reductions land on
            whole pyramid chunks).
        block_chw : ndarray (3, h, w) uint8, C-contiguous
            One whole shard (cut at the image's right and bottom edges).
        """
        level = block_chw
        for lvl in range(PYRAMID_LEVELS + 1):
            if lvl:
                level = halve_chw(level)
            _, h, w = level.shape
            ly0, lx0 = y0 >> lvl, x0 >> lvl
            self._writer(str(lvl))[:, ly0 : ly0 + h, lx0 : lx0 + w] = level

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


def halve_chw(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """2x2 block means of a (c, h, w) uint8 image, rounded half up (as :func:`block_mean`).

    Returns (c, ceil(h / 2), ceil(w / 2)) uint8, C-contiguous. Each channel is reduced as its own
    8-bit plane by Pillow (no interleaving to RGBA and back: ~1.5x faster than reducing the
    (h, w, 3) block); odd edges go through :func:`block_mean`'s exact path.
    """
    from pathology.slide import block_mean

    c, h, w = image.shape
    if h % 2 or w % 2:
        return np.ascontiguousarray(block_mean(image.transpose(1, 2, 0), 2).transpose(2, 0, 1))
    from PIL import Image

    out = np.empty((c, h // 2, w // 2), np.uint8)
    for k in range(c):
        out[k] = np.asarray(Image.fromarray(np.ascontiguousarray(image[k])).reduce(2))
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
