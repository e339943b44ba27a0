"""``pathology score SLIDE... --marker M --out DIR`` / ``pathology score --manifest CSV --out DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pathology.cli import add_slide_mpp

log = logging.getLogger("pathology")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score slides: per-slide calls (p16, PD-L1 CPS/TPS, Ki-67, ...) with heatmaps and cells",
        description=(
            "Tile, score and call each slide (files, folders of slides, or a manifest CSV), writing "
            "DIR/slides.csv, DIR/report.html and per slide DIR/<slide_id>/ (tile store unless "
            "--no-store, tiles.parquet, cells.parquet, cells.geojson for QuPath, heatmap.png). Rerunning the same command skips "
            "finished slides and resumes interrupted ones. A failed slide is reported in one line and "
            "never stops the others; the exit status is 1 when any slide failed."
        ),
    )
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files or folders of slides")
    p.add_argument(
        "--manifest",
        metavar="CSV",
        help="CSV with columns path, marker (optional slide_id, patient_id, mpp)",
    )
    p.add_argument(
        "--marker",
        help="marker name (p16, pdl1, ki67, egfr, or a YAML path); with --manifest it fills an "
        "empty or missing marker column",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="parallel workers (default 2): Dask workers scoring one slide each when several "
        "slides are given (on CUDA at most two per GPU, each reading tiles with its share of "
        "the cores), else tiling threads and, on the CPU, shards read and scored at once "
        "(one torch thread each; on CUDA, threads reading ahead of the model) for the one slide",
    )
    p.add_argument(
        "--cluster",
        default="auto",
        metavar="{auto,none,local,slurm,ADDRESS}",
        help="where slides run: auto (default) = a local Dask cluster of --workers processes when "
        "there are several slides and --workers > 1, else in this process; none = in this "
        "process; local; slurm (dask-jobqueue, see --cluster-config); or a scheduler address "
        "such as tcp://host:8786",
    )
    p.add_argument(
        "--cluster-config",
        metavar="YAML",
        help="cluster settings (scripts/slurm/cluster.yaml shows every key)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass (default 64 on the CPU, 1024 on CUDA)",
    )
    p.add_argument(
        "--target-mpp",
        type=float,
        default=0.5,
        help="microns per pixel tiles are scored at (default 0.5)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="skip tiles with a smaller tissue fraction (default 0.25)",
    )
    p.add_argument(
        "--model", default="physics-v1", help="model name or folder (default physics-v1)"
    )
    p.add_argument(
        "--stains",
        choices=("estimate", "reference"),
        default="estimate",
        help="per-slide stain vectors (default) or the reference H-DAB vectors",
    )
    p.add_argument(
        "--no-geojson", action="store_true", help="do not write cells.geojson (large slides)"
    )
    p.add_argument(
        "--no-store",
        action="store_true",
        help="score straight from the slide without writing the tile store (tiles.zarr): same "
        "pixels and counts (on CUDA, see --decode), per-tile counts in tiles.parquet only",
    )
    p.add_argument(
        "--decode",
        choices=("auto", "cpu"),
        default="auto",
        help="with --no-store on CUDA: auto (default) decodes the slide's JPEG tiles on the GPU "
        "(nvJPEG, needs the gpu extra) when the grid is an exact block mean of a JPEG level; cpu "
        "always decodes in the reading threads",
    )
    add_slide_mpp(p, mpp_alias=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace slides' results made with other settings (otherwise those slides fail)",
    )
    p.set_defaults(func=run)


class _Bars:
    """Rich progress bars (slides, tiles) on a terminal; one log line per slide otherwise."""

    def __init__(self, progress: Any, tty: bool) -> None:
        self.p = progress
        self.tty = tty
        self.slides = progress.add_task("slides", total=None)
        self.tiles_task = progress.add_task("", total=None)
        self.current = ""

    def slide_started(self, index: int, total: int, job: Any) -> None:
        self.current = job.slide_id
        self.p.update(
            self.slides, total=total, completed=index, description=f"slides ({job.slide_id})"
        )

    def stage(self, job: Any, name: str) -> None:
        self.p.reset(self.tiles_task, total=None, description=f"  {job.slide_id}: {name}")
        if not self.tty:
            log.info("%s: %s", job.slide_id, name)

    def tiles(self, done: int, total: int) -> None:
        self.p.update(self.tiles_task, completed=done, total=total)

    def slide_finished(self, job: Any, outcome: Any) -> None:
        self.p.advance(self.slides)
        row = getattr(outcome, "row", None)
        if row is None:
            self.p.console.print(
                f"{job.slide_id}: [red]failed[/red] (reason at the end)", highlight=False
            )
            return
        reused = " (already done)" if outcome.reused else ""
        value = row["cps"] if row["cps"] is not None else row["positive_pct"]
        label = "CPS" if row["cps"] is not None else "% positive"
        shown = f", {label} {value:.1f}" if value is not None else ""
        self.p.console.print(
            f"{row['slide_id']}: {row['marker']} [bold]{row['call'] or '-'}[/bold]{shown}, "
            f"{row['tumor_cells']} tumour cells{reused}",
            highlight=False,
            soft_wrap=True,
        )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from pathology.batch import (
        ScoreSettings,
        auto_cluster,
        jobs_from_paths,
        read_manifest,
        score_slides,
    )
    from pathology.errors import ConfigError

    if args.manifest and args.slides:
        raise ConfigError("give slides or --manifest, not both")
    if args.manifest:
        jobs = read_manifest(args.manifest, marker=args.marker, mpp=args.slide_mpp)
    elif args.slides:
        if not args.marker:
            raise ConfigError("--marker is required with slide paths (e.g. --marker p16)")
        jobs = jobs_from_paths(args.slides, args.marker, mpp=args.slide_mpp)
    else:
        raise ConfigError("no slides: give slide files or folders, or --manifest CSV")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = ScoreSettings(
        target_mpp=args.target_mpp,
        min_tissue=args.min_tissue,
        device=args.device,
        workers=args.workers,
        batch_size=args.batch_size,
        model=args.model,
        stains=args.stains,
        geojson=not args.no_geojson,
        store=not args.no_store,
        decode=args.decode,
    )
    err = Console(stderr=True)
    tty = err.is_terminal

    def on_error(job: Any, exc: BaseException) -> None:
        if args.verbose:
            log.error("%s failed", job.path, exc_info=exc)

    cluster = args.cluster
    if cluster == "auto":
        cluster = auto_cluster(args.workers, len(jobs))
    if args.cluster_config and cluster in ("none", "local"):
        log.warning("--cluster-config is only read with --cluster slurm or an address")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not tty,
    ) as progress:
        bars = _Bars(progress, tty)
        if cluster == "none":
            result = score_slides(
                jobs, args.out, settings, overwrite=args.overwrite, progress=bars, on_error=on_error
            )
        else:
            from pathology.batch import load_cluster_config, score_slides_distributed

            progress.update(bars.tiles_task, visible=False)  # slides only: tasks run elsewhere

            def on_start(info: Any) -> None:
                link = info.dashboard_link or "not served (pip install 'pathology[cluster]')"
                progress.console.print(
                    f"Dask {info.cluster} cluster, {info.workers} workers; dashboard: {link}",
                    highlight=False,
                    soft_wrap=True,
                )

            result = score_slides_distributed(
                jobs,
                args.out,
                settings,
                cluster=cluster,
                n_workers=args.workers,
                config=load_cluster_config(args.cluster_config) if args.cluster_config else None,
                overwrite=args.overwrite,
                progress=bars,
                on_error=on_error,
                on_start=on_start,
            )
    for failure in result.failures:
        print(f"pathology score: error: {failure.error}", file=sys.stderr)
    print(
        f"{len(result.done)} of {len(jobs)} slides scored; results: {args.out}/slides.csv, "
        f"{args.out}/report.html"
    )
    return 0 if result.ok else 1
