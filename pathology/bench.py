"""``pathology bench``: throughput of each stage, measured in one run on the same tiles.

Rates from one run are comparable with each other; this machine class is noisy (+-25% between runs),
so the ratios (stage rate / raw decode rate) are the figures to quote, not bare seconds.

Stages measured so far:

- ``decode``: the limit. A plain ``read_region`` of every tissue tile's source box at the grid's
  level (OpenSlide, ``workers`` threads): no resampling, no writing.
- ``direct_decode``: the same boxes through the direct TIFF tile path, when the slide allows it.
- ``tiling``: :func:`pathology.tiling.tile_slide` into a fresh store (resample + encode + write).

Scoring and end-to-end stages join as the scoring engine lands.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BenchResult", "run_bench"]


@dataclass
class BenchResult:
    """Rates of one bench run (tiles/s and megapixels/s of output tiles)."""

    slide: str
    width: int
    height: int
    tile_px: int
    mpp: float
    workers: int
    tiles: int
    rates: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_worker_rss_mb: float = 0.0

    def to_json(self) -> dict[str, Any]:
        mpix = self.tile_px * self.tile_px / 1e6
        out: dict[str, Any] = {
            "slide": self.slide,
            "width": self.width,
            "height": self.height,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "workers": self.workers,
            "tiles": self.tiles,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_worker_rss_mb": round(self.peak_worker_rss_mb, 1),
        }
        decode = self.rates.get("decode")
        for name, rate in self.rates.items():
            out[f"{name}_tiles_per_s"] = round(rate, 1)
            out[f"{name}_mpix_per_s"] = round(rate * mpix, 2)
            if decode and name != "decode":
                out[f"{name}_vs_decode"] = round(rate / decode, 3)
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        out.update(self.notes)
        return out


def _peak_rss_mb() -> tuple[float, float]:
    """Peak RSS (MB) of this process and of the largest finished child (process-pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return own, children


def run_bench(
    slide: str | os.PathLike[str] | None = None,
    *,
    size_px: int = 10_000,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    workers: int = 2,
    scheduler: str = "processes",
    reader: str = "auto",
    work_dir: str | os.PathLike[str] | None = None,
    say: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Measure decode and tiling rates on ``slide`` (or a synthetic ``size_px`` square slide).

    Parameters
    ----------
    slide : path, optional
        Slide to measure; default: a synthetic p16 slide of ``size_px`` x ``size_px`` at 0.25 um/px,
        written to ``work_dir`` (reused if already there).
    target_mpp, tile_px, workers, scheduler, reader
        As in :func:`pathology.tiling.tile_slide`.
    work_dir : path, optional
        Where the synthetic slide and the temporary store go (default: a temporary folder).
    """
    from pathology.slide import open_slide
    from pathology.tiling import tile_slide
    from pathology.tiling._read import ReaderSpec, open_reader

    tmp = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="pathology-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if slide is None:
        from pathology.synth import SynthParams, synthesize_slide

        slide_path = tmp / f"bench-{size_px}.svs"
        if not slide_path.exists():
            say(f"synthesising a {size_px} x {size_px} slide")
            synthesize_slide(
                SynthParams.preset("p16_positive", width=size_px, height=size_px, seed=1),
                slide_path,
            )
    else:
        slide_path = Path(slide)
    store = tmp / "bench.zarr"
    if store.exists():
        shutil.rmtree(store)

    # Tiling first: it plans the grid and finds the tissue tiles the decode baseline then reads.
    say("tiling")
    t0 = time.perf_counter()
    result = tile_slide(
        slide_path,
        store,
        target_mpp=target_mpp,
        tile_px=tile_px,
        workers=workers,
        scheduler=scheduler,
        reader=reader,
    )
    t_tiling = time.perf_counter() - t0
    grid = result.grid
    from pathology.tiling import TileStore

    table = TileStore.open(store).table()
    rc = np.stack([table["row"], table["col"]], axis=1)
    boxes = [grid.level_region(tuple(b)) for b in grid.out_box(rc).tolist()]

    def decode_all(spec: ReaderSpec) -> float:
        readers: dict[int, Any] = {}

        def read(i: int) -> None:
            import threading

            tid = threading.get_ident()
            if tid not in readers:
                readers[tid] = open_reader(spec)
            l0_xy, size, _ = boxes[i]
            readers[tid].read_region(l0_xy, grid.level, size)

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(read, range(len(boxes))))
        return time.perf_counter() - t

    say("decode baseline (OpenSlide)")
    t_decode = decode_all(ReaderSpec(str(slide_path), None, False))
    bench = BenchResult(
        slide=slide_path.name,
        width=0,
        height=0,
        tile_px=tile_px,
        mpp=grid.mpp,
        workers=workers,
        tiles=len(boxes),
    )
    with open_slide(slide_path) as r:
        bench.width, bench.height = r.dimensions
    n = len(boxes)
    bench.seconds = {"decode": t_decode, "tiling": result.seconds, "tiling_total": t_tiling}
    bench.rates = {"decode": n / t_decode, "tiling": n / result.seconds}
    from pathology.tiling._run import _choose_reader

    direct_ok, why = _choose_reader(slide_path, "auto", grid)
    if direct_ok:
        say("decode baseline (direct TIFF tiles)")
        t_direct = decode_all(ReaderSpec(str(slide_path), None, True))
        bench.seconds["direct_decode"] = t_direct
        bench.rates["direct_decode"] = n / t_direct
    bench.notes = {
        "scheduler": scheduler,
        "tiling_reader": result.reader,
        "direct_reader": "yes" if direct_ok else why,
        "level_read": grid.level,
        "store_files": sum(1 for p in store.rglob("*") if p.is_file()),
        "store_mb": round(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6, 1),
        "slide_mb": round(slide_path.stat().st_size / 1e6, 1),
    }
    bench.peak_rss_mb, bench.peak_worker_rss_mb = _peak_rss_mb()
    shutil.rmtree(store, ignore_errors=True)
    return bench


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=2) + "\n")
