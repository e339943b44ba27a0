"""Score one slide: tile it (or reuse its store), estimate its stains, score every tissue tile,
sum the counts into the slide call, and write the slide's outputs.

Per slide, ``OUT/<slide_id>/`` holds::

    tiles.zarr/      the tile store (tiles, pyramid, tissue mask) + scores/<marker>/counts;
                     not made with ``ScoreSettings(store=False)`` (``--no-store``)
    tiles.parquet    one row per tissue tile: grid position, level-0 box, tissue fraction, counts
    cells.parquet    one row per cell (level-0 position, type, DAB per compartment, positivity)
    cells.geojson    the same cells as QuPath detections
    heatmap.png      positive cells per mm^2 over the slide thumbnail
    slide.json       the slides.csv row, provenance, stains and timings; written LAST
    work/            resume state while the slide is in progress (removed when it is done)

``slide.json`` is the completion mark: a slide with one is finished and a rerun with the same
settings skips it; without one, a rerun resumes the store and the scored shards in ``work/``.

Without a store (``store=False``) the tissue mask and the tile grid are planned as for the store,
and each shard's pixels (with their halo) are rendered straight from the slide by the tiler's own
reader (:class:`~pathology.tiling._image.SlideImage`): the pixels the store would hold, so the
counts are the same and part files in ``work/`` serve either way. The per-tile counts are then in
``tiles.parquet`` only, and the heatmap is drawn over a thumbnail read from the slide.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology._io import atomic_path, write_text
from pathology.batch._manifest import SlideJob
from pathology.errors import ConfigError, OutputExistsError

__all__ = [
    "REQUIRED_SLIDE_COLUMNS",
    "SLIDE_COLUMNS",
    "ScoreSettings",
    "SlideOutcome",
    "score_slide",
]

#: ``slides.csv`` columns: the contract (DESIGN.md section 3 / issue 5 order), then the extras.
SLIDE_COLUMNS = (
    "slide_id",
    "path",
    "marker",
    "call",
    "tumor_cells",
    "tumor_positive",
    "immune_cells",
    "immune_positive",
    "positive_pct",
    "cps",
    "tps",
    "h_score",
    "evaluable",
    "qc_flags",
    "device",
    "model",
    "version",
    "seconds",
    # extras after the 18 contract columns
    "patient_id",
    "p16_positive_pct",
    "weak_pct",
    "lymphocytes",
    "macrophages",
    "tissue_tiles",
    "tissue_mm2",
    "mpp",
    "marker_sha256",
)
#: The contract's columns (the first 18 of :data:`SLIDE_COLUMNS`).
REQUIRED_SLIDE_COLUMNS = SLIDE_COLUMNS[: SLIDE_COLUMNS.index("seconds") + 1]
CELL_TYPE_NAMES = ("tumor", "lymphocyte", "macrophage", "other")
#: Tiles sampled (evenly over the tissue) to estimate a slide's stain vectors.
STAIN_SAMPLE_TILES = 48
#: ``ScoreSettings.decode`` values.
DECODERS = ("auto", "cpu")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreSettings:
    """How slides are tiled and scored (shared by every slide of a batch).

    Attributes
    ----------
    target_mpp : float
        Microns per pixel tiles are scored at.
    tile_px : int
    min_tissue : float
        Tiles with less tissue (fraction, from the tissue mask) are not scored.
    device : str
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    workers : int
        Tiling threads, and on the CPU shards scored at once (each read and scored in its own
        thread with one torch thread: :func:`~pathology.batch._shards.score_image`); on CUDA,
        shard-reading threads ahead of the one model.
    batch_size : int, optional
        Tiles per forward pass; default 64 on the CPU, 1024 on CUDA
        (:func:`~pathology.scoring._device.default_batch_size`). On CUDA, consecutive shards are
        scored together in batches of up to this many tiles.
    model : str
        Model name or folder.
    stains : {"estimate", "reference"}
        Per-slide stain vectors, or the reference H-DAB vectors and white glass.
    geojson : bool
        Write ``cells.geojson`` (large for big slides).
    store : bool
        Keep the tiles in ``tiles.zarr`` (a cache: reused by later runs and viewers). False
        (``--no-store``) scores straight from the slide and writes no image: same pixels, same
        counts, so it is not part of the settings that decide whether a slide is redone.
    decode : {"auto", "cpu"}
        With ``store=False`` on a CUDA device, ``auto`` decodes the slide's native JPEG tiles on
        the GPU (nvJPEG) and renders the shards there (:class:`~pathology.tiling._device_image.
        DeviceJpegImage`) when the grid is an exact block mean of a JPEG level and torchvision
        is installed; otherwise, and with ``cpu``, tiles are rendered by the reading threads.
        nvJPEG's pixels are within rounding of libjpeg-turbo's (counts within a fraction of a
        percent, not bit for bit); ``slide.json`` records which decoder ran (``tile_decoder``).
        Like ``store``, not one of the settings that decide whether a slide is redone.
    """

    target_mpp: float = 0.5
    tile_px: int = 256
    min_tissue: float = 0.25
    device: str = "auto"
    workers: int = 2
    batch_size: int | None = None
    model: str = "physics-v1"
    stains: str = "estimate"
    geojson: bool = True
    store: bool = True
    decode: str = "auto"


@dataclass(frozen=True)
class SlideOutcome:
    """A finished slide: its ``slides.csv`` row and whether this run computed it."""

    slide_id: str
    row: dict[str, Any]
    reused: bool
    slide_dir: Path


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of the first and last MiB: a replaced slide file is noticed, cheaply."""
    import hashlib

    from pathology.errors import SlideNotFoundError

    if not path.exists():
        raise SlideNotFoundError(path, "no such file")
    if not path.is_file():
        raise SlideNotFoundError(path, "is a folder, not a slide file")
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
    return {"bytes": size, "head_tail_sha256": h.hexdigest()}


