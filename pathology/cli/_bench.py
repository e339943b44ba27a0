"""``pathology bench [SLIDE]``: stage throughput measured in one run, as ratios to the decode rate."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure decode and tiling throughput on a slide (or a synthetic one) in one run",
        description=(
            "Measure, in one run on the same tissue tiles: the raw OpenSlide read+decode rate (the limit), "
            "the direct TIFF tile decode rate where possible, and tiling into Zarr. Rates in tiles/s and "
            "megapixels/s with ratios to the decode rate. Without SLIDE a synthetic p16 slide is made."
        ),
    )
    p.add_argument(
        "slide", nargs="?", default=None, metavar="SLIDE", help="slide (default: synthetic)"
    )
    p.add_argument(
        "--size", type=int, default=10_000, help="synthetic slide edge in px (default 10000)"
    )
    p.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5)")
    p.add_argument("--tile", type=int, default=256, help="tile edge in px (default 256)")
    p.add_argument("--workers", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--scheduler", choices=("threads", "processes", "sync"), default="processes")
    p.add_argument("--reader", choices=("auto", "openslide", "direct"), default="auto")
    p.add_argument(
        "--work-dir", default=None, help="folder for the synthetic slide and the store (reused)"
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pathology.bench import run_bench, write_json

    err = Console(stderr=True)
    with err.status("bench") as status:
        result = run_bench(
            args.slide,
            size_px=args.size,
            target_mpp=args.mpp,
            tile_px=args.tile,
            workers=args.workers,
            scheduler=args.scheduler,
            reader=args.reader,
            work_dir=args.work_dir,
            say=lambda msg: status.update(f"bench: {msg}"),
        )
    data = result.to_json()
    table = Table(
        title=f"pathology bench: {result.slide} ({result.width} x {result.height}), "
        f"{result.tiles} tiles of {result.tile_px} px at {result.mpp:.3g} um/px, "
        f"{result.workers} workers"
    )
    for col in ("stage", "tiles/s", "MPix/s", "x decode", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, rate in result.rates.items():
        ratio = data.get(f"{name}_vs_decode")
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{data[f'{name}_mpix_per_s']:.1f}",
            "1.000" if name == "decode" else f"{ratio:.3f}",
            f"{result.seconds[name]:.2f}",
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120).print(table)
    notes = {
        k: data[k]
        for k in (
            "scheduler",
            "tiling_reader",
            "direct_reader",
            "level_read",
            "store_files",
            "store_mb",
            "slide_mb",
            "peak_rss_mb",
            "peak_worker_rss_mb",
        )
    }
    print(json.dumps(notes))
    if args.json:
        write_json(result, args.json)
    return 0
