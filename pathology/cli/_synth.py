"""``pathology synth OUT.svs``: write a synthetic IHC slide with its per-cell truth."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from pathology.synth._params import PRESETS

    p = sub.add_parser(
        "synth",
        help="write a synthetic IHC slide (SVS) with per-cell ground truth",
        description=(
            "Write OUT.svs (Aperio-style pyramid), OUT.truth.json (every cell with its DAB per "
            "compartment; slide p16 %, CPS, TPS, Ki-67 %, H-score) and OUT.tissue.png (true tissue "
            "mask). Options override the preset; without --preset they override the defaults."
        ),
    )
    p.add_argument("out", metavar="OUT.svs", help="output slide path")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named parameter set")
    p.add_argument("--marker", choices=("p16", "pdl1", "ki67"))
    p.add_argument(
        "--size", metavar="W[xH]", help="level-0 size in pixels, e.g. 10000 or 8192x6144"
    )
    p.add_argument(
        "--mpp", type=float, help="microns per pixel (default 0.25; 0.5 = 20x, 1.0 = 10x)"
    )
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument(
        "--positive-fraction",
        type=float,
        metavar="F",
        help="fraction of tumour cells positive under the marker's rule",
    )
    p.add_argument(
        "--immune-positive-fraction",
        type=float,
        metavar="F",
        help="PD-L1: fraction of lymphocytes/macrophages positive",
    )
    p.add_argument(
        "--weak-fraction",
        type=float,
        metavar="F",
        help="p16: fraction of tumour cells with weak (1+) staining",
    )
    p.add_argument(
        "--intensity",
        metavar="LEVEL",
        help="weak, moderate, strong, or a DAB optical density such as 0.6",
    )
    p.add_argument(
        "--immune-density",
        type=float,
        metavar="N",
        help="lymphocytes + macrophages per mm^2 of tissue",
    )
    p.add_argument(
        "--tissue-fraction", type=float, metavar="F", help="fraction of the slide with tissue"
    )
    p.add_argument(
        "--tumor-fraction", type=float, metavar="F", help="fraction of tissue in tumour nests"
    )
    p.add_argument("--stain-jitter", type=float, metavar="SD", help="per-slide stain vector noise")
    p.add_argument(
        "--blur", type=float, metavar="UM", dest="blur_um", help="optical blur sigma in microns"
    )
    p.add_argument("--noise", type=float, metavar="LEVELS", help="sensor noise sd in 8-bit levels")
    p.add_argument("--jpeg-quality", type=int, metavar="Q", help="JPEG quality 1-100 (default 90)")
    p.add_argument(
        "--artifacts",
        action="store_true",
        default=None,
        help="add pen marks, dust and a black scanner border",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="rendering threads (output is identical)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print the slide values as JSON")
    p.set_defaults(func=run)


_FIELDS = (
    "marker",
    "mpp",
    "seed",
    "positive_fraction",
    "immune_positive_fraction",
    "weak_fraction",
    "immune_density",
    "tissue_fraction",
    "tumor_fraction",
    "stain_jitter",
    "blur_um",
    "noise",
    "jpeg_quality",
    "artifacts",
)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from pathology.errors import ConfigError

    out: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if args.size is not None:
        w, _, h = args.size.lower().partition("x")
        try:
            out["width"] = int(w)
            out["height"] = int(h) if h else int(w)
        except ValueError:
            raise ConfigError(
                f"--size must be W or WxH in pixels (e.g. 10000 or 8192x6144), got {args.size!r}"
            ) from None
    if args.intensity is not None:
        try:
            out["intensity"] = float(args.intensity)
        except ValueError:
            out["intensity"] = args.intensity
    return out


def run(args: argparse.Namespace) -> int:
    import json

    from pathology.synth import SynthParams, synthesize_slide
    from pathology.synth._api import band_count

    overrides = _overrides(args)
    params = (
        SynthParams.preset(args.preset, **overrides)
        if args.preset
        else SynthParams.from_dict(overrides)
    )
    show_bar = not args.quiet and sys.stderr.isatty() and band_count(params) >= 4
    if show_bar:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("synth"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} bands"),
            TimeElapsedColumn(),
            transient=True,
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("bands", total=band_count(params))
            slide = synthesize_slide(
                params,
                args.out,
                overwrite=args.overwrite,
                workers=args.workers,
                progress=lambda done, total: bar.update(task, completed=done),
            )
    else:
        slide = synthesize_slide(params, args.out, overwrite=args.overwrite, workers=args.workers)
    v = slide.values
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                {
                    "svs": str(slide.svs_path),
                    "truth": str(slide.truth_path),
                    "tissue_mask": str(slide.tissue_path),
                    "values": asdict(v),
                },
                indent=1,
            )
        )
        return 0
    w, h = params.size
    mb = slide.svs_path.stat().st_size / 1e6
    print(
        f"wrote {slide.svs_path} ({w}x{h} px, {params.mpp} um/px, {slide.levels} levels, "
        f"{mb:.1f} MB) in {slide.seconds:.1f} s"
    )
    print(
        f"truth {slide.truth_path}; tissue mask {slide.tissue_path} "
        f"(1/{slide.truth.tissue_mask['downsample']})"
    )
    pos = f"{v.tumor_positive} positive" if v.tumor_cells else "no tumour"
    line = f"{params.marker}: {v.tumor_cells} tumour cells, {pos}, {v.immune_cells} immune cells"
    if v.marker == "p16":
        line += (
            f"; p16+ {v.p16_positive_pct:.1f} %, weak {v.p16_weak_pct:.1f} %"
            if v.tumor_cells
            else ""
        )
    elif v.marker == "pdl1":
        line += f", {v.immune_positive} immune positive"
        if v.cps is not None:
            line += f"; CPS {v.cps:.1f}, TPS {v.tps:.1f} %"
    elif v.ki67_pct is not None:
        line += f"; Ki-67 {v.ki67_pct:.1f} %"
    if v.h_score is not None:
        line += f"; H-score {v.h_score:.0f}"
    if v.call is not None:
        line += f"; call {v.call}"
    print(line)
    return 0