def _key(job: SlideJob, settings: ScoreSettings, marker_sha: str, marker: str) -> dict[str, Any]:
    """What determines a slide's results: a finished slide with another key is not reused.

    ``settings.store`` is left out on purpose: with or without a store the tiles have the same
    pixels, so the results (and the part files of an interrupted run) are the same. The model's
    fingerprint is in: results of a refitted or changed model are never reused."""
    from pathology.scoring import model_fingerprint

    return {
        "path": str(job.path.resolve()),
        "file": file_fingerprint(job.path),
        "marker": marker,
        "marker_sha256": marker_sha,
        "model": settings.model,
        "model_sha256": model_fingerprint(settings.model),
        "target_mpp": settings.target_mpp,
        "tile_px": settings.tile_px,
        "min_tissue": settings.min_tissue,
        "slide_mpp": job.mpp,
        "stains": settings.stains,
    }


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    for k in new:
        if old.get(k) != new[k]:
            if k == "model_sha256":
                was = str(old.get(k))[:12] if old.get(k) else "not recorded"
                return f"the model or scoring engine changed: model_sha256 was {was}, now {new[k][:12]}"
            return f"{k} was {old.get(k)!r}, now {new[k]!r}"
    return "settings differ"


def finished_row(slide_dir: Path, key: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The saved row of a finished slide with the same key; None when there is none (or when
    ``overwrite`` discards one made with other settings). Raises when one exists with other
    settings and ``overwrite`` is false."""
    done = slide_dir / "slide.json"
    if not done.exists():
        return None
    try:
        saved = json.loads(done.read_text())
        same = saved["key"] == key
    except (ValueError, KeyError, TypeError):
        saved, same = {}, False
    if same:
        return dict(saved["row"])
    if not overwrite:
        raise OutputExistsError(
            f"{slide_dir}: holds results made with other settings "
            f"({_describe(saved.get('key', {}), key)}); pass --overwrite to replace them or choose another --out"
        )
    done.unlink()
    return None


def _stains(
    read_tile: Callable[[int, int], NDArray[np.uint8]],
    table: dict[str, NDArray[Any]],
    cfg: Any,
    work: Path,
    mode: str,
    workers: int = 1,
) -> Any:
    """The slide's stain estimate, computed once and saved (a resumed run reuses it).

    ``read_tile(row, col)`` gives a tissue tile as (3, T, T) uint8 (from the store or the slide);
    the sample is read in ``workers`` threads.
    """
    from pathology.scoring._api import marker_is_nuclear
    from pathology.scoring._stains import StainEstimate, estimate_stains

    path = work / "stains.json"
    if not path.exists():
        if mode == "reference":
            est = StainEstimate()
        else:
            n = len(table["row"])
            order = np.argsort(-table["tissue"], kind="stable")
            pick = np.sort(order[np.linspace(0, n - 1, min(n, STAIN_SAMPLE_TILES)).astype(int)])
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                sample = list(
                    pool.map(lambda i: read_tile(int(table["row"][i]), int(table["col"][i])), pick)
                )
            tiles = np.stack(sample).transpose(0, 2, 3, 1)
            est = estimate_stains(tiles, estimate_dab=not marker_is_nuclear(cfg))
        write_text(path, json.dumps(est.to_dict(), indent=2) + "\n")
    # Always score with the estimate as read back from disk: first run and resumed run agree bit for bit.
    return StainEstimate.from_dict(json.loads(path.read_text()))


def _thumbnail(store: Any, max_px: int = 2048) -> tuple[NDArray[np.uint8], float]:
    """(thumbnail (h, w, 3), store pixels per thumbnail pixel) from the store's coarsest level."""
    from pathology.slide import block_mean
    from pathology.tiling._store import PYRAMID_LEVELS

    arr = store.group[str(PYRAMID_LEVELS)]
    thumb = np.asarray(arr[...]).transpose(1, 2, 0)
    k = max(1, -(-max(thumb.shape[:2]) // max_px))
    if k > 1:
        thumb = block_mean(thumb, k)
    return np.ascontiguousarray(thumb), float(2**PYRAMID_LEVELS * k)


def _slide_thumbnail(
    path: Path, slide_mpp: float | None, grid: Any, max_px: int = 2048
) -> tuple[NDArray[np.uint8], float]:
    """(thumbnail (h, w, 3), ``out`` pixels per thumbnail pixel) read from the slide, at the
    scale :func:`_thumbnail` gives the store (1/8 of the tiles' resolution, at most ``max_px``)."""
    from pathology.slide import open_slide, read_downsampled

    out_per_thumb = 8.0 * max(1, -(-max(grid.out_size) // (8 * max_px)))
    with open_slide(path, mpp=slide_mpp) as reader:
        thumb, ds_xy = read_downsampled(reader, out_per_thumb * grid.l0_per_out, round_up=True)
    return thumb, float(ds_xy[0]) / grid.l0_per_out


def _cells_frame(cells: dict[str, NDArray[Any]], l0_per_out: float, mpp: float) -> Any:
    """Cells with continuous level-0 coordinates (pixel ``i`` spans ``[i, i + 1)``, as in QuPath)."""
    import pandas as pd

    if not cells:
        cols = ["x_l0", "y_l0", "tile", "type", "type_prob", "positive", "intensity_bin"]
        return pd.DataFrame({c: [] for c in cols})
    frame = pd.DataFrame(
        {
            "x_l0": (cells["x"] + 0.5) * l0_per_out,
            "y_l0": (cells["y"] + 0.5) * l0_per_out,
            "tile": cells["tile"].astype(np.int64),
            "type": pd.Categorical.from_codes(
                cells["type"].astype(np.int64), categories=list(CELL_TYPE_NAMES)
            ).astype(str),
            "type_prob": cells["type_prob"].astype(np.float32),
            "positive": cells["positive"].astype(bool),
            "intensity_bin": cells["intensity_bin"].astype(np.int8),
        }
    )
    for name in (
        "nucleus_dab",
        "cytoplasm_dab",
        "membrane_dab",
        "membrane_coverage",
        "scored_dab",
        "nucleus_area_um2",
    ):
        frame[name] = cells[name].astype(np.float32)
    return frame


def _fmt(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


def score_slide(
    job: SlideJob,
    out: Path,
    settings: ScoreSettings,
    *,
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> SlideOutcome:
    """Tile, score and call one slide into ``out/<slide_id>/``; resumes and reuses finished work.

    Raises a :class:`~pathology.errors.PathologyError` naming the file for bad input (a missing,
    corrupt or non-slide file, a missing mpp, an unknown marker) and
    :class:`~pathology.errors.OutputExistsError` when the folder holds this slide's results made
    with other settings (unless ``overwrite``).
    """
    from pathology import __version__
    from pathology.calls import SlideQC, call_slide
    from pathology.scoring import load_marker, load_model
    from pathology.scoring._model import halo_for

    stage = on_stage or (lambda _msg: None)
    cfg = load_marker(job.marker)
    slide_dir = out / job.slide_id
    key = _key(job, settings, cfg.sha256, cfg.name)
    row = finished_row(slide_dir, key, overwrite)
    if row is not None:
        return SlideOutcome(job.slide_id, row, True, slide_dir)
    t_start = time.perf_counter()
    # Open the slide first: a corrupt file or a missing mpp fails before anything is written.
    from pathology.slide import open_slide

    with open_slide(job.path, mpp=job.mpp) as reader:
        _ = reader.mpp
    work = slide_dir / "work"
    if work.exists():
        try:
            same = json.loads((work / "key.json").read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:  # unfinished work of other settings: ours to discard, never a result
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text(work / "key.json", json.dumps(key, indent=2) + "\n")

    stage("tiling" if settings.store else "planning tiles")
    t0 = time.perf_counter()
    source = (_store_source if settings.store else _slide_source)(
        job, slide_dir, settings, overwrite, on_tiles
    )
    t_tiling = time.perf_counter() - t0
    grid, table = source.grid, source.table
    mpp = grid.mpp

    try:
        stage("stains")
        t0 = time.perf_counter()
        stains = _stains(source.read_tile, table, cfg, work, settings.stains, settings.workers)
        t_stains = time.perf_counter() - t0

        stage("scoring")
        t0 = time.perf_counter()
        from pathology.batch._shards import score_image

        scorer = load_model(
            cfg,
            mpp,
            model=settings.model,
            stains=stains,
            halo_px=halo_for(mpp),
            device=settings.device,
        )
        device = str(next(iter(scorer.buffers())).device)
        scores = score_image(
            source.image,
            table,
            grid.tile_px,
            source.shard_tiles,
            scorer,
            work / "parts",
            batch_size=settings.batch_size,
            read_workers=settings.workers,
            model_workers=settings.workers,
            progress=on_tiles,
            is_bad=source.is_bad,
        )
        t_scoring = time.perf_counter() - t0
    finally:
        source.close()

    stage("writing outputs")
    t0 = time.perf_counter()
    totals = dict(zip(scores.count_names, scores.counts.sum(0).tolist(), strict=True))
    tile_mm2 = (grid.tile_px * mpp / 1000.0) ** 2
    tissue_mm2 = float(table["tissue"].astype(np.float64).sum() * tile_mm2)
    bad_shards = source.bad_shards() if source.store is not None else scores.bad_shards
    qc = SlideQC(
        tissue_mm2=tissue_mm2,
        stains_in_range=stains.in_range,
        background=stains.background,
        unreadable_tiles=bad_shards,
    )
    call = call_slide(totals, cfg, qc)
    model_name = str(getattr(scorer, "model_name", settings.model))
    provenance = {
        "software": f"pathology {__version__}",
        "model": model_name,
        "marker": cfg.name,
        "marker_sha256": cfg.sha256,
        "marker_source": cfg.source,
        "device": device,
        "slide": str(job.path),
        "slide_id": job.slide_id,
    }
    if source.store is not None:
        _write_store_counts(source.store, scores, provenance)
    elif (slide_dir / "tiles.zarr").exists():
        # A store left by an earlier, interrupted run with a store: without counts it is stale.
        shutil.rmtree(slide_dir / "tiles.zarr")
    _write_tiles(slide_dir / "tiles.parquet", table, scores, tile_mm2, provenance)
    cells = _cells_frame(scores.cells, grid.l0_per_out, mpp)
    cells.attrs["provenance"] = provenance  # pandas keeps attrs in the parquet metadata
    with atomic_path(slide_dir / "cells.parquet") as tmp:
        cells.to_parquet(tmp, index=False)
    if settings.geojson:
        from pathology.batch._geojson import write_cells_geojson

        write_cells_geojson(
            slide_dir / "cells.geojson",
            cells,
            l0_mpp=grid.slide_mpp,
            marker=cfg.name,
            provenance=provenance,
        )
    from pathology.batch._heatmap import write_heatmap

    if source.store is not None:
        thumb, store_px_per_thumb = _thumbnail(source.store)
    else:
        thumb, store_px_per_thumb = _slide_thumbnail(job.path, job.mpp, grid)
    pos = (
        scores.counts[:, list(scores.count_names).index("tumor_positive")]
        + scores.counts[:, list(scores.count_names).index("immune_positive")]
    )
    write_heatmap(
        slide_dir / "heatmap.png",
        thumb,
        np.stack([table["row"], table["col"]], 1).astype(np.int64),
        pos / tile_mm2,
        tile_px_thumb=grid.tile_px / store_px_per_thumb,
        title=f"{job.slide_id}: {cfg.name} {call.call}",
        label="positive cells per mm²",
        provenance=provenance,
    )
    t_outputs = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    row = {
        "slide_id": job.slide_id,
        "path": str(job.path),
        "marker": cfg.name,
        "call": call.call,
        "tumor_cells": call.tumor_cells,
        "tumor_positive": call.tumor_positive,
        "immune_cells": call.immune_cells,
        "immune_positive": call.immune_positive,
        "positive_pct": _fmt(call.positive_pct),
        "cps": _fmt(call.cps),
        "tps": _fmt(call.tps),
        "h_score": _fmt(call.h_score, 1),
        "evaluable": call.evaluable,
        "qc_flags": ";".join(call.qc_flags),
        "device": device,
        "model": model_name,
        "version": __version__,
        "seconds": round(seconds, 2),
        "patient_id": job.patient_id,
        "p16_positive_pct": _fmt(call.positive_pct) if call.rule == "p16" else None,
        "weak_pct": _fmt(call.weak_pct),
        "lymphocytes": int(totals.get("lymphocytes", 0)),
        "macrophages": int(totals.get("macrophages", 0)),
        "tissue_tiles": len(table["row"]),
        "tissue_mm2": round(tissue_mm2, 3),
        "mpp": round(mpp, 4),
        "marker_sha256": cfg.sha256,
    }
    record = {
        "row": row,
        "key": key,
        "provenance": provenance,
        "stains": stains.to_dict(),
        "totals": totals,
        "timings_s": {
            "tiling": round(t_tiling, 3),
            "stains": round(t_stains, 3),
            "scoring": round(t_scoring, 3),
            "outputs": round(t_outputs, 3),
            # Within scoring: in the model (summed over the model workers), and waiting for
            # tiles read ahead in threads (one model worker only).
            "scoring_model": round(scores.model_s, 3),
            "scoring_read_wait": round(scores.read_wait_s, 3),
            "scoring_model_workers": scores.model_workers,
        },
        "shards": {"scored": scores.shards_scored, "resumed": scores.shards_skipped},
        "tile_store": source.store is not None,
        "tile_decoder": source.decoder,
        "tile_decoder_cpu_shards": int(getattr(source.image, "fallbacks", 0)),
    }
    write_text(slide_dir / "slide.json", json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return SlideOutcome(job.slide_id, row, False, slide_dir)


@dataclass
class _TileSource:
    """Where a slide's tile pixels come from while it is scored: its store, or the slide itself.

    ``image`` is sliced like the store's (3, H, W) array; ``read_tile(row, col)`` gives (3, T, T).
    """

    grid: Any  # TileGrid
    table: dict[str, NDArray[Any]]
    image: Any
    shard_tiles: int
    read_tile: Callable[[int, int], NDArray[np.uint8]]
    is_bad: Callable[[Any], bool]
    store: Any = None  # TileStore, when there is one
    close: Callable[[], None] = lambda: None
    decoder: str = "cpu"  # who decodes the tiles scored: "cpu", or "nvjpeg" on the device

    def bad_shards(self) -> int:
        return int((self.store.shard_progress == 2).sum())


def _store_source(
    job: SlideJob,
    slide_dir: Path,
    settings: ScoreSettings,
    overwrite: bool,
    on_tiles: Callable[[int, int], None] | None,
) -> _TileSource:
    """Tile the slide into ``tiles.zarr`` (resuming it) and read the tiles from there."""
    from pathology.tiling import TileGrid, TileStore, tile_slide

    tiling = tile_slide(
        job.path,
        slide_dir / "tiles.zarr",
        target_mpp=settings.target_mpp,
        tile_px=settings.tile_px,
        min_tissue=settings.min_tissue,
        workers=settings.workers,
        # Threads: a process pool costs each worker its start-up and imports (0.6-1 CPU-s), more
        # than the GIL costs the threads now that the store's writes are cheap (README).
        scheduler="sync" if settings.workers == 1 else "threads",
        slide_mpp=job.mpp,
        overwrite=overwrite,
        progress=on_tiles,
    )
    store = TileStore.open(tiling.store, mode="r+")
    flags = store.shard_progress
    return _TileSource(
        grid=TileGrid.from_dict(store.meta["grid"]),
        table=store.table(),
        image=store.image,
        shard_tiles=int(store.meta["shard_tiles"]),
        read_tile=lambda r, c: store.read_tile(r, c, overlap_px=0),
        is_bad=lambda shard: bool(flags[shard.shard_rc] == 2),
        store=store,
    )


def _slide_source(
    job: SlideJob,
    slide_dir: Path,
    settings: ScoreSettings,
    overwrite: bool,
    on_tiles: Callable[[int, int], None] | None,
) -> _TileSource:
    """Plan the tissue tiles as the tiler does and render them from the slide when read."""
    from pathology.tiling._image import SlideImage
    from pathology.tiling._read import ReaderSpec
    from pathology.tiling._run import SHARD_TILES, _choose_reader, plan_tissue_tiles

    plan = plan_tissue_tiles(
        job.path,
        target_mpp=settings.target_mpp,
        tile_px=settings.tile_px,
        min_tissue=settings.min_tissue,
        slide_mpp=job.mpp,
    )
    direct, _ = _choose_reader(job.path, "auto", plan.grid)  # the tiler's choice: same pixels
    image = SlideImage(
        ReaderSpec(str(job.path.resolve()), job.mpp, direct), plan.grid, plan.tiles_rc
    )
    scored: Any = image
    decoder = "cpu"
    device = _device_decoder(job.path, plan.grid, settings)
    if device is not None:
        from pathology.tiling._device_image import DeviceJpegImage

        scored = DeviceJpegImage(image, device)
        decoder = "nvjpeg" if device.type == "cuda" else "cpu"
    return _TileSource(
        grid=plan.grid,
        table=plan.table,
        image=scored,
        shard_tiles=SHARD_TILES,
        read_tile=image.read_tile,
        is_bad=lambda shard: scored.any_failed(shard.tiles_rc),
        close=scored.close,
        decoder=decoder,
    )


def _device_decoder(path: Path, grid: Any, settings: ScoreSettings) -> Any:
    """The CUDA device to decode the slide's JPEG tiles on (``settings.decode`` auto), or None:
    CPU scoring, ``decode="cpu"``, a grid or slide the device path cannot render exactly, or no
    torchvision (the ``gpu`` extra); the reason is logged."""
    from pathology.scoring import resolve_device
    from pathology.tiling._device_image import device_decode_support
    from pathology.tiling._jpeg import nvjpeg_unavailable

    if settings.decode not in DECODERS:
        raise ConfigError(f"decode must be one of {', '.join(DECODERS)}, got {settings.decode!r}")
    dev = resolve_device(settings.device)
    if settings.decode == "cpu" or dev.type != "cuda":
        return None
    why = device_decode_support(path, grid) or nvjpeg_unavailable()
    if why is not None:
        log.info("%s: tiles decoded on the CPU: %s", path.name, why)
        return None
    return dev


def _write_store_counts(store: Any, scores: Any, provenance: dict[str, Any]) -> None:
    """Per-tile counts beside the tiles, in ``scores/<marker>/counts`` (aligned with ``tiles/``)."""
    group = store.group.require_group("scores")
    name = provenance["marker"]
    if name in group:
        del group[name]
    sub = group.create_group(name)
    n = max(1, scores.counts.shape[0])
    arr = sub.create_array(
        "counts",
        shape=scores.counts.shape,
        chunks=(n, len(scores.count_names)),
        dtype="int32",
        fill_value=0,
        dimension_names=("tile", "count"),
    )
    if scores.counts.size:
        arr[...] = scores.counts.astype(np.int32)
    sub.attrs.update({"count_names": list(scores.count_names), **provenance})


def _write_tiles(
    path: Path,
    table: dict[str, NDArray[Any]],
    scores: Any,
    tile_mm2: float,
    provenance: dict[str, Any],
) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {k: table[k] for k in ("row", "col", "l0_x", "l0_y", "l0_w", "l0_h", "tissue")}
    )
    for j, name in enumerate(scores.count_names):
        frame[name] = scores.counts[:, j].astype(np.int32)
    frame["positive_per_mm2"] = (
        (frame["tumor_positive"] + frame["immune_positive"]) / tile_mm2
    ).astype(np.float32)
    frame.attrs["provenance"] = provenance
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
