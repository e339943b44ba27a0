"""Score a slide's tissue tiles shard by shard, resumably, with reading overlapped with the model.

A shard (``shard_tiles x shard_tiles`` tiles, the store's write unit) is read as ONE region with a
halo of context around it, cut into overlapping tiles (tile + halo on every side), scored as one
batch, and its per-tile counts and cells are saved to ``parts/`` as one file, written atomically.
A rerun scores only the shards without a part file, so a run killed at any instant resumes where it
stopped and gives the same numbers. The region comes from the Zarr store (:func:`score_store`) or
straight from the slide (:func:`score_image` over a :class:`~pathology.tiling._image.SlideImage`,
``pathology score --no-store``); both hold the same pixels, so their part files are interchangeable.

Frames: ``out_*`` pixels of the store image at the store's mpp; tile ``(row, col)`` covers
``[col * tile_px, (col + 1) * tile_px)`` in x. Cell ``x``/``y`` in the part files are ``out``
pixel coordinates (pixel ``i``'s centre is ``i``).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pathology._io import write_bytes

if TYPE_CHECKING:
    from pathology.scoring._model import CellScorer
    from pathology.tiling import TileStore

__all__ = [
    "Shard",
    "StoreScores",
    "load_parts",
    "plan_shards",
    "read_shard_tiles",
    "score_image",
    "score_store",
    "shard_blocks",
]


@dataclass(frozen=True)
class Shard:
    """The tissue tiles of one store shard.

    Attributes
    ----------
    shard_rc : (int, int)
    index : ndarray (k,) int64
        Rows of the store's tile table.
    tiles_rc : ndarray (k, 2) int64
        (row, col) of each tile.
    """

    shard_rc: tuple[int, int]
    index: NDArray[np.int64]
    tiles_rc: NDArray[np.int64]

    @property
    def name(self) -> str:
        return f"shard-{self.shard_rc[0]:04d}-{self.shard_rc[1]:04d}.npz"


@dataclass(frozen=True)
class StoreScores:
    """Counts and cells of every tissue tile of a store.

    Attributes
    ----------
    counts : ndarray (n_tiles, C) int64
        Aligned with the store's tile table; columns ``count_names``.
    count_names : tuple of str
    cells : dict of str -> ndarray (K,)
        :data:`~pathology.scoring.CELL_FIELDS` with ``tile`` the table row and ``x``/``y`` in
        ``out`` pixels of the whole store image.
    shards_scored, shards_skipped : int
        Shards scored by this call / found done from an earlier run.
    bad_shards : int
        Shards with tiles that could not be read (left white), as recorded in the part files.
    model_s, read_wait_s : float
        Seconds of this call spent in the model (:func:`run_model`, including the copies to and
        from the device; summed over the model workers) and waiting for the read-ahead threads
        (0 with several model workers, which read their own shards): a model busy only a small
        part of the time is starved by reading and decoding.
    model_workers : int
        Shards scored at once (see :func:`score_image`).
    """

    counts: NDArray[np.int64]
    count_names: tuple[str, ...]
    cells: dict[str, NDArray[Any]]
    shards_scored: int
    shards_skipped: int
    bad_shards: int = 0
    model_s: float = 0.0
    read_wait_s: float = 0.0
    model_workers: int = 1


def plan_shards(table: dict[str, NDArray[Any]], shard_tiles: int) -> list[Shard]:
    """Group the tile table's rows by shard, shards in row-major order."""
    rc = np.stack([table["row"], table["col"]], 1).astype(np.int64)
    key = rc // shard_tiles
    shards = []
    for s in sorted({(int(a), int(b)) for a, b in key.tolist()}):
        idx = np.flatnonzero((key[:, 0] == s[0]) & (key[:, 1] == s[1])).astype(np.int64)
        shards.append(Shard(s, idx, rc[idx]))
    return shards


