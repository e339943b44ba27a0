"""``pathology tissue SLIDE``: compute a slide's tissue mask, print its summary, optionally save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathology.cli import add_slide_mpp


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tissue",
        help="tissue mask of a slide (works on IHC: pale counterstain, DAB, pen marks)",
        description=(
            "Compute the tissue mask of a slide on a thumbnail: glass, pen ink, dust and black "
            "borders are excluded, pale IHC tissue is kept. Prints the tissue fraction, the mask "
            "size and its downsample; --out saves the mask as PNG (255 = tissue), --overlay a "
            "review image (non-tissue tinted blue, outline green)."
        ),
    )
    p.add_argument("slide", metavar="SLIDE", help="slide or image file")
    p.add_argument("--out", type=Path, metavar="MASK.png", help="write the mask here")
    p.add_argument(
        "--overlay", type=Path, metavar="OVERLAY.png", help="write a review overlay here"
    )
    add_slide_mpp(p, mpp_alias=True)
    p.add_argument(
        "--mask-mpp",
        type=float,
        default=8.0,
        metavar="UM",
        help="microns per mask pixel (default 8; slides without mpp use a 4096 px mask)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pathology.errors import OutputExistsError
    from pathology.slide import open_slide, read_downsampled
    from pathology.tissue import compute_tissue_mask, mask_downsample, overlay

    outputs = [p for p in (args.out, args.overlay) if p is not None]
    if (
        args.out is not None
        and args.overlay is not None
        and args.out.resolve() == args.overlay.resolve()
    ):
        raise OutputExistsError(
            f"--out and --overlay are the same file ({args.out}); give two paths"
        )
    for path in outputs:
        if path.exists() and not args.overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")

    with open_slide(args.slide, mpp=args.slide_mpp) as reader:
        tm = compute_tissue_mask(reader, mask_mpp=args.mask_mpp)
        rgb = None
        if args.overlay is not None:
            rgb, _ = read_downsampled(reader, mask_downsample(reader, mask_mpp=args.mask_mpp))

    h, w = tm.shape
    dsx, dsy = tm.downsample_xy
    scale = f", {tm.mask_mpp:.2f} um/px" if tm.mask_mpp is not None else ""
    print(f"{Path(args.slide).name}")
    print(f"  tissue fraction {100 * tm.fraction():.1f}%")
    print(f"  mask            {w} x {h} px")
    print(f"  downsample      {dsx:.2f} x {dsy:.2f} level-0 px per mask px{scale}")
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        tm.to_png(args.out)
        print(f"  wrote mask      {args.out}")
    if args.overlay is not None and rgb is not None:
        if rgb.shape[:2] != tm.shape:  # pragma: no cover - same downsample gives the same size
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h)))
        Image.fromarray(overlay(rgb, tm.mask)).save(args.overlay)
        print(f"  wrote overlay   {args.overlay}")
    return 0
