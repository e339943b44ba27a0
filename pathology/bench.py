"""``pathology bench``: throughput of each stage, measured in one run on the same tiles.

Rates from one run are comparable with each other; this machine class is noisy (+-25% between runs),
so the ratios (stage rate / raw decode rate, stage rate / classical peer rate) are the figures to
quote, not bare seconds.

Stages, in the order they run (every rate is tissue tiles per second; megapixels per second count
the ``tile_px x tile_px`` output tile, without the scoring halo):

- ``tiling``: :func:`pathology.tiling.tile_slide` into a fresh store (read + resample + encode +
  write). It runs first because it plans the grid and finds the tissue tiles every other stage uses.
- ``decode``: the limit. A plain ``read_region`` of every tissue tile's source box at the grid's
  level (OpenSlide, ``workers`` threads): no resampling, no writing.
- ``direct_decode``: the same boxes through the direct TIFF tile path, when the slide allows it.
- ``jpeg_batch_decode``: the native JPEG tiles of the grid's level (level 0 on the synthetic slide)
  that cover the tissue tiles, each read once as a standalone stream
  (:meth:`~pathology.tiling._direct.DirectTiffSource.read_jpeg`) and decoded in batches of
  ``JPEG_BATCH_TILES`` by :func:`pathology.tiling._jpeg.decode_jpeg_batch` on ``device``: nvJPEG
  on CUDA, libjpeg-turbo in ``workers`` threads on CPU. Reading the bytes is inside the timing.
  The rate counts tissue tiles, like ``decode`` (``jpeg_batch_native_tiles_per_s`` counts native
  tiles); skipped, with the reason in ``jpeg_batch_decoder``, when that level is not JPEG or the
  direct path refuses the slide.
- ``model``: the scoring model alone (:func:`pathology.scoring.run_model`, batches of
  ``batch_size``, on the CPU ``workers`` batches at once as the product scores) on tiles already
  in memory, (N, 3, T + 2 halo, T + 2 halo) uint8 cut from the
  store: the model's cost without any loading. Repeated until it has run ``MODEL_MIN_S`` seconds,
  then one more pass with per-step timing: ``model_steps_pct`` says where the model's time goes
  (deconvolve, detect, rays, typing, compartments, counts). On CUDA a pass holds at least
  ``MODEL_GPU_BATCHES`` full batches (the tiles repeated; ``model_tiles_per_pass``): on the H100
  the 765 tiles of the 20000 x 15000 slide, one partial batch of 1024, measured 17-19k tiles/s
  where 4,096 tiles in batches of 1024 measured 26-31k.
- ``scoring``: :func:`pathology.batch._shards.score_store` over every tissue tile of the store,
  into a fresh parts folder: the model plus reading the tiles from Zarr, as the product scores.
- ``end_to_end``: :func:`pathology.batch.score_slide` on the same slide into a fresh folder:
  tiling, stain estimate, scoring and outputs (GeoJSON off); rate = tissue tiles / wall seconds.
- ``end_to_end_no_store``: the same with ``ScoreSettings(store=False)`` (``pathology score
  --no-store``): tiles rendered from the slide shard by shard, read ahead of the model in
  ``workers`` threads, no Zarr written or read. Same tiles, same counts: with both stages the
  JSON says whether the two runs' summed counts agree (``end_to_end_no_store_same_counts``). On
  CUDA the shards are decoded (nvJPEG) and rendered on the GPU where the slide allows it
  (``end_to_end_no_store_decoder``: ``nvjpeg`` or ``cpu``); nvJPEG's pixels are within rounding of
  the CPU decoder's, so the counts then agree within a fraction of a percent, not exactly.
- ``cohort`` (only with ``cohort_slides`` > 0, e.g. ``pathology bench --cohort 8``): that many
  links to the slide, scored as ``pathology score SLIDES... --workers N`` scores a folder (tile
  store on, GeoJSON off): with several slides and ``workers > 1`` a local Dask cluster of
  ``workers`` processes, one slide each at a time (on CUDA two per GPU), so one slide's per-slide
  work overlaps another's tiling and scoring. Rate = all slides' tissue tiles / wall seconds,
  cluster start and each worker's first imports included (they weigh less as the cohort grows);
  ``cohort_slides_per_hour`` is the answer to "how long will my cohort of such slides take".
  ``cohort_same_counts``: every slide's summed counts equal the ``end_to_end`` run's.
- ``peer``: the classical CPU pipeline (:func:`pathology.peer.classical_score_tile`: skimage
  ``rgb2hed`` + Otsu + watershed + ``regionprops``) on up to ``peer_tiles`` evenly spaced tiles of
  the same set, in ``workers`` processes (started and warmed before the clock starts).

``<stage>_model_busy_pct`` (``scoring``, ``end_to_end``, ``end_to_end_no_store``) is the share of
the stage's wall time spent inside the model: on a GPU, how busy the product keeps the device (the
complaint about peer tools is GPUs idling at 10-20 % while the CPU decodes).

On CUDA, ``<stage>_gpu_util_pct`` (``model``, ``scoring``, both end-to-end stages) is the mean of
the driver's utilisation counter (NVML, through ``torch.cuda.utilization``: the share of time a
kernel was running) sampled every ``GPU_SAMPLE_S`` over the stage, and ``gpu_peak_mem_mb`` the most
memory torch held on the device. Without NVML (``nvidia-ml-py``) ``gpu_util`` says why.

``<stage>_per_slide_s`` and ``<stage>_tile_rate`` (both end-to-end stages) split a run for the
cohort cost model: the per-tile part is tiling plus scoring (``slide.json`` timings), at
``tile_rate`` tiles/s; the rest (model and stain set-up, the stain estimate from a fixed sample of
tiles, the outputs) is paid once per slide. A bench slide is small, so that part weighs more in its
end-to-end rate than on a clinical slide of thousands of tiles:
time per slide ~ ``per_slide_s + tiles / tile_rate``.

The JSON adds ``<stage>_vs_decode`` for every stage and ``<stage>_vs_peer`` for ``model``,
``scoring``, ``end_to_end`` and ``end_to_end_no_store``. On the CPU it adds
``cpu_bound_tiles_per_s`` (and ``cpu_bound_vs_peer``): ``1 / (1 / decode + 1 / model)`` with the
faster of the two decode rates, the most tiles/s an end-to-end path can reach on these cores when
decoding and the model share them and nothing else runs (no resampling, store, stain estimate or
outputs). It tells how far the product path is from what the cores allow, and whether a target
such as ">= 10x the peer end to end" is reachable on the machine at all.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIONAL_STAGES", "BenchResult", "GpuSampler", "run_bench"]

#: Stages that can be left out (tiling and decode always run: every other stage needs them).
OPTIONAL_STAGES = (
    "jpeg_batch_decode",
    "model",
    "scoring",
    "end_to_end",
    "end_to_end_no_store",
    "peer",
)
#: Stages that run :func:`pathology.batch.score_slide` (the product path), with its store or not.
END_TO_END = {"end_to_end": True, "end_to_end_no_store": False}
#: Stages compared with the classical peer.
PEER_COMPARED = ("model", "scoring", "end_to_end", "end_to_end_no_store", "cohort")
#: The ``model`` stage repeats its pass over the in-memory tiles until it has run this long
#: (one pass of a few thousand tiles is over in ~0.1 s on a GPU: too short to time).
MODEL_MIN_S = 2.0
#: On CUDA the ``model`` stage's pass holds at least this many full batches (tiles repeated).
MODEL_GPU_BATCHES = 4
#: Streams per :func:`~pathology.tiling._jpeg.decode_jpeg_batch` call in ``jpeg_batch_decode``
#: (256 tiles of 256 px are 50 MB decoded).
JPEG_BATCH_TILES = 256
#: Seconds between samples of the GPU's utilisation counter.
GPU_SAMPLE_S = 0.05


def significant(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant figures: a rate keeps its relative precision
    whether it is 3.46 tiles/s (a cohort of small slides on 2 cores) or 1,956 (tile decoding);
    rounding to 0.1 made the first 3.5, 1.2 % off."""
    return float(f"{x:.{digits}g}")


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
    device: str = "cpu"
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
            "device": self.device,
            "tiles": self.tiles,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_worker_rss_mb": round(self.peak_worker_rss_mb, 1),
        }
        decode = self.rates.get("decode")
        peer = self.rates.get("peer")
        for name, rate in self.rates.items():
            out[f"{name}_tiles_per_s"] = significant(rate)
            out[f"{name}_mpix_per_s"] = significant(rate * mpix)
            if decode and name != "decode":
                out[f"{name}_vs_decode"] = round(rate / decode, 3)
        for name in PEER_COMPARED:
            if peer and name in self.rates:
                out[f"{name}_vs_peer"] = round(self.rates[name] / peer, 2)
        bound = self.cpu_bound()
        if bound is not None:
            out["cpu_bound_tiles_per_s"] = significant(bound)
            if peer:
                out["cpu_bound_vs_peer"] = round(bound / peer, 2)
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        out.update(self.notes)
        return out

    def cpu_bound(self) -> float | None:
        """Most tiles/s any end-to-end path can reach on these cores: each tile decoded (the faster
        decode measured) and scored by the model, nothing else, the two sharing the cores, so their
        times per tile add: ``1 / (1 / decode + 1 / model)``. None off the CPU (there the model
        runs on the device, beside the decoding) or when either rate is missing."""
        decode = max(self.rates.get("decode", 0.0), self.rates.get("direct_decode", 0.0))
        model = self.rates.get("model", 0.0)
        if self.device != "cpu" or decode <= 0 or model <= 0:
            return None
        return 1.0 / (1.0 / decode + 1.0 / model)


