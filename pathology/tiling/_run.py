"""``tile_slide``: tissue tiles of a slide at a target mpp into a Zarr store, with Dask, resumably.

One Dask task per shard (``shard_tiles x shard_tiles`` tiles): it opens (once per worker) its own
slide handle, renders the shard's tissue tiles, writes the shard and its pyramid chunks, then flags
the shard done. Memory per worker is one shard (12 MB for 8 x 8 tiles of 256 px) whatever the
slide size; no level is ever loaded whole.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology.errors import ConfigError, TileReadError
from pathology.slide import open_slide
from pathology.tiling._grid import TileGrid, plan_grid
from pathology.tiling._read import ReaderSpec, render_tile, worker_reader
from pathology.tiling._store import (
    StoreMismatchError,
    TileStore,
    describe_mismatch,
    utc_now,
)

__all__ = ["TilePlan", "TilingResult", "plan_tissue_tiles", "tile_slide"]


SCHEDULERS = ("threads", "processes", "sync")
READERS = ("auto", "openslide", "direct")
#: Tiles per shard edge: the store's write unit and the scorer's read unit.
SHARD_TILES = 8


@dataclass(frozen=True)
class TilingResult:
    """What a :func:`tile_slide` call did.

    Attributes
    ----------
    store : Path
    grid : TileGrid
    tissue_tiles : int
        Tiles at or above the tissue threshold (the store's tile table).
    tiles_written : int
        Tiles rendered by this call (0 when the store was already complete).
    shards_written, shards_skipped : int
        Shards written now / found complete from an earlier run.
    failed_tiles : list of str
        One line per unreadable tile (left white in the store, flagged in ``progress/shards``).
    reader : str
        ``openslide`` or ``direct-tiff``.
    seconds : float
        Wall time of the tile-writing phase (tissue detection and planning excluded).
    """

    store: Path
    grid: TileGrid
    tissue_tiles: int
    tiles_written: int
    shards_written: int
    shards_skipped: int
    failed_tiles: list[str] = field(default_factory=list)
    reader: str = "openslide"
    seconds: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_written / self.seconds if self.seconds > 0 else 0.0


def _choose_reader(path: Path, reader: str, grid: TileGrid) -> tuple[bool, str]:
    """(use direct path?, why) for ``--reader``."""
    if reader == "openslide":
        return False, "openslide (asked)"
    try:
        from pathology.tiling._direct import direct_support
    except ImportError:  # pragma: no cover - module always shipped
        return False, "openslide (direct reader unavailable)"
    reason = direct_support(path, grid.level)
    if reason is None:
        return True, "direct-tiff"
    if reader == "direct":
        raise ConfigError(f"{path}: --reader direct is not possible: {reason}")
    return False, f"openslide ({reason})"


_stores = threading.local()


def _store_arrays(store_path: str) -> Any:
    """Per-worker cache of the store's arrays (opening reads JSON metadata: do it once)."""
    cache = getattr(_stores, "cache", None)
    if cache is None:
        cache = _stores.cache = {}
    if store_path not in cache:
        cache[store_path] = TileStore.open(store_path, mode="r+")
    return cache[store_path]


def _tile_shard(
    store_path: str,
    spec: ReaderSpec,
    grid: TileGrid,
    shard_rc: tuple[int, int],
    shard_tiles: int,
    tiles_rc: NDArray[np.int64],
) -> tuple[int, list[str]]:
    """Render one shard's tissue tiles and write it; returns (tiles rendered, failure lines)."""
    reader = worker_reader(spec)
    store = _store_arrays(store_path)
    t = grid.tile_px
    w, h = grid.out_size
    x0, y0 = shard_rc[1] * shard_tiles * t, shard_rc[0] * shard_tiles * t
    x1, y1 = min(x0 + shard_tiles * t, w), min(y0 + shard_tiles * t, h)
    block = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
    failed: list[str] = []
    boxes = grid.out_box(tiles_rc)
    for (row, col), (x, y, bw, bh) in zip(tiles_rc.tolist(), boxes.tolist(), strict=True):
        try:
            tile = render_tile(reader, grid, (x, y, bw, bh))
        except TileReadError as exc:
            failed.append(f"tile row {row}, col {col}: {exc}")
            continue
        block[y - y0 : y - y0 + bh, x - x0 : x - x0 + bw] = tile
    # Zarr writes a contiguous (c, y, x) block about twice as fast as a transposed view (it copies
    # every chunk out of a strided source), so transpose once here.
    store.write_shard(y0, x0, np.ascontiguousarray(block.transpose(2, 0, 1)))
    store.mark_shard(shard_rc, 2 if failed else 1)
    return len(tiles_rc), failed


def _source_fingerprint(reader: Any) -> dict[str, Any]:
    info = reader.info
    return {
        "name": info.name,
        "bytes": info.file_bytes,
        "vendor": info.vendor,
        "l0_size": list(info.dimensions),
        "quickhash": info.properties.get("openslide.quickhash-1"),
    }


@dataclass(frozen=True)
class TilePlan:
    """What tiling a slide will cover: the grid, its tissue tiles and the mask that chose them.

    Attributes
    ----------
    grid : TileGrid
    table : dict of str -> ndarray (n,)
        The tile table (the store's ``tiles/``): ``row, col`` (int32), ``x, y`` (output px),
        ``l0_x, l0_y, l0_w, l0_h`` (level-0 px), ``tissue`` (fraction, float32).
    tissue : TissueMask
    source : dict
        Fingerprint of the slide file (name, bytes, vendor, level-0 size, quickhash).
    """

    grid: TileGrid
    table: dict[str, NDArray[Any]]
    tissue: Any  # pathology.tissue.TissueMask
    source: dict[str, Any]

    @property
    def tiles_rc(self) -> NDArray[np.int64]:
        """(n, 2) (row, col) of the tissue tiles, in table order."""
        return np.stack([self.table["row"], self.table["col"]], 1).astype(np.int64)


def plan_tissue_tiles(
    slide: str | os.PathLike[str],
    *,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    overlap_px: int = 0,
    min_tissue: float = 0.25,
    slide_mpp: float | None = None,
) -> TilePlan:
    """The grid at ``target_mpp`` and its tiles with at least ``min_tissue`` tissue (no pixels read
    beyond the tissue mask's thumbnail). :func:`tile_slide` writes exactly these tiles."""
    from pathology.tissue import compute_tissue_mask

    with open_slide(Path(slide), mpp=slide_mpp) as base:
        grid = plan_grid(
            base.dimensions,
            base.level_downsamples,
            base.mpp,
            target_mpp=target_mpp,
            tile_px=tile_px,
            overlap_px=overlap_px,
        )
        source = _source_fingerprint(base)
        tissue = compute_tissue_mask(base)
    all_rc = grid.tile_rc()
    boxes = grid.l0_box(all_rc)
    fractions = tissue.box_fractions(boxes[:, :2], boxes[:, 2:])
    keep = fractions >= min_tissue
    rc = all_rc[keep]
    table = {
        "row": rc[:, 0].astype(np.int32),
        "col": rc[:, 1].astype(np.int32),
        "x": (rc[:, 1] * tile_px).astype(np.int64),
        "y": (rc[:, 0] * tile_px).astype(np.int64),
        "l0_x": boxes[keep, 0],
        "l0_y": boxes[keep, 1],
        "l0_w": boxes[keep, 2],
        "l0_h": boxes[keep, 3],
        "tissue": fractions[keep].astype(np.float32),
    }
    return TilePlan(grid, table, tissue, source)


def tile_slide(
    slide: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    overlap_px: int = 0,
    min_tissue: float = 0.25,
    workers: int = 2,
    scheduler: str = "threads",
    reader: str = "auto",
    slide_mpp: float | None = None,
    shard_tiles: int = SHARD_TILES,
    codec: str = "lz4",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TilingResult:
    """Write the tissue tiles of ``slide`` at ``target_mpp`` into the Zarr store ``out``.

    Re-running with the same slide and parameters resumes: only shards not yet complete are
    written, and the result is pixel-identical to an uninterrupted run. An existing store made from
    another slide or with other parameters is never overwritten unless ``overwrite``.

    Parameters
    ----------
    slide : path
        Any slide :func:`~pathology.slide.open_slide` reads.
    out : path
        The store (a folder, conventionally ``*.zarr``).
    target_mpp : float
        Microns per output pixel (0.5 ~ 20x).
    tile_px, overlap_px : int
        Tile edge and per-side read overlap in output pixels.
    min_tissue : float
        Tiles with a smaller tissue fraction (from the tissue mask) are skipped.
    workers : int
        Parallel Dask workers.
    scheduler : {"threads", "processes", "sync"}
        Dask local scheduler. Threads (default): since the store's writes are cheap (format 2,
        no fill-value check) two threads tile a slide in less CPU time than two processes, which
        each pay their start-up and imports (0.6-1 CPU-s per worker; README, "Store cost").
    reader : {"auto", "openslide", "direct"}
        ``auto`` decodes TIFF-family slides straight from their JPEG tiles when that is exact,
        else uses OpenSlide.
    slide_mpp : float, optional
        The scan's pixel size when the file has none (or a wrong one).
    shard_tiles : int
        Tiles per shard edge: one file and one Dask task per shard.
    codec : {"lz4", "zstd", "none"}
        Compression of the image chunks.
    overwrite : bool
        Replace an existing store made with other parameters or from another slide.
    progress : callable(tiles_done, tiles_total), optional
        Called after each shard.
    """
    import dask
    from dask.callbacks import Callback

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if reader not in READERS:
        raise ConfigError(f"reader must be one of {', '.join(READERS)}; got {reader!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be a fraction between 0 and 1, got {min_tissue}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not 1 <= shard_tiles <= 64:
        raise ConfigError(f"shard_tiles must be between 1 and 64, got {shard_tiles}")
    slide_path, out_path = Path(slide), Path(out)

    plan = plan_tissue_tiles(
        slide_path,
        target_mpp=target_mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
        min_tissue=min_tissue,
        slide_mpp=slide_mpp,
    )
    grid, table, tissue, source = plan.grid, plan.table, plan.tissue, plan.source
    rc = plan.tiles_rc
    params = {
        "target_mpp": target_mpp,
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        "min_tissue": min_tissue,
        "shard_tiles": shard_tiles,
        "codec": codec,
        "slide_mpp": slide_mpp,
    }
    use_direct, reader_name = _choose_reader(slide_path, reader, grid)
    # The decoder is part of what determines the pixels (libjpeg builds may round differently).
    params["reader"] = "direct-tiff" if use_direct else "openslide"

    store = _open_or_create(
        out_path,
        grid=grid,
        table=table,
        tissue=tissue,
        source=source,
        params=params,
        shard_tiles=shard_tiles,
        codec=codec,
        overwrite=overwrite,
        reader_name=reader_name,
    )
    done = store.shard_progress
    shard_of = rc // shard_tiles
    shards = sorted({(int(a), int(b)) for a, b in shard_of.tolist()})
    pending = [s for s in shards if done[s] == 0]
    skipped = len(shards) - len(pending)
    spec = ReaderSpec(str(slide_path.resolve()), slide_mpp, use_direct)
    tasks = []
    tiles_per_task: dict[str, int] = {}
    for s in pending:
        sel = rc[(shard_of[:, 0] == s[0]) & (shard_of[:, 1] == s[1])]
        task = dask.delayed(_tile_shard, pure=False)(
            str(out_path.resolve()), spec, grid, s, shard_tiles, sel
        )
        tasks.append(task)
        tiles_per_task[task.key] = len(sel)
    total = int(sum(tiles_per_task.values()))
    counter = [0]

    class _Progress(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if key in tiles_per_task:
                counter[0] += tiles_per_task[key]
                if progress is not None:
                    progress(counter[0], total)

    t0 = time.perf_counter()
    failed: list[str] = []
    if tasks:
        with _Progress():
            results = dask.compute(*tasks, scheduler=scheduler, num_workers=workers)
        for _, fails in results:
            failed.extend(fails)
    seconds = time.perf_counter() - t0
    return TilingResult(
        store=out_path,
        grid=grid,
        tissue_tiles=len(rc),
        tiles_written=total,
        shards_written=len(pending),
        shards_skipped=skipped,
        failed_tiles=failed,
        reader=reader_name.split(" ")[0],
        seconds=seconds,
    )


def _open_or_create(
    out_path: Path,
    *,
    grid: TileGrid,
    table: dict[str, NDArray[Any]],
    tissue: Any,
    source: dict[str, Any],
    params: dict[str, Any],
    shard_tiles: int,
    codec: str,
    overwrite: bool,
    reader_name: str,
) -> TileStore:
    """Resume a matching store, refuse a mismatching one (unless ``overwrite``), or create one."""
    from pathology import __version__

    if out_path.exists():
        try:
            existing = TileStore.open(out_path, mode="r+")
        except StoreMismatchError:  # a tile store of a format this version cannot write
            if not overwrite:
                raise
            existing = None
        except Exception:
            existing = None
        if existing is not None:
            meta = existing.meta
            problem = describe_mismatch(meta["provenance"]["source"], source)
            problem = problem or describe_mismatch(meta["params"], params)
            if problem is None:
                existing.remove_partial_files()
                return existing
            if not overwrite:
                raise StoreMismatchError(
                    f"{out_path}: store was made from another slide or with other parameters "
                    f"({problem}); pass --overwrite to replace it or choose another --out"
                )
        elif not overwrite:
            raise StoreMismatchError(
                f"{out_path}: exists and is not a tile store; pass --overwrite to replace it or choose another --out"
            )
    provenance = {
        "source": source,
        "software": f"pathology {__version__}",
        "created": utc_now(),
        "reader": reader_name,
        "level_read": grid.level,
        "mpp_used": grid.mpp,
    }
    return TileStore.create(
        out_path,
        grid=grid,
        table=table,
        tissue_mask=tissue.mask,
        tissue_downsample_xy=tissue.downsample_xy,
        provenance=provenance,
        params=params,
        shard_tiles=shard_tiles,
        codec=codec,
        overwrite=overwrite,
    )
