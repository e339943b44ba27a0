"""``pathology estimate SLIDE... --bench BENCH.json``: a cohort's run time on this box."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pathology.cli import add_slide_mpp


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="how long scoring these slides will take here, from a `pathology bench` run",
        description=(
            "Plan each slide's tissue tiles exactly as `pathology score` will (thumbnail and "
            "tissue mask only, no tile read) and estimate the run time from the rates a "
            "`pathology bench --json` run measured on this box: per slide, seconds paid once + "
            "tissue tiles / tile rate, with the tile store and with --no-store; and, when the "
            "bench ran with --cohort N, the store's time scaled by how a batch of N slides "
            "compared with N single-slide runs there. Slides that cannot be planned are listed "
            "and left out (exit status 1)."
        ),
    )
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files or folders of slides")
    p.add_argument(
        "--manifest", metavar="CSV", help="CSV with a path column (as for pathology score)"
    )
    p.add_argument(
        "--bench",
        required=True,
        metavar="JSON",
        help="rates from `pathology bench [SLIDE] --json FILE` run on this box with the "
        "--device and --workers you will score with",
    )
    p.add_argument(
        "--target-mpp",
        type=float,
        default=0.5,
        help="microns per pixel tiles are scored at (default 0.5; the bench's --mpp)",
    )
    p.add_argument("--tile", type=int, default=256, help="tile edge in px (default 256)")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="skip tiles with a smaller tissue fraction (default 0.25, as pathology score)",
    )
    p.add_argument("--workers", type=int, default=2, help="slides planned at once (default 2)")
    p.add_argument("--csv", metavar="FILE", help="also write one row per slide")
    add_slide_mpp(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from pathology._io import atomic_path
    from pathology.batch import jobs_from_paths, read_manifest
    from pathology.errors import ConfigError, OutputExistsError
    from pathology.estimate import MODES, BenchRates, estimate_cohort, format_duration

    if args.manifest and args.slides:
        raise ConfigError("give slides or --manifest, not both")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.csv and Path(args.csv).exists():
        raise OutputExistsError(f"{args.csv}: exists; choose another --csv or remove it")
    rates = BenchRates.read(args.bench)
    # The marker does not change the plan; jobs need one.
    if args.manifest:
        jobs = read_manifest(args.manifest, marker="p16", mpp=args.slide_mpp)
    elif args.slides:
        jobs = jobs_from_paths(args.slides, "p16", mpp=args.slide_mpp)
    else:
        raise ConfigError("no slides: give slide files or folders, or --manifest CSV")
    err = Console(stderr=True)
    with Progress(
        TextColumn("planning tissue tiles"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("plan", total=len(jobs))
        est = estimate_cohort(
            [(j.slide_id, j.path, j.mpp) for j in jobs],
            rates,
            target_mpp=args.target_mpp,
            tile_px=args.tile,
            min_tissue=args.min_tissue,
            workers=args.workers,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    for s in est.failed:
        print(f"pathology estimate: error: {s.error}", file=sys.stderr)
    planned = est.planned
    tiles = sorted(s.tissue_tiles for s in planned)
    out = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    median = tiles[len(tiles) // 2] if tiles else 0
    out.print(
        f"{len(planned)} of {len(jobs)} slides planned: {est.tissue_tiles:,} tissue tiles of "
        f"{args.tile} px at {args.target_mpp:g} um/px (median {median:,}, most "
        f"{tiles[-1] if tiles else 0:,} per slide)",
        highlight=False,
    )
    table = Table(
        title=f"rates from {rates.source}: {rates.slide}, device {rates.device}, "
        f"{rates.workers} workers"
    )
    for col in ("run", "cost model", "total", "slides/hour"):
        table.add_column(col, justify="left" if col in ("run", "cost model") else "right")
    totals = est.total_seconds()
    for mode, seconds in totals.items():
        if mode == "batch":
            label = f"pathology score, batch as benched ({rates.batch_how})"
            model = f"x{rates.batch_factor:.2f} the store's time"
        else:
            label = MODES[mode][1]
            fixed, rate = rates.per_slide[mode]
            model = f"{fixed:.1f} s per slide + tiles / {rate:,.0f}"
        per_hour = 3600 * len(planned) / seconds if seconds > 0 else 0.0
        table.add_row(label, model, format_duration(seconds), f"{per_hour:,.0f}")
    out.print(table)
    if args.csv:
        rows = est.to_rows()
        with atomic_path(Path(args.csv)) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["slide_id"])
            writer.writeheader()
            writer.writerows(rows)
    return 1 if est.failed else 0
