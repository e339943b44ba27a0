"""``pathology bench [SLIDE]``: stage throughput measured in one run, as ratios to the decode rate."""

from __future__ import annotations

import argparse
import json
import sys
import time

#: Stages ``--stages`` may name (kept here so ``pathology --help`` does not import the bench).
_OPTIONAL = (
    "jpeg_batch_decode",
    "model",
    "scoring",
    "end_to_end",
    "end_to_end_no_store",
    "peer",
)


def _size(text: str) -> tuple[int, int]:
    """``20000`` (square) or ``20000x15000`` (width x height), level-0 pixels."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected WIDTH or WIDTHxHEIGHT in pixels, e.g. 20000x15000"
        ) from None
    if len(parts) > 2 or w < 256 or h < 256:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected WIDTH or WIDTHxHEIGHT, each at least 256 px"
        )
    return w, h


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if names == ("all",):
        return _OPTIONAL
    bad = [s for s in names if s not in _OPTIONAL]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(_OPTIONAL)} or 'all'"
        )
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure each stage's throughput on a slide (or a synthetic one) in one run",
        description=(
            "Measure, in one run on the same tissue tiles: the raw OpenSlide read+decode rate (the limit), "
            "the direct TIFF tile decode rate where possible, batched JPEG decoding of the native "
            "tiles (nvJPEG on CUDA, libjpeg-turbo threads on CPU), tiling into Zarr, the model alone on "
            "in-memory tiles, scoring from the store, the whole product path (score_slide) with its "
            "tile store and without it (--no-store), and the "
            "classical CPU peer (skimage) on a sample of the tiles. Rates in tiles/s and megapixels/s "
            "with ratios to the decode rate and to the peer. Without SLIDE a synthetic p16 slide is made."
        ),
    )
    p.add_argument(
        "slide", nargs="?", default=None, metavar="SLIDE", help="slide (default: synthetic)"
    )
    p.add_argument(
        "--size",
        type=_size,
        default=(10_000, 10_000),
        metavar="W[xH]",
        help="synthetic slide size in px, e.g. 10000 or 20000x15000 (default 10000)",
    )
    p.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5)")
    p.add_argument("--tile", type=int, default=256, help="tile edge in px (default 256)")
    p.add_argument("--workers", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--scheduler", choices=("threads", "processes", "sync"), default="threads")
    p.add_argument("--reader", choices=("auto", "openslide", "direct"), default="auto")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--marker", default="p16", help="marker to score (default p16, the synthetic slide's)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass (default 64 on the CPU, 1024 on CUDA)",
    )
    p.add_argument(
        "--stages",
        type=_stages,
        default=_OPTIONAL,
        metavar="LIST",
        help=f"comma list of {','.join(_OPTIONAL)} (default all; tiling and decode always run)",
    )
    p.add_argument(
        "--work-dir", default=None, help="folder for the synthetic slide and the store (reused)"
    )
    p.add_argument(
        "--cohort",
        type=int,
        default=0,
        metavar="N",
        help="also score N links to the slide as one batch, as `pathology score` runs a folder "
        "(a local Dask cluster when --workers > 1): cohort tiles/s and slides/hour (default 0: "
        "skip; try 2-4x --workers)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pathology.bench import PEER_COMPARED, run_bench, write_json

    err = Console(stderr=True)
    t_start = time.perf_counter()

    with err.status("bench") as status:

        def say(msg: str) -> None:
            status.update(f"bench: {msg}")
            if not err.is_terminal:  # a log file: one timestamped line per stage instead
                print(f"[{time.perf_counter() - t_start:7.1f} s] bench: {msg}", file=sys.stderr)

        result = run_bench(
            args.slide,
            size_px=args.size,
            target_mpp=args.mpp,
            tile_px=args.tile,
            workers=args.workers,
            scheduler=args.scheduler,
            reader=args.reader,
            marker=args.marker,
            device=args.device,
            batch_size=args.batch_size,
            stages=args.stages,
            work_dir=args.work_dir,
            cohort_slides=args.cohort,
            say=say,
        )
    data = result.to_json()
    table = Table(
        title=f"pathology bench: {result.slide} ({result.width} x {result.height}), "
        f"{result.tiles} tiles of {result.tile_px} px at {result.mpp:.3g} um/px, "
        f"{result.workers} workers, device {result.device}"
    )
    for col in ("stage", "tiles/s", "MPix/s", "x decode", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, rate in result.rates.items():
        ratio = data.get(f"{name}_vs_decode")
        table.add_row(
            name,
            f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}",
            f"{data[f'{name}_mpix_per_s']:.2f}",
            "1.000" if name == "decode" else f"{ratio:.3f}",
            f"{result.seconds[name]:.2f}",
        )
    out = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    out.print(table)
    if "peer" in result.rates:
        vs = ", ".join(
            f"{name} {data[f'{name}_vs_peer']:.1f}x"
            for name in PEER_COMPARED
            if name in result.rates
        )
        procs = f"{data['peer_processes']} process" + ("es" if data["peer_processes"] > 1 else "")
        out.print(
            f"vs the classical peer ({data['peer_tiles']} tiles, {procs}, "
            f"{result.rates['peer']:.1f} tiles/s): {vs}"
        )
    if "cpu_bound_tiles_per_s" in data:
        vs = f", {data['cpu_bound_vs_peer']:.1f}x the peer" if "cpu_bound_vs_peer" in data else ""
        out.print(
            "CPU bound for any end-to-end path (decode + model sharing the cores, nothing else): "
            f"{data['cpu_bound_tiles_per_s']:,.0f} tiles/s{vs}"
        )
    if "model_steps_pct" in data:
        steps = ", ".join(f"{k} {v:.0f}%" for k, v in data["model_steps_pct"].items())
        out.print(f"model time by step: {steps}")
    busy = [
        f"{k[: -len('_model_busy_pct')]} {v:.0f}%"
        for k, v in data.items()
        if k.endswith("_model_busy_pct")
    ]
    if busy:
        out.print(f"model busy (share of each stage's wall time): {', '.join(busy)}")
    util = [
        f"{k[: -len('_gpu_util_pct')]} {v:.0f}%"
        for k, v in data.items()
        if k.endswith("_gpu_util_pct")
    ]
    if util:
        peak = data.get("gpu_peak_mem_mb")
        mem = f"; peak GPU memory {peak:,.0f} MB" if peak is not None else ""
        out.print(f"GPU utilisation (NVML, mean over each stage): {', '.join(util)}{mem}")
    elif "gpu_util" in data:
        out.print(f"GPU utilisation not read: {data['gpu_util']}")
    costs = [
        f"{name} {data[f'{name}_per_slide_s']:.1f} s + tiles / {data[f'{name}_tile_rate']:,.0f}"
        for name in ("end_to_end", "end_to_end_no_store")
        if f"{name}_tile_rate" in data
    ]
    if costs:
        out.print(f"cost per slide (once per slide + tiling and scoring): {'; '.join(costs)}")
    if "cohort_slides_per_hour" in data:
        same = data.get("cohort_same_counts")
        check = "" if same is None else f"; counts equal the end_to_end run's: {same}"
        out.print(
            f"cohort: {data['cohort_slides']} slides, {data['cohort_cluster']}: "
            f"{data['cohort_slides_per_hour']:,.0f} slides/hour of this size{check}"
        )
    keys = (
        "scheduler",
        "tiling_reader",
        "direct_reader",
        "jpeg_batch_decoder",
        "jpeg_batch_native_tiles",
        "jpeg_batch_native_tiles_per_s",
        "level_read",
        "store_files",
        "store_mb",
        "slide_mb",
        "torch_threads",
        "end_to_end_split_s",
        "end_to_end_no_store_split_s",
        "end_to_end_no_store_same_counts",
        "end_to_end_no_store_decoder",
        "end_to_end_no_store_counts_max_rel_diff",
        "cohort_slides",
        "cohort_cluster",
        "cohort_slides_per_hour",
        "cohort_same_counts",
        "peak_rss_mb",
        "peak_worker_rss_mb",
        "gpu_name",
        "gpu_peak_mem_mb",
    )
    print(json.dumps({k: data[k] for k in keys if k in data}))
    if args.json:
        write_json(result, args.json)
    return 0
