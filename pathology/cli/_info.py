"""``pathology info SLIDE...``: print the PHI-safe metadata of slides."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pathology.cli import add_slide_mpp

if TYPE_CHECKING:
    from pathology.slide import SlideInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print a slide's dimensions, levels, mpp, objective and vendor (no patient data)",
        description=(
            "Print the metadata of one or more slides: levels, pixel size, objective power, vendor. "
            "Only whitelisted scanner properties are shown; file names inside the slide, users, dates, "
            "barcodes and label/macro images are never read out."
        ),
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide or image file(s)")
    add_slide_mpp(p, mpp_alias=True)
    p.add_argument("--json", action="store_true", help="one JSON object per slide (JSON Lines)")
    p.set_defaults(func=run)


def _format(info: SlideInfo) -> str:
    w, h = info.dimensions
    mpp = (
        f"{info.mpp:.4f} um/px ({info.mpp_source})"
        if info.mpp is not None
        else "unknown (pass --mpp)"
    )
    rows = [
        ("vendor", info.vendor),
        ("dimensions", f"{w} x {h} px"),
        ("mpp", mpp),
        ("objective", f"{info.objective_power:g}x" if info.objective_power else "unknown"),
        ("tile size", "x".join(map(str, info.tile_size)) if info.tile_size else "untiled"),
        ("file size", f"{info.file_bytes / 1e6:.1f} MB"),
        ("levels", str(info.level_count)),
    ]
    lines = [info.name] + [f"  {k:<11} {v}" for k, v in rows]
    for i, ((lw, lh), ds) in enumerate(
        zip(info.level_dimensions, info.level_downsamples, strict=True)
    ):
        lines.append(f"    [{i}] {lw} x {lh}  downsample {ds:g}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathology.errors import PathologyError
    from pathology.slide import open_slide

    failed = 0
    for path in args.slides:
        try:
            with open_slide(path, mpp=args.slide_mpp) as reader:
                info = reader.info
        except PathologyError as exc:
            if len(args.slides) == 1:
                raise
            print(f"pathology info: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(info.to_dict()))
        else:
            print(_format(info))
    return 1 if failed else 0
