"""Score one slide: tile it (or reuse its store), estimate its stains, score every tissue tile,
sum the counts into the slide call, and write the slide's outputs.

Per slide, ``OUT/<slide_id>/`` holds::

    tiles.zarr/      the tile store (tiles, pyramid, tissue mask) + scores/<marker>/counts
    tiles.parquet    one row per tissue tile: grid position, level-0 box, tissue fraction, counts
    cells.parquet    one row per cell (level-0 position, type, DAB per compartment, positivity)
    cells.geojson    the same cells as QuPath detections
    heatmap.png      positive cells per mm^2 over the slide thumbnail
    slide.json       the slides.csv row, provenance, stains and timings; written LAST
    work/            resume state while the slide is in progress (removed when it is done)

``slide.json`` is the completion mark: a slide with one is finished and a rerun with the same
settings skips it; without one, a rerun resumes the store and the scored shards in ``work/``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology._io import atomic_path, write_text
from pathology.batch._manifest import SlideJob
from pathology.errors import OutputExistsError

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
        Tiling processes and shard-reading threads.
    batch_size : int
        Tiles per forward pass.
    model : str
        Model name or folder.
    stains : {"estimate", "reference"}
        Per-slide stain vectors, or the reference H-DAB vectors and white glass.
    geojson : bool
        Write ``cells.geojson`` (large for big slides).
    """

    target_mpp: float = 0.5
    tile_px: int = 256
    min_tissue: float = 0.25
    device: str = "auto"
    workers: int = 2
    batch_size: int = 64
    model: str = "physics-v1"
    stains: str = "estimate"
    geojson: bool = True


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
    """What determines a slide's results: a finished slide with another key is not reused."""
    return {
        "path": str(job.path.resolve()),
        "file": file_fingerprint(job.path),
        "marker": marker,
        "marker_sha256": marker_sha,
        "model": settings.model,
        "target_mpp": settings.target_mpp,
        "tile_px": settings.tile_px,
        "min_tissue": settings.min_tissue,
        "slide_mpp": job.mpp,
        "stains": settings.stains,
    }


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    for k in new:
        if old.get(k) != new[k]:
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


def _stains(store: Any, cfg: Any, work: Path, mode: str) -> Any:
    """The slide's stain estimate, computed once and saved (a resumed run reuses it)."""
    from pathology.scoring._api import marker_is_nuclear
    from pathology.scoring._stains import StainEstimate, estimate_stains

    path = work / "stains.json"
    if not path.exists():
        if mode == "reference":
            est = StainEstimate()
        else:
            table = store.table()
            n = len(table["row"])
            order = np.argsort(-table["tissue"], kind="stable")
            pick = np.sort(order[np.linspace(0, n - 1, min(n, STAIN_SAMPLE_TILES)).astype(int)])
            tiles = np.stack(
                [
                    store.read_tile(int(table["row"][i]), int(table["col"][i]), overlap_px=0)
                    for i in pick
                ]
            ).transpose(0, 2, 3, 1)
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
    from pathology.tiling import TileGrid, TileStore, tile_slide

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

    stage("tiling")
    t0 = time.perf_counter()
    tiling = tile_slide(
        job.path,
        slide_dir / "tiles.zarr",
        target_mpp=settings.target_mpp,
        tile_px=settings.tile_px,
        min_tissue=settings.min_tissue,
        workers=settings.workers,
        # One worker gains nothing from a process pool but pays its start-up (~1.5 s per slide).
        scheduler="sync" if settings.workers == 1 else "processes",
        slide_mpp=job.mpp,
        overwrite=overwrite,
        progress=on_tiles,
    )
    t_tiling = time.perf_counter() - t0
    store = TileStore.open(tiling.store, mode="r+")
    grid = TileGrid.from_dict(store.meta["grid"])
    mpp = grid.mpp

    stage("stains")
    t0 = time.perf_counter()
    stains = _stains(store, cfg, work, settings.stains)
    t_stains = time.perf_counter() - t0

    stage("scoring")
    t0 = time.perf_counter()
    from pathology.batch._shards import score_store

    scorer = load_model(
        cfg, mpp, model=settings.model, stains=stains, halo_px=halo_for(mpp), device=settings.device
    )
    device = str(next(iter(scorer.buffers())).device)
    scores = score_store(
        store,
        scorer,
        work / "parts",
        batch_size=settings.batch_size,
        read_workers=settings.workers,
        progress=on_tiles,
    )
    t_scoring = time.perf_counter() - t0

    stage("writing outputs")
    t0 = time.perf_counter()
    table = store.table()
    totals = dict(zip(scores.count_names, scores.counts.sum(0).tolist(), strict=True))
    tile_mm2 = (grid.tile_px * mpp / 1000.0) ** 2
    tissue_mm2 = float(table["tissue"].astype(np.float64).sum() * tile_mm2)
    bad_shards = int((store.shard_progress == 2).sum())
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
    _write_store_counts(store, scores, provenance)
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

    thumb, store_px_per_thumb = _thumbnail(store)
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
        },
        "shards": {"scored": scores.shards_scored, "resumed": scores.shards_skipped},
    }
    write_text(slide_dir / "slide.json", json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return SlideOutcome(job.slide_id, row, False, slide_dir)


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