def read_shard_tiles(
    image: Any, tiles_rc: NDArray[np.int64], tile_px: int, halo_px: int
) -> NDArray[np.uint8]:
    """Tiles (k, 3, T + 2 halo, T + 2 halo) uint8 cut from one read of their bounding region.

    ``image`` is the store's (3, H, W) array, or anything sliced like it (a
    :class:`~pathology.tiling._image.SlideImage`); pixels outside it are white glass. An image
    that renders shards itself (:class:`~pathology.tiling._device_image.DeviceJpegImage`) gives
    them as a torch tensor on its device.
    """
    if hasattr(image, "read_shard"):
        return image.read_shard(tiles_rc, tile_px, halo_px)
    _, h, w = image.shape
    t, o = tile_px, halo_px
    r0, c0 = (int(v) for v in tiles_rc.min(0))
    r1, c1 = (int(v) + 1 for v in tiles_rc.max(0))
    y0, x0 = r0 * t - o, c0 * t - o
    y1, x1 = r1 * t + o, c1 * t + o
    region = np.full((3, y1 - y0, x1 - x0), 255, np.uint8)
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if yb > ya and xb > xa:
        region[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = image[:, ya:yb, xa:xb]
    side = t + 2 * o
    out = np.empty((len(tiles_rc), 3, side, side), np.uint8)
    for k, (r, c) in enumerate(tiles_rc.tolist()):
        oy, ox = (r - r0) * t, (c - c0) * t
        out[k] = region[:, oy : oy + side, ox : ox + side]
    return out


def _save_part(
    path: Path, shard: Shard, counts: NDArray[Any], cells: dict[str, Any], bad: bool
) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        index=shard.index,
        counts=counts,
        bad=np.uint8(bad),
        **{f"cell_{k}": v for k, v in cells.items()},
    )
    write_bytes(path, buf.getvalue())


def _prefetch(
    pool: ThreadPoolExecutor, fn: Callable[[Shard], Any], items: list[Shard], depth: int
) -> Iterator[tuple[Shard, Any]]:
    """Yield ``(item, fn(item))`` in order while up to ``depth`` later items are read ahead."""
    queue: deque[tuple[Shard, Future[Any]]] = deque()
    it = iter(items)
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= depth:
            break
    while queue:
        item, fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut.result()