def _peak_rss_mb() -> tuple[float, float]:
    """Peak RSS (MB) of this process and of the largest finished child (process-pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return own, children


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timed region ends when its kernels do (no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class GpuSampler:
    """Samples the device's utilisation counter in a thread while the ``with`` block runs.

    ``mean_pct`` is None off CUDA, without NVML, or when no sample was taken. NVML's counter is
    the share of the last sample period (1/6 s to 1 s, by GPU) in which any kernel ran: a GPU
    kept busy by small kernels reads high even with idle multiprocessors, so it bounds the
    device's idle time, not its efficiency.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[int] = []
        self.why_not: str | None = None
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> GpuSampler:
        import threading

        if self.device.type != "cuda":
            self.why_not = "not on CUDA"
            return self
        import torch

        try:
            torch.cuda.utilization(self.device)
        except Exception as exc:  # pynvml missing, or NVML refused (a container without it)
            self.why_not = f"no NVML ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
            return self
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(GPU_SAMPLE_S):
                try:
                    self.samples.append(int(torch.cuda.utilization(self.device)))
                except Exception:  # the driver went away mid-run: keep what was sampled
                    return

        self._thread = threading.Thread(target=run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def mean_pct(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _gpu_note(bench: BenchResult, name: str, sampler: GpuSampler) -> None:
    """Record a stage's mean GPU utilisation (CUDA only; the reason once when it cannot be read)."""
    if sampler.device.type != "cuda":
        return
    if sampler.mean_pct is not None:
        bench.notes[f"{name}_gpu_util_pct"] = sampler.mean_pct
    elif sampler.why_not:
        bench.notes.setdefault("gpu_util", sampler.why_not)


def _size_wh(size_px: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size_px, int):
        return size_px, size_px
    w, h = size_px
    return int(w), int(h)


def _synthetic_slide(tmp: Path, size_px: int | tuple[int, int], say: Callable[[str], None]) -> Path:
    """The synthetic p16 bench slide (0.25 um/px) in ``tmp``, written once and reused."""
    from pathology.synth import SynthParams, synthesize_slide

    w, h = _size_wh(size_px)
    path = tmp / (f"bench-{w}.svs" if w == h else f"bench-{w}x{h}.svs")
    if not path.exists():
        say(f"synthesising a {w} x {h} slide")
        synthesize_slide(SynthParams.preset("p16_positive", width=w, height=h, seed=1), path)
    return path


def _tiles_in_memory(store: Any, halo_px: int, limit: int) -> tuple[NDArray[np.uint8], int]:
    """Up to ``limit`` tissue tiles (evenly spaced over the table) with their halo, as the scorer
    takes them: ((k, 3, T + 2 halo, T + 2 halo) uint8, T)."""
    from pathology.batch._shards import plan_shards, read_shard_tiles

    meta = store.meta
    tile_px = int(meta["grid"]["tile_px"])
    table = store.table()
    n = len(table["row"])
    pick = (
        np.unique(np.linspace(0, n - 1, min(n, limit)).astype(np.int64))
        if n
        else np.zeros(0, np.int64)
    )
    chosen = np.zeros(n, bool)
    chosen[pick] = True
    side = tile_px + 2 * halo_px
    out = np.empty((len(pick), 3, side, side), np.uint8)
    k = 0
    for shard in plan_shards(table, int(meta["shard_tiles"])):
        keep = chosen[shard.index]
        if keep.any():
            tiles = read_shard_tiles(store.image, shard.tiles_rc[keep], tile_px, halo_px)
            out[k : k + len(tiles)] = tiles
            k += len(tiles)
    return out, tile_px


def _time_model(
    scorer: Any, tiles: NDArray[np.uint8], batch_size: int, workers: int
) -> tuple[int, float, dict[str, float], int]:
    """(tiles scored, seconds) of repeated :func:`run_model` passes over in-memory tiles, with
    ``workers`` batches at once on the CPU as the product scores, the seconds per model step
    of one more pass, one batch at a time (:meth:`CellScorer.step_times`), and the tiles per
    pass (on CUDA, the tiles repeated to :data:`MODEL_GPU_BATCHES` full batches)."""
    import torch

    from pathology.scoring._api import run_model

    device = next(iter(scorer.buffers())).device
    batch: Any = tiles
    if device.type == "cuda":  # pin once, as a loader would; run_model then copies non_blocking
        # At least MODEL_GPU_BATCHES full batches per pass (the tiles repeated): a bench slide's
        # few hundred tiles are one partial batch, which times the per-call costs, not the model.
        want = MODEL_GPU_BATCHES * batch_size
        if 0 < len(tiles) < want:
            tiles = np.resize(tiles, (want, *tiles.shape[1:]))
        batch = torch.from_numpy(tiles).pin_memory()
    run_model(scorer, batch[: min(len(tiles), 2)], batch_size)  # warm-up: allocator, kernels
    done, seconds = 0, 0.0
    while seconds < MODEL_MIN_S or done == 0:
        _sync(device)
        t0 = time.perf_counter()
        run_model(scorer, batch, batch_size, workers=workers)
        _sync(device)
        seconds += time.perf_counter() - t0
        done += len(tiles)
    with scorer.step_times() as steps:
        run_model(scorer, batch, batch_size)
    return done, seconds, dict(steps), len(tiles)


def _peer_warm() -> None:
    """Import the peer's libraries in a pool worker and hold it briefly, so every worker gets one."""
    import skimage.color
    import skimage.feature
    import skimage.measure
    import skimage.segmentation  # noqa: F401

    time.sleep(0.5)


def _peer_cells(tile_rgb: NDArray[np.uint8], mpp: float) -> int:
    """Cells the classical peer finds in one (H, W, 3) tile (run in a pool worker)."""
    from pathology.peer import classical_score_tile

    return classical_score_tile(tile_rgb, mpp).n_cells


def _time_peer(tiles_rgb: NDArray[np.uint8], mpp: float, workers: int) -> tuple[float, int]:
    """(seconds, cells found) of the classical peer over (k, H, W, 3) tiles in ``workers``
    processes. Spawned, not forked: this process holds torch and OpenMP threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        wait([pool.submit(_peer_warm) for _ in range(max(1, workers))])
        chunk = max(1, len(tiles_rgb) // (4 * max(1, workers)))
        t0 = time.perf_counter()
        cells = list(pool.map(_peer_cells, tiles_rgb, [mpp] * len(tiles_rgb), chunksize=chunk))
        seconds = time.perf_counter() - t0
    return seconds, int(sum(cells))


def run_bench(
    slide: str | os.PathLike[str] | None = None,
    *,
    size_px: int | tuple[int, int] = 10_000,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    workers: int = 2,
    scheduler: str = "threads",
    reader: str = "auto",
    marker: str = "p16",
    device: str = "auto",
    batch_size: int | None = None,
    model_tiles: int = 2048,
    peer_tiles: int = 64,
    stages: Collection[str] = OPTIONAL_STAGES,
    work_dir: str | os.PathLike[str] | None = None,
    cohort_slides: int = 0,
    say: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Measure every stage's rate on ``slide`` (or a synthetic slide of ``size_px``), in one run.

    Parameters
    ----------
    slide : path, optional
        Slide to measure; default: a synthetic p16 slide of ``size_px`` at 0.25 um/px, written to
        ``work_dir`` (reused if already there).
    size_px : int or (int, int)
        Synthetic slide edge, or (width, height), in level-0 pixels.
    target_mpp, tile_px, workers, scheduler, reader
        As in :func:`pathology.tiling.tile_slide`; ``workers`` also sets the decode threads, the
        store-reading threads of scoring, the end-to-end workers and the peer's processes.
    marker : str
        Marker scored by ``model``, ``scoring`` and ``end_to_end`` (the synthetic slide is p16).
    device : {"auto", "cpu", "cuda"} or "cuda:N"
        Where the model runs; the resolved device is recorded.
    batch_size : int, optional
        Tiles per forward pass (default 64 on the CPU, 1024 on CUDA).
    model_tiles : int
        At most this many tiles (evenly spaced) are held in memory for the ``model`` stage.
    peer_tiles : int
        At most this many of those tiles (evenly spaced) are given to the classical peer.
    stages : collection of str
        Which of :data:`OPTIONAL_STAGES` to run (tiling and decode always run).
    work_dir : path, optional
        Where the synthetic slide and the temporary outputs go (default: a temporary folder).
    cohort_slides : int
        Score this many links to the slide as one batch (the ``cohort`` stage); 0 skips it.
    say : callable(str)
        Receives a short message as each stage starts.

    Returns
    -------
    BenchResult
    """
    from pathology.errors import ConfigError
    from pathology.scoring import resolve_device
    from pathology.scoring._device import default_batch_size
    from pathology.slide import open_slide
    from pathology.tiling import TileStore, tile_slide
    from pathology.tiling._read import ReaderSpec, open_reader

    unknown = set(stages) - set(OPTIONAL_STAGES)
    if unknown:
        raise ConfigError(
            f"unknown bench stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPTIONAL_STAGES)}"
        )
    if cohort_slides < 0:
        raise ConfigError(f"cohort slides must be 0 or more, got {cohort_slides}")
    dev = resolve_device(device)
    batch_size = int(batch_size or default_batch_size(dev))
    tmp = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="pathology-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    slide_path = _synthetic_slide(tmp, size_px, say) if slide is None else Path(slide)
    store = tmp / "bench.zarr"
    parts_dir = tmp / "bench-parts"
    e2e_dir = tmp / "bench-end-to-end"
    e2e_dirs = {"end_to_end": e2e_dir, "end_to_end_no_store": tmp / "bench-end-to-end-no-store"}
    cohort_dir = tmp / "bench-cohort"
    for old in (store, parts_dir, *e2e_dirs.values(), cohort_dir):
        if old.exists():
            shutil.rmtree(old)

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

    tile_store = TileStore.open(store)
    table = tile_store.table()
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
        device=str(dev),
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
    jpeg_notes = (
        _jpeg_batch_stage(bench, slide_path, grid, boxes, dev, say)
        if n and "jpeg_batch_decode" in stages
        else {}
    )
    import torch

    bench.notes = {
        "scheduler": scheduler,
        "tiling_reader": result.reader,
        "direct_reader": "yes" if direct_ok else why,
        "level_read": grid.level,
        "store_files": sum(1 for p in store.rglob("*") if p.is_file()),
        "store_mb": round(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6, 1),
        "slide_mb": round(slide_path.stat().st_size / 1e6, 1),
        "marker": marker,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        **jpeg_notes,
    }
    if n and set(stages) - set(END_TO_END) - {"jpeg_batch_decode"}:
        _score_stages(
            bench,
            tile_store,
            parts_dir,
            marker=marker,
            dev=dev,
            batch_size=batch_size,
            stages=stages,
            model_tiles=model_tiles,
            peer_tiles=peer_tiles,
            say=say,
        )
    if n and (cohort_slides or any(name in stages for name in END_TO_END)):
        _import_output_writers(dev)
    totals = {
        name: _end_to_end(
            bench, slide_path, e2e_dirs[name], marker, str(dev), batch_size, target_mpp, say, name
        )
        for name in END_TO_END
        if n and name in stages
    }
    if len(totals) == 2:  # the no-store path renders the store's pixels: the counts must agree
        a, b = totals["end_to_end"], totals["end_to_end_no_store"]
        bench.notes["end_to_end_no_store_same_counts"] = a == b
        # With nvJPEG the pixels differ by rounding: how far the summed counts moved.
        bench.notes["end_to_end_no_store_counts_max_rel_diff"] = round(
            max((abs(a[k] - b.get(k, 0)) / max(1, a[k]) for k in a), default=0.0), 4
        )
    if n and cohort_slides:
        _cohort(
            bench,
            slide_path,
            cohort_dir,
            marker,
            str(dev),
            batch_size,
            target_mpp,
            cohort_slides,
            say,
            totals.get("end_to_end"),
        )
    bench.peak_rss_mb, bench.peak_worker_rss_mb = _peak_rss_mb()
    if dev.type == "cuda":
        bench.notes["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        bench.notes["gpu_name"] = torch.cuda.get_device_name(dev)
    for done in (store, parts_dir, *e2e_dirs.values(), cohort_dir):
        shutil.rmtree(done, ignore_errors=True)
    return bench


def _jpeg_batch_stage(
    bench: BenchResult,
    slide_path: Path,
    grid: Any,
    boxes: list[Any],
    dev: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The ``jpeg_batch_decode`` stage; returns its notes (``jpeg_batch_decoder`` says how, or why not)."""
    from pathology.tiling._direct import open_direct, why_not
    from pathology.tiling._jpeg import decode_jpeg_batch

    source = open_direct(slide_path)
    if source is None:
        return {"jpeg_batch_decoder": f"skipped: no direct tile path ({why_not(slide_path)})"}
    with source:
        level = int(grid.level)
        lv = source.levels[level]
        if lv.compression != "jpeg":
            return {"jpeg_batch_decoder": f"skipped: level {level} tiles are {lv.compression}"}
        # Native tiles under the tissue tiles' level boxes, each once (neighbouring boxes share).
        ds = source.level_downsamples[level]
        (tw, th), (cols, rows) = lv.tile_px, lv.tiles_cr
        wanted: set[tuple[int, int]] = set()
        for l0_xy, (w, h), _ in boxes:
            x, y = round(l0_xy[0] / ds), round(l0_xy[1] / ds)
            for r in range(max(y, 0) // th, min((y + h - 1) // th, rows - 1) + 1):
                wanted.update(
                    (c, r) for c in range(max(x, 0) // tw, min((x + w - 1) // tw, cols - 1) + 1)
                )
        tiles_cr = sorted(wanted, key=lambda cr: (cr[1], cr[0]))
        how = f"libjpeg-turbo, {bench.workers} threads"
        if dev.type == "cuda":  # RGB-coded tiles: nvJPEG would colour-convert them (see _jpeg)
            how = "nvJPEG (torchvision)" if lv.jpeg_colorspace != "RGB" else how + ", to cuda"
        say(f"JPEG batch decode ({len(tiles_cr)} native tiles, {how})")
        try:  # warm-up: thread pool, and on CUDA torchvision's import and nvJPEG's handle
            first = source.read_jpeg(level, *tiles_cr[0])
            if first is not None:
                decode_jpeg_batch([first], dev, workers=bench.workers)
        except ImportError as exc:
            return {"jpeg_batch_decoder": f"skipped: {' '.join(str(exc).split())}"}
        _sync(dev)
        t0 = time.perf_counter()
        streams = [source.read_jpeg(level, c, r) for c, r in tiles_cr]
        t_read = time.perf_counter() - t0
        present = [s for s in streams if s is not None]
        for i in range(0, len(present), JPEG_BATCH_TILES):
            decode_jpeg_batch(present[i : i + JPEG_BATCH_TILES], dev, workers=bench.workers)
        _sync(dev)
        seconds = time.perf_counter() - t0
    bench.seconds["jpeg_batch_decode"] = seconds
    bench.rates["jpeg_batch_decode"] = bench.tiles / seconds
    return {
        "jpeg_batch_decoder": how,
        "jpeg_batch_level": level,
        "jpeg_batch_native_tiles": len(tiles_cr),
        "jpeg_batch_native_tiles_per_s": round(len(tiles_cr) / seconds, 1),
        "jpeg_batch_read_s": round(t_read, 3),
        "jpeg_batch_size": JPEG_BATCH_TILES,
    }


def _score_stages(
    bench: BenchResult,
    store: Any,
    parts_dir: Path,
    *,
    marker: str,
    dev: torch.device,
    batch_size: int,
    stages: Collection[str],
    model_tiles: int,
    peer_tiles: int,
    say: Callable[[str], None],
) -> None:
    """The ``model``, ``scoring`` and ``peer`` stages on the store ``tiling`` wrote."""
    from pathology.batch._shards import score_store
    from pathology.scoring import load_model
    from pathology.scoring._model import halo_for

    halo_px = halo_for(bench.mpp)
    say("loading tiles into memory")
    tiles, tile_px = _tiles_in_memory(store, halo_px, max(model_tiles, peer_tiles))
    t0 = time.perf_counter()
    scorer = load_model(marker, bench.mpp, halo_px=halo_px, device=dev)
    bench.seconds["model_load"] = time.perf_counter() - t0
    bench.notes["halo_px"] = halo_px
    if "model" in stages:
        say(f"model alone ({len(tiles)} tiles in memory, batch {batch_size})")
        with GpuSampler(dev) as gpu:
            done, seconds, steps, per_pass = _time_model(scorer, tiles, batch_size, bench.workers)
        _gpu_note(bench, "model", gpu)
        total = sum(steps.values()) or 1.0
        bench.notes["model_steps_pct"] = {k: round(100 * v / total, 1) for k, v in steps.items()}
        bench.seconds["model"] = seconds
        bench.rates["model"] = done / seconds
        bench.notes["model_tiles"] = len(tiles)
        bench.notes["model_tiles_per_pass"] = per_pass
        bench.notes["model_tiles_scored"] = done
    if "scoring" in stages:
        say("scoring the store")
        _sync(dev)
        with GpuSampler(dev) as gpu:
            t0 = time.perf_counter()
            scores = score_store(
                store,
                scorer,
                parts_dir,
                batch_size=batch_size,
                read_workers=bench.workers,
                model_workers=bench.workers,
            )
            _sync(dev)
            seconds = time.perf_counter() - t0
        _gpu_note(bench, "scoring", gpu)
        bench.seconds["scoring"] = seconds
        bench.rates["scoring"] = bench.tiles / seconds
        bench.notes["scoring_model_busy_pct"] = round(
            100 * scores.model_s / (seconds * scores.model_workers), 1
        )
        names = list(scores.count_names)
        kinds = [names.index(k) for k in ("tumor_cells", "immune_cells", "other_cells")]
        bench.notes["scoring_cells"] = int(scores.counts[:, kinds].sum())
    if "peer" in stages:
        pick = np.unique(np.linspace(0, len(tiles) - 1, min(len(tiles), peer_tiles)).astype(int))
        core = tiles[pick, :, halo_px : halo_px + tile_px, halo_px : halo_px + tile_px]
        core = np.ascontiguousarray(core.transpose(0, 2, 3, 1))
        say(f"classical peer ({len(core)} tiles in {max(1, bench.workers)} process(es))")
        seconds, cells = _time_peer(core, bench.mpp, bench.workers)
        bench.seconds["peer"] = seconds
        bench.rates["peer"] = len(core) / seconds
        bench.notes["peer_tiles"] = len(core)
        bench.notes["peer_processes"] = max(1, bench.workers)
        bench.notes["peer_cells"] = cells


def _import_output_writers(dev: torch.device) -> None:
    """Import what the end-to-end runs' outputs use (pandas, pyarrow, matplotlib: ~0.8 s) and, on
    CUDA, torchvision (nvJPEG for ``--no-store``; its first import took ~5 s on the H100 box,
    charged to the first no-store run's planning) before either run is timed: otherwise
    whichever runs first pays it alone, and a cohort pays it once per process, not per slide."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    if dev.type == "cuda":  # without it, --no-store decodes on the CPU (recorded per run)
        from pathology.tiling._jpeg import nvjpeg_unavailable

        nvjpeg_unavailable()


def _product_settings(
    bench: BenchResult, device: str, batch_size: int, target_mpp: float, *, store: bool
) -> Any:
    """The ``ScoreSettings`` the end-to-end and cohort stages score with (GeoJSON off)."""
    from pathology.batch import ScoreSettings

    return ScoreSettings(
        target_mpp=target_mpp,
        tile_px=bench.tile_px,
        device=device,
        workers=bench.workers,
        batch_size=batch_size,
        geojson=False,
        store=store,
    )


def _end_to_end(
    bench: BenchResult,
    slide_path: Path,
    out: Path,
    marker: str,
    device: str,
    batch_size: int,
    target_mpp: float,
    say: Callable[[str], None],
    name: str = "end_to_end",
) -> dict[str, int]:
    """The product path, :func:`pathology.batch.score_slide`, timed from call to return; ``name``
    is a key of :data:`END_TO_END` (with the tile store, or straight from the slide). Returns the
    slide's summed counts."""
    from pathology.batch import SlideJob, score_slide
    from pathology.scoring import resolve_device

    settings = _product_settings(bench, device, batch_size, target_mpp, store=END_TO_END[name])
    job = SlideJob(slide_id="bench", path=slide_path, marker=marker)
    say(f"end to end (pathology.batch.score_slide{'' if settings.store else ', no store'})")
    with GpuSampler(resolve_device(device)) as gpu:
        t0 = time.perf_counter()
        outcome = score_slide(job, out, settings)
        seconds = time.perf_counter() - t0
    _gpu_note(bench, name, gpu)
    tiles = int(outcome.row["tissue_tiles"])
    bench.seconds[name] = seconds
    bench.rates[name] = tiles / seconds
    bench.notes[f"{name}_tiles"] = tiles
    record = json.loads((outcome.slide_dir / "slide.json").read_text())
    split = record.get("timings_s", {})
    bench.notes[f"{name}_split_s"] = split
    bench.notes[f"{name}_decoder"] = record.get("tile_decoder", "cpu")
    # Share of the whole run the model was busy (on a GPU: the device's share, copies included).
    busy = split.get("scoring_model", 0) / split.get("scoring_model_workers", 1)
    bench.notes[f"{name}_model_busy_pct"] = round(100 * busy / seconds, 1)
    # Cost model: tiling and scoring grow with the tiles; everything else is paid once per slide.
    per_tile_s = split.get("tiling", 0.0) + split.get("scoring", 0.0)
    if per_tile_s > 0:
        bench.notes[f"{name}_per_slide_s"] = round(max(0.0, seconds - per_tile_s), 3)
        bench.notes[f"{name}_tile_rate"] = round(tiles / per_tile_s, 1)
    return dict(record["totals"])


def _link_slide(src: Path, dst: Path) -> None:
    """``dst`` opens as the slide ``src``: a symbolic link (a copy where links are refused), and
    the same for a data folder named like the slide beside it (MIRAX keeps its tiles there)."""
    pairs = [(src, dst)]
    if src.with_suffix("").is_dir():
        pairs.append((src.with_suffix(""), dst.with_suffix("")))
    for a, b in pairs:
        try:
            b.symlink_to(a.resolve(), target_is_directory=a.is_dir())
        except OSError:
            (shutil.copytree if a.is_dir() else shutil.copyfile)(a, b)


def _cohort(
    bench: BenchResult,
    slide_path: Path,
    out: Path,
    marker: str,
    device: str,
    batch_size: int,
    target_mpp: float,
    n_slides: int,
    say: Callable[[str], None],
    reference: dict[str, int] | None = None,
) -> None:
    """The ``cohort`` stage: ``n_slides`` links to the slide scored as one batch, dispatched as
    ``pathology score`` dispatches (:func:`pathology.batch.auto_cluster`); ``reference``: the
    ``end_to_end`` run's summed counts, which every slide must repeat."""
    from pathology.batch import (
        SlideJob,
        auto_cluster,
        score_slides,
        score_slides_distributed,
    )
    from pathology.scoring import resolve_device

    links = out / "slides"
    links.mkdir(parents=True)
    jobs = []
    for i in range(n_slides):
        path = links / f"cohort-{i:03d}{slide_path.suffix}"
        _link_slide(slide_path, path)
        jobs.append(SlideJob(slide_id=path.stem, path=path, marker=marker))
    settings = _product_settings(bench, device, batch_size, target_mpp, store=True)
    cluster = auto_cluster(bench.workers, n_slides)
    processes: list[int] = []
    say(
        f"cohort ({n_slides} slides, {'local Dask cluster' if cluster == 'local' else 'in process'})"
    )
    with GpuSampler(resolve_device(device)) as gpu:
        t0 = time.perf_counter()
        if cluster == "none":
            result = score_slides(jobs, out / "results", settings)
        else:
            result = score_slides_distributed(
                jobs,
                out / "results",
                settings,
                cluster=cluster,
                n_workers=bench.workers,
                config={"dashboard_address": ":0"},  # any free port
                on_start=lambda info: processes.append(info.workers),
            )
        seconds = time.perf_counter() - t0
    _gpu_note(bench, "cohort", gpu)
    if not result.ok:
        from pathology.errors import PathologyError

        # The end-to-end run of the same slide passed: a failure here is the batch's (a worker
        # killed, out of memory), reported in one line like any scoring failure.
        first = result.failures[0].error
        raise PathologyError(
            f"cohort stage: {len(result.failures)} of {n_slides} slides failed, first: {first}"
        )
    tiles = sum(int(o.row["tissue_tiles"]) for o in result.done)
    bench.seconds["cohort"] = seconds
    bench.rates["cohort"] = tiles / seconds
    bench.notes["cohort_slides"] = n_slides
    bench.notes["cohort_cluster"] = (
        f"local Dask cluster, {processes[0]} processes" if processes else "in process"
    )
    bench.notes["cohort_slides_per_hour"] = round(3600 * n_slides / seconds, 1)
    if reference is not None:
        same = []
        for o in result.done:
            record = json.loads((o.slide_dir / "slide.json").read_text())
            same.append(dict(record["totals"]) == reference)
        bench.notes["cohort_same_counts"] = all(same)


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=2) + "\n")
