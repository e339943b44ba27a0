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
            "Synthesise a p16-positive and a PD-L1 (CPS >= 20) slide with known per-cell truth, run every "
            "pipeline stage on them and print the results next to the truth. Slides are reused on a rerun."
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
        "--overwrite", action="store_true", help="allow a non-empty folder not made by the demo"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pathology.demo import default_demo_dir, run_demo

    err = Console(stderr=True)
    out_dir = args.out or default_demo_dir()
    with err.status("demo") as status:
        results = run_demo(
            out_dir,
            size_px=args.size,
            mpp=args.mpp,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=lambda msg: status.update(msg),
        )

    def num(value: float | None, fmt: str = "{:.1f}") -> str:
        return "" if value is None else fmt.format(value)

    table = Table(title=f"pathology demo: {out_dir}")
    for col in (
        "slide",
        "marker",
        "size px",
        "tissue %",
        "tissue IoU",
        "tiles",
        "true tumour cells",
        "true p16 %",
        "true CPS",
        "true TPS",
        "true call",
    ):
        table.add_column(
            col, justify="left" if col in ("slide", "marker", "true call") else "right"
        )
    for r in results:
        table.add_row(
            r.slide_id,
            r.marker,
            f"{r.width}x{r.height}",
            num(100 * r.tissue_fraction),
            num(r.tissue_iou, "{:.3f}"),
            str(r.tissue_tiles),
            str(r.truth_tumor_cells),
            num(r.truth_p16_positive_pct),
            num(r.truth_cps),
            num(r.truth_tps),
            r.truth_call or "",
        )
    # Not a terminal (a log, CI): rich would wrap at 80 columns; a wider table stays readable.
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 140).print(table)
    print(
        "Slide scoring (`pathology score`, slide calls) is not wired in yet: the table shows the stages that run;"
        " the cell model itself is available as `pathology.scoring`."
    )
    print(f"Results: {out_dir}/demo.json; tissue masks and tile stores: {out_dir}/<slide>/")
    return 0
