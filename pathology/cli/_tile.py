"""``pathology tile SLIDE --out STORE.zarr``: tissue tiles at a target mpp into a Zarr store."""

from __future__ import annotations

import argparse
import json
import sys

from pathology.cli import add_slide_mpp


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tile",
        help="write a slide's tissue tiles at a target mpp into a Zarr store (resumable)",
        description=(
            "Read the tissue of a slide at a target resolution into a chunked Zarr v3 store "
            "(OME-NGFF, opens in napari) with Dask workers. Rerunning the same command resumes an "
            "interrupted run; a store from another slide or other parameters is never overwritten "
            "without --overwrite."
        ),
    )
    p.add_argument("slide", metavar="SLIDE", help="slide file")
    p.add_argument("--out", required=True, metavar="STORE.zarr", help="output store (a folder)")
    p.add_argument(
        "--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5, ~20x)"
    )
    p.add_argument("--tile", type=int, default=256, help="tile edge in output pixels (default 256)")
    p.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="pixels of overlap on each tile side when read (default 0)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="skip tiles with a smaller tissue fraction (default 0.25)",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument(
        "--scheduler",
        choices=("threads", "processes", "sync"),
        default="threads",
        help="Dask scheduler (default threads: cheapest in CPU since the store writes got cheap; see README)",
    )
    p.add_argument(
        "--reader",
        choices=("auto", "openslide", "direct"),
        default="auto",
        help="tile decoder: direct TIFF tiles when exact (auto), or always OpenSlide",
    )
    p.add_argument(
        "--codec",
        choices=("lz4", "zstd", "none"),
        default="lz4",
        help="image chunk compression (default lz4)",
    )
    p.add_argument(
        "--shard-tiles",
        type=int,
        default=8,
        help="tiles per shard edge: one file and one task per shard (default 8)",
    )
    add_slide_mpp(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store made from another slide or with other parameters",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from pathology.tiling import tile_slide

    with Progress(
        TextColumn("tiling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("tiles", total=None)
        result = tile_slide(
            args.slide,
            args.out,
            target_mpp=args.mpp,
            tile_px=args.tile,
            overlap_px=args.overlap,
            min_tissue=args.min_tissue,
            workers=args.workers,
            scheduler=args.scheduler,
            reader=args.reader,
            slide_mpp=args.slide_mpp,
            codec=args.codec,
            shard_tiles=args.shard_tiles,
            overwrite=args.overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    summary = {
        "store": str(result.store),
        "tissue_tiles": result.tissue_tiles,
        "tiles_written": result.tiles_written,
        "shards_written": result.shards_written,
        "shards_skipped": result.shards_skipped,
        "failed_tiles": len(result.failed_tiles),
        "reader": result.reader,
        "level": result.grid.level,
        "mpp": round(result.grid.mpp, 6),
        "out_size": list(result.grid.out_size),
        "seconds": round(result.seconds, 3),
        "tiles_per_s": round(result.tiles_per_s, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        w, h = result.grid.out_size
        print(
            f"{result.store}: {result.tissue_tiles} tissue tiles of {result.grid.n_tiles} "
            f"({w} x {h} px at {result.grid.mpp:.4g} um/px, level {result.grid.level}, reader {result.reader})"
        )
        if result.shards_skipped and not result.tiles_written:
            print("already complete: nothing to do")
        else:
            print(
                f"wrote {result.tiles_written} tiles in {result.seconds:.1f} s ({result.tiles_per_s:.0f} tiles/s)"
                + (
                    f"; resumed, {result.shards_skipped} shards were already done"
                    if result.shards_skipped
                    else ""
                )
            )
    for line in result.failed_tiles:
        print(f"pathology tile: error: {args.slide}: {line}", file=sys.stderr)
    return 1 if result.failed_tiles else 0
