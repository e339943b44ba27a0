"""``pathology demo [--out DIR]``: synthesise demo slides and run the pipeline on them."""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be W or WxH in pixels, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthesise a p16 and a PD-L1 slide and run the pipeline on them",
        description=(
            "Synthesise a p16-positive and a PD-L1 (CPS >= 20) slide with known per-cell truth, score "
            "them exactly as 'pathology score' does (slides.csv, report.html, per-slide outputs) and "
            "print the calls next to the truth. Slides and finished results are reused on a rerun."
        ),
    )
    p.add_argument("--out", default=None, help="output folder (default: ~/.cache/pathology/demo)")
    p.add_argument(
        "--size",
        type=_size,
        default=(4096, 3072),
        help="slide size W[xH] in px (default 4096x3072)",
    )
    p.add_argument(
        "--mpp", type=float, default=0.5, help="microns per pixel of the slides (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument(
        "--device", default="auto", help="scoring device: auto (CUDA when present), cpu, cuda"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty folder not made by the demo"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from pathology.cli._score import _Bars
    from pathology.demo import default_demo_dir, run_demo

    err = Console(stderr=True)
    out_dir = args.out or default_demo_dir()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        step = progress.add_task("demo", total=None)
        results = run_demo(
            out_dir,
            size_px=args.size,
            mpp=args.mpp,
            seed=args.seed,
            device=args.device,
            overwrite=args.overwrite,
            progress=lambda msg: progress.update(step, description=msg),
            batch_progress=_Bars(progress, err.is_terminal),
        )

    def num(value: float | None, fmt: str = "{:.1f}") -> str:
        return "" if value is None else fmt.format(value)

    def pair(measured: float | None, truth: float | None) -> str:
        return "" if measured is None and truth is None else f"{num(measured)} / {num(truth)}"

    table = Table(title=f"pathology demo: measured / synthetic truth ({out_dir})")
    for col in (
        "slide",
        "marker",
        "call / true call",
        "tumour cells",
        "p16 %",
        "CPS",
        "TPS",
        "tiles",
        "tissue IoU",
        "QC flags",
        "scoring s",
    ):
        table.add_column(
            col,
            justify="left"
            if col in ("slide", "marker", "call / true call", "QC flags")
            else "right",
        )
    for r in results:
        table.add_row(
            r.slide_id,
            r.marker,
            f"{r.call} / {r.truth_call or ''}",
            f"{r.tumor_cells} / {r.truth_tumor_cells}",
            pair(r.positive_pct, r.truth_p16_positive_pct),
            pair(r.cps, r.truth_cps),
            pair(r.tps, r.truth_tps),
            str(r.tissue_tiles),
            num(r.tissue_iou, "{:.3f}"),
            r.qc_flags,
            num(r.seconds_scoring),
        )
    # Not a terminal (a log, CI): rich would wrap at 80 columns; a wider table stays readable.
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160).print(table)
    agree = sum(r.call == r.truth_call for r in results)
    print(
        f"{agree} of {len(results)} calls agree with the synthetic truth (device {results[0].device})."
    )
    print(
        f"Results: {out_dir}/slides.csv, {out_dir}/report.html; per slide {out_dir}/<slide>/ "
        "(tiles.zarr, tiles.parquet, cells.parquet, cells.geojson, heatmap.png)"
    )
    return 0