def score_store(
    store: TileStore,
    scorer: CellScorer,
    parts_dir: Path,
    *,
    batch_size: int | None = None,
    read_workers: int = 2,
    model_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> StoreScores:
    """Score every tissue tile of ``store`` with ``scorer``; resumable through ``parts_dir``.

    Parameters
    ----------
    store : TileStore
    scorer : CellScorer
        Built for the store's mpp with a ``halo_px`` of context (:func:`pathology.scoring.load_model`).
    parts_dir : Path
        One ``shard-RRRR-CCCC.npz`` per scored shard; existing ones are reused.
    batch_size : int, optional
        Tiles per forward pass (default 64 on the CPU, 1024 on CUDA, where consecutive shards are
        scored together in batches of about this many tiles).
    read_workers : int
        Threads reading and cutting shards ahead of the model.
    model_workers : int
        Shards scored at once on the CPU (see :func:`score_image`).
    progress : callable(tiles_done, tiles_total), optional
    """
    meta = store.meta
    flags = store.shard_progress
    return score_image(
        store.image,
        store.table(),
        int(meta["grid"]["tile_px"]),
        int(meta["shard_tiles"]),
        scorer,
        parts_dir,
        batch_size=batch_size,
        read_workers=read_workers,
        model_workers=model_workers,
        progress=progress,
        is_bad=lambda s: bool(flags[s.shard_rc] == 2),
    )


def score_image(
    image: Any,
    table: dict[str, NDArray[Any]],
    tile_px: int,
    shard_tiles: int,
    scorer: CellScorer,
    parts_dir: Path,
    *,
    batch_size: int | None = None,
    read_workers: int = 2,
    model_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    is_bad: Callable[[Shard], bool] | None = None,
    group_tiles: int | None = None,
) -> StoreScores:
    """Score the tissue tiles of ``table`` read from ``image``; resumable through ``parts_dir``.

    Parameters
    ----------
    image : (3, H, W) uint8 array-like
        The store's image array, or a :class:`~pathology.tiling._image.SlideImage` rendering the
        same pixels from the slide; sliced from ``read_workers`` threads at once.
    table : dict of str -> ndarray (n,)
        The tile table (``row``, ``col`` at least); counts come back aligned with it.
    tile_px, shard_tiles : int
        Tile edge in ``out`` pixels; tiles per shard edge (one part file per shard).
    scorer, parts_dir, batch_size, read_workers, progress
        As in :func:`score_store`.
    model_workers : int
        On the CPU, more than 1 scores that many shards at once, each in its own thread that
        reads its shard and runs the model with one torch thread (``read_workers`` is then not
        used). Measured on the 2-core dev box (``pathology bench --stages end_to_end_no_store``,
        765 tiles): straight from the slide, 2 such workers scored 289-294 tiles/s where one
        model with 2 torch threads and 2 read-ahead threads scored 210-216; from the store both
        ways ran alike. The same shards give the same part files either way. On CUDA the
        device serialises the batches, so this is ignored (one model, reads ahead in threads).
    is_bad : callable(Shard) -> bool, optional
        Called after a shard is read: whether some of its tiles were unreadable (recorded in its
        part file and counted in ``bad_shards``).
    group_tiles : int, optional
        With one model (always on CUDA), consecutive shards are scored in one call of up to this
        many tiles (:func:`shard_blocks`); each shard still gets its own part file. Default:
        ``batch_size`` on CUDA (a shard's 64 tiles are too few to fill a GPU), 1 (a call per
        shard) on the CPU.
    """
    import torch

    from pathology.scoring._api import TileScores, run_model
    from pathology.scoring._device import default_batch_size, gil_switch_interval, torch_threads
    from pathology.scoring._model import COUNT_NAMES

    n = len(table["row"])
    shards = plan_shards(table, shard_tiles)
    parts_dir.mkdir(parents=True, exist_ok=True)
    pending = [s for s in shards if not (parts_dir / s.name).exists()]
    todo = {s.name for s in pending}
    done = n - sum(len(s.index) for s in pending)
    if progress is not None:
        progress(done, n)
    halo = int(scorer.halo_px)

    def read(shard: Shard) -> tuple[NDArray[np.uint8], bool]:
        tiles = read_shard_tiles(image, shard.tiles_rc, tile_px, halo)
        return tiles, bool(is_bad(shard)) if is_bad is not None else False

    model_s = wait_s = 0.0
    device = next(iter(scorer.buffers())).device
    cpu = device.type == "cpu"
    parallel = max(1, int(model_workers)) if cpu else 1

    def read_score(shard: Shard) -> tuple[TileScores, bool, float]:
        tiles, bad = read(shard)
        t0 = time.perf_counter()
        res = run_model(scorer, tiles, batch_size)
        return res, bad, time.perf_counter() - t0

    def save(shard: Shard, res: TileScores, bad: bool) -> None:
        nonlocal done
        cells = dict(res.cells)
        if cells:
            local = cells["tile"]
            cells["x"] = cells["x"].astype(np.float64) + shard.tiles_rc[local, 1] * tile_px
            cells["y"] = cells["y"].astype(np.float64) + shard.tiles_rc[local, 0] * tile_px
            cells["tile"] = shard.index[local]
        _save_part(parts_dir / shard.name, shard, res.counts, cells, bad)
        if shard.name in todo:
            todo.discard(shard.name)
            done += len(shard.index)
            if progress is not None:
                progress(done, n)

    if pending and parallel > 1:
        # Each worker reads its own shard and scores it with one torch thread; parts are saved
        # here, in shard order, as they finish.
        with torch_threads(1), ThreadPoolExecutor(max_workers=parallel) as pool:
            for shard, (res, bad, seconds) in _prefetch(pool, read_score, pending, parallel + 1):
                model_s += seconds
                save(shard, res, bad)
    elif pending:
        # On CUDA, consecutive shards go through the model together, up to ``batch`` tiles at a
        # time (a shard holds at most shard_tiles**2 tiles, 64 by default: too few to fill a
        # GPU); each keeps its own part file. On the CPU one shard is one call, as before.
        batch = int(batch_size or default_batch_size(device))
        if group_tiles is None:
            group_tiles = batch if device.type == "cuda" else 1
        # The groups are fixed blocks of the whole plan, and a block with any shard pending is
        # scored whole (its finished parts rewritten with the same values): a tile's numbers
        # depend on its place in the batch at float rounding (sample_points), so a resumed run
        # must batch exactly as an uninterrupted one to give the same numbers.
        blocks = shard_blocks(shards, group_tiles)
        block_of = {s.name: b for b, block in enumerate(blocks) for s in block}
        redo = sorted({block_of[s.name] for s in pending})
        to_score = [s for b in redo for s in blocks[b]]
        depth = max(2, read_workers, -(-group_tiles // max(1, shard_tiles**2)) + 1)
        group: list[tuple[Shard, NDArray[np.uint8], bool]] = []

        def flush() -> None:
            nonlocal model_s
            parts = [g[1] for g in group]
            if len(parts) == 1:
                tiles = parts[0]
            elif isinstance(parts[0], np.ndarray):
                tiles = np.concatenate(parts)
            else:  # tensors already on the device (DeviceJpegImage)
                tiles = torch.cat(parts)
            t0 = time.perf_counter()
            res = run_model(scorer, tiles, batch)
            model_s += time.perf_counter() - t0
            start = 0
            for shard, part, bad in group:
                save(shard, _slice_scores(res, start, start + len(part)), bad)
                start += len(part)
            group.clear()

        switch = gil_switch_interval() if device.type == "cuda" else contextlib.nullcontext()
        with switch, ThreadPoolExecutor(max_workers=max(1, read_workers)) as pool:
            mark = time.perf_counter()
            for shard, (tiles, bad) in _prefetch(pool, read, to_score, depth=depth):
                wait_s += time.perf_counter() - mark
                if group and block_of[group[0][0].name] != block_of[shard.name]:
                    flush()
                group.append((shard, tiles, bad))
                mark = time.perf_counter()
            if group:
                flush()
    counts, cells, bad_shards = load_parts(parts_dir, shards, n, len(COUNT_NAMES))
    return StoreScores(
        counts=counts,
        count_names=COUNT_NAMES,
        cells=cells,
        shards_scored=len(pending),
        shards_skipped=len(shards) - len(pending),
        bad_shards=bad_shards,
        model_s=model_s,
        read_wait_s=wait_s,
        model_workers=parallel,
    )


def shard_blocks(shards: list[Shard], group_tiles: int) -> list[list[Shard]]:
    """Consecutive shards in blocks of at most ``group_tiles`` tissue tiles (a bigger shard is a
    block of its own): the batches a single model scores together, one forward pass each when
    ``group_tiles`` is the batch size. They depend on the plan alone, not on which shards are
    already done."""
    blocks: list[list[Shard]] = []
    held = 0
    for shard in shards:
        k = len(shard.index)
        if not blocks or held + k > group_tiles:
            blocks.append([])
            held = 0
        blocks[-1].append(shard)
        held += k
    return blocks


def _slice_scores(res: Any, start: int, stop: int) -> Any:
    """The :class:`~pathology.scoring.TileScores` of tiles ``[start, stop)`` of ``res``, with
    cell ``tile`` indices counted from ``start``."""
    from dataclasses import replace

    cells = res.cells
    if cells:
        sel = (cells["tile"] >= start) & (cells["tile"] < stop)
        cells = {k: v[sel] for k, v in cells.items()}
        cells["tile"] = cells["tile"] - start
    return replace(res, counts=res.counts[start:stop], cells=cells)


def load_parts(
    parts_dir: Path, shards: list[Shard], n_tiles: int, n_counts: int
) -> tuple[NDArray[np.int64], dict[str, NDArray[Any]], int]:
    """Per-tile counts (aligned with the tile table), all cells, and the number of shards with
    unreadable tiles, from the part files."""
    counts = np.zeros((n_tiles, n_counts), np.int64)
    pieces: dict[str, list[NDArray[Any]]] = {}
    bad = 0
    for shard in shards:
        with np.load(parts_dir / shard.name) as part:
            counts[part["index"]] = part["counts"]
            bad += int(part["bad"]) if "bad" in part.files else 0
            for key in part.files:
                if key.startswith("cell_"):
                    pieces.setdefault(key[5:], []).append(part[key])
    cells = {k: np.concatenate(v) for k, v in pieces.items()}
    return counts, cells, bad
