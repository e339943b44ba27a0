"""Compare the Ki-67 scorer with the DeepLIIF / BCData ground truth in ``../shared/data``.

Per image, first the figures of issue 4's point 5 as ``tests/test_scoring.py``'s
``test_deepliif_ki67_targets`` counts them (counted cells within 20 % of the truth's nuclei, positive
% within 5 points; counted: every kept cell on Lung1, whose mask outlines every nucleus, and cells
typed tumour, lymphocyte or macrophage on the BCData tiles, which label tumour nuclei only), then
where the differences come from:

- truth nuclei with no counted cell within the match radius: cut by the image border (centroid
  within ``--border-um`` of an edge: a sliver whose centre lies outside the image, which no
  centre-based detector reports), detected but typed ``none`` (or ``other`` on BCData), merged into
  a counted cell matched to a neighbouring nucleus, or not detected at all;
- counted cells matched to no truth nucleus: a second detection near a labelled nucleus (one is
  within the match radius but matched to another cell), or on tissue the mask leaves unlabelled;
  each split by the Ki-67 call (nucleus DAB >= 0.2 OD).

With ``--out``, an overlay PNG (2x) per image for review: truth circles (red positive, blue
negative), every detection as a cross (nucleus DAB < 0.2) or square (>= 0.2), green when counted,
grey when kept but not counted (``other`` on BCData), yellow when typed ``none``, labelled with its
type letter (T L M F N) and nucleus DAB. Also, for a pathologist's review, a sheet of numbered
crops (~16 um around each difference, 3x) per image, ``<image>-review.png``, and
``differences.csv``: one row per difference (image, id of its crop, kind, position, the truth's
label, the nearest detection's type and nucleus DAB) with an empty ``verdict`` column to fill in
(is it a tumour nucleus, and is it Ki-67 positive).

    python scripts/inspect_ki67_truth.py --out /tmp/ki67-review

The images are non-commercial data referenced from the shared folder; the overlays are written
outside the repository and must not be committed.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pathology.groundtruth import MaskCells, deepliif_panel, load_deepliif_mask, match_cells
from pathology.scoring import StainEstimate, score_image

DEEPLIIF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepliif-ki67-samples"
TYPE_LETTERS = "TLMFN"
NONE, OTHER = 4, 3  # cell classes (``CELL_CLASSES``): tumour, lymphocyte, macrophage, other, none
#: Ki-67 positive: nucleus DAB OD at or above the cut of ``configs/markers/ki67.yaml``.
KI67_CUT = 0.2


@dataclass(frozen=True)
class Difference:
    """One difference between the counted cells and the truth nuclei of an image.

    ``kind`` is one of the counts :func:`explain` prints; ``x``, ``y`` are image pixels (the truth
    nucleus's centroid for a miss, the cell's centre for an extra); ``truth`` is the label
    (positive, negative, or unlabelled for an extra); ``cell_type`` and ``nucleus_dab`` are those
    of the detection (for a miss, the nearest detection within the match radius; ``-`` when none).
    """

    image: str
    kind: str
    x: float
    y: float
    truth: str
    cell_type: str
    nucleus_dab: float


def cases(root: Path) -> list[tuple[str, NDArray[np.uint8], MaskCells]]:
    """(name, IHC image (H, W, 3) uint8, truth nuclei) of Lung1 panel 1 and the BCData tiles."""
    from PIL import Image

    out = [
        (
            "Lung1",
            deepliif_panel(root / "val/Lung1.png", 0),
            load_deepliif_mask(root / "val/Lung1.png"),
        )
    ]
    for n in ("22_2", "34_3", "6_2"):
        img = np.asarray(Image.open(root / f"test_cli/{n}.png").convert("RGB"))
        out.append((n, img, load_deepliif_mask(root / f"test_groundtruth/{n}.png")))
    return out


def all_detections(
    rgb: NDArray[np.uint8], mpp: float, stains: StainEstimate
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float32]]:
    """Every detection of the image as the model types it (``CellScorer.type_cells``: second
    detections of a nucleus are ``none``): outline centres (K, 2) in image pixels (x, y), cell
    class (K,) (index into ``CELL_CLASSES``, 4 = ``none``) and nucleus DAB OD (K,)."""
    import torch

    from pathology.scoring import load_model
    from pathology.scoring._api import tiles_with_halo
    from pathology.scoring._model import halo_for

    halo = halo_for(mpp)
    scorer = load_model("ki67", mpp, stains=stains, halo_px=halo, device="cpu")
    tiles, origins = tiles_with_halo(rgb, 256, halo)
    with torch.inference_mode():
        t = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
        n, _, hh, ww = t.shape
        rays, resp, radius = scorer.detect(scorer.stain_maps(t))
        rays, cls, _ = scorer.type_cells(rays, resp, radius, n)
        core = scorer.in_core(rays.centre_um, hh, ww).numpy()
        y = rays.centre_um[:, 0].numpy() / mpp - 0.5 - halo
        x = rays.centre_um[:, 1].numpy() / mpp - 0.5 - halo
        dab = rays.dab_nucleus().numpy()
    o = origins[rays.tile.numpy()]
    gx, gy = x + o[:, 1], y + o[:, 0]
    core &= (gx < rgb.shape[1]) & (gy < rgb.shape[0])
    xy = np.stack([gx, gy], 1)[core].astype(np.float64)
    return xy, cls.numpy()[core], dab[core]


def counted_types(name: str, cls: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Cells the point-5 targets count: every kept cell on Lung1, tumour and immune cells on the
    BCData tiles (their masks label tumour nuclei only)."""
    kept = cls != NONE
    return kept if name == "Lung1" else kept & (cls != OTHER)


def explain(
    name: str,
    shape: tuple[int, int],
    truth: MaskCells,
    xy: NDArray[np.float64],
    cls: NDArray[np.int64],
    dab: NDArray[np.float32],
    match_px: float,
    border_px: float,
) -> tuple[dict[str, int], list[Difference]]:
    """Where counted cells and truth nuclei differ (see the module docstring): the counts per
    kind, and every difference as a :class:`Difference` (truth nuclei first, then counted cells)."""
    from scipy.spatial import cKDTree

    counted = counted_types(name, cls)
    cxy = xy[counted]
    m = match_cells(cxy, truth.centroid_xy, match_px)
    out: dict[str, int] = {"truth": truth.n_cells, "counted": int(counted.sum()), "matched": m.tp}
    missed = np.ones(truth.n_cells, bool)
    missed[m.pairs[:, 1]] = False
    h, w = shape
    tx, ty = truth.centroid_xy[:, 0], truth.centroid_xy[:, 1]
    edge = np.minimum(np.minimum(tx, w - 1 - tx), np.minimum(ty, h - 1 - ty))
    # The nearest detection (any class) within the match radius of each truth nucleus, if any.
    if len(xy):
        near = cKDTree(xy).query(truth.centroid_xy, distance_upper_bound=match_px)[1]
    else:
        near = np.zeros(truth.n_cells, np.int64)
    has = near < len(xy)
    near = np.minimum(near, max(len(xy) - 1, 0))
    near_cls = np.where(has, cls[near] if len(xy) else -1, -1)
    near_counted = has & (counted[near] if len(xy) else False)
    border = missed & (edge < border_px)
    rest = missed & ~border
    # Each truth nucleus missed for one reason (the masks are disjoint: counted cells are never
    # typed none, and other is counted on Lung1 only).
    missed_by = {
        "missed_border": border,
        "missed_typed_none": rest & (near_cls == NONE),
        "missed_typed_other": rest & ~near_counted & (near_cls == OTHER),
        # A counted cell within reach that the one-to-one matching gave to another nucleus.
        "missed_merged": rest & near_counted,
    }
    missed_by["missed_undetected"] = missed & ~np.logical_or.reduce(list(missed_by.values()))
    extra = np.ones(len(cxy), bool)
    extra[m.pairs[:, 0]] = False
    if len(cxy) and truth.n_cells:
        d_truth = cKDTree(truth.centroid_xy).query(cxy)[0]
    else:
        d_truth = np.full(len(cxy), np.inf)
    second = extra & (d_truth <= match_px)
    pos = dab[counted] >= KI67_CUT
    extra_by = {
        "extra_second_detection_pos": second & pos,
        "extra_second_detection_neg": second & ~pos,
        "extra_unlabelled_pos": extra & ~second & pos,
        "extra_unlabelled_neg": extra & ~second & ~pos,
    }
    out.update({k: int(v.sum()) for k, v in (missed_by | extra_by).items()})

    items: list[Difference] = []
    for kind, sel in missed_by.items():
        for i in np.flatnonzero(sel):
            c = int(near_cls[i])
            label = "positive" if truth.positive[i] else "negative"
            near_dab = float(dab[near[i]]) if c >= 0 else float("nan")
            items.append(
                Difference(
                    name,
                    kind,
                    float(tx[i]),
                    float(ty[i]),
                    label,
                    TYPE_LETTERS[c] if c >= 0 else "-",
                    near_dab,
                )
            )
    cls_c, dab_c = cls[counted], dab[counted]
    # Second detections, then unlabelled cells, each in image order (as their crops).
    for group in ("extra_second_detection", "extra_unlabelled"):
        sel = extra_by[f"{group}_pos"] | extra_by[f"{group}_neg"]
        for i in np.flatnonzero(sel):
            items.append(
                Difference(
                    name,
                    f"{group}_{'pos' if pos[i] else 'neg'}",
                    float(cxy[i, 0]),
                    float(cxy[i, 1]),
                    "unlabelled",
                    TYPE_LETTERS[int(cls_c[i])],
                    float(dab_c[i]),
                )
            )
    return out, items


def overlay(
    name: str,
    rgb: NDArray[np.uint8],
    truth: MaskCells,
    xy: NDArray[np.float64],
    cls: NDArray[np.int64],
    dab: NDArray[np.float32],
    path: Path,
) -> None:
    """Write the 2x review overlay described in the module docstring."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb).resize((2 * w, 2 * h), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    for (x, y), pos in zip(truth.centroid_xy, truth.positive, strict=True):
        draw.ellipse(
            [2 * x - 14, 2 * y - 14, 2 * x + 14, 2 * y + 14],
            outline=(255, 0, 0) if pos else (0, 0, 255),
            width=2,
        )
    counted = counted_types(name, cls)
    for (x, y), c, d, k in zip(xy, cls, dab, counted, strict=True):
        cx, cy, s = 2 * (x + 0.5), 2 * (y + 0.5), 5
        col = (0, 200, 0) if k else (255, 255, 0) if c == NONE else (140, 140, 140)
        if d >= KI67_CUT:
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], outline=col, width=2)
        else:
            draw.line([cx - s, cy, cx + s, cy], fill=col, width=2)
            draw.line([cx, cy - s, cx, cy + s], fill=col, width=2)
        draw.text((cx + 6, cy - 4), f"{TYPE_LETTERS[int(c)]}{d:.2f}", fill=col)
    im.save(path)


#: Review crops: half-width in image pixels (~16 um at 0.25 um/px) and zoom.
CROP_HALF_PX, CROP_ZOOM = 32, 3


def review_sheet(rgb: NDArray[np.uint8], items: list[Difference], path: Path) -> None:
    """A gallery of the image around each difference, numbered as the rows of the CSV
    (:func:`write_differences`), with a cross on the difference: for a pathologist to say, per
    crop, whether it is a tumour nucleus and whether it is Ki-67 positive."""
    from PIL import Image, ImageDraw

    side = 2 * CROP_HALF_PX * CROP_ZOOM
    cols = 6
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * (side + 4), rows * (side + 18)), (255, 255, 255))
    pad = np.pad(rgb, ((CROP_HALF_PX,) * 2, (CROP_HALF_PX,) * 2, (0, 0)), constant_values=255)
    for k, d in enumerate(items):
        x, y = round(d.x), round(d.y)
        crop = pad[y : y + 2 * CROP_HALF_PX, x : x + 2 * CROP_HALF_PX]
        tile = Image.fromarray(crop).resize((side, side), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        c, s = side // 2, 8
        draw.line([c - s, c, c + s, c], fill=(0, 255, 0), width=2)
        draw.line([c, c - s, c, c + s], fill=(0, 255, 0), width=2)
        ox, oy = (k % cols) * (side + 4), (k // cols) * (side + 18)
        sheet.paste(tile, (ox, oy + 16))
        label = f"{k + 1}: ({x}, {y}) {d.cell_type} {d.nucleus_dab:.2f}"
        ImageDraw.Draw(sheet).text((ox + 2, oy + 2), label, fill=(0, 0, 0))
    sheet.save(path)


def write_differences(items: list[Difference], path: Path) -> None:
    """Every difference as a CSV row (``id`` numbers the review sheet's crops per image), with an
    empty ``verdict`` column for the reviewer."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            ["image", "id", "kind", "x_px", "y_px", "truth", "cell_type", "nucleus_dab", "verdict"]
        )
        seen: dict[str, int] = {}
        for d in items:
            seen[d.image] = seen.get(d.image, 0) + 1
            out.writerow(
                [
                    d.image,
                    seen[d.image],
                    d.kind,
                    f"{d.x:.1f}",
                    f"{d.y:.1f}",
                    d.truth,
                    d.cell_type,
                    f"{d.nucleus_dab:.3f}",
                    "",
                ]
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEEPLIIF, help="deepliif-ki67-samples folder")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for overlay PNGs (none: no PNGs)"
    )
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--match-px", type=float, default=16.0, help="match radius, pixels")
    ap.add_argument(
        "--border-um",
        type=float,
        default=2.5,
        help="a missed truth nucleus this close to the image edge is a border sliver (um)",
    )
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"{args.data}: no such folder (the DeepLIIF samples live in ../shared/data)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    every: list[Difference] = []
    for name, rgb, truth in cases(args.data):
        res = score_image(rgb, "ki67", mpp=args.mpp, device="cpu")
        c = res.cells
        counted = counted_types(name, c["type"])
        n = int(counted.sum())
        pos = 100 * float(np.mean(c["nucleus_dab"][counted] >= KI67_CUT)) if n else 0.0
        ok_n = abs(n - truth.n_cells) <= 0.2 * truth.n_cells
        ok_p = abs(pos - truth.percent_positive) <= 5.0
        print(
            f"{name}: counted cells {n} / truth {truth.n_cells} "
            f"({0.8 * truth.n_cells:.1f}-{1.2 * truth.n_cells:.1f}: {'met' if ok_n else 'MISSED'}), "
            f"positive {pos:.1f} / {truth.percent_positive:.1f} % "
            f"(+-5: {'met' if ok_p else 'MISSED'}); types T/L/M/other "
            f"{np.bincount(c['type'], minlength=4).tolist()}"
        )
        xy, cls, dab = all_detections(rgb, args.mpp, res.extra["stains"])
        why, items = explain(
            name, rgb.shape[:2], truth, xy, cls, dab, args.match_px, args.border_um / args.mpp
        )
        print("  " + ", ".join(f"{k} {v}" for k, v in why.items()))
        every += items
        if args.out is not None:
            overlay(name, rgb, truth, xy, cls, dab, args.out / f"{name}.png")
            review_sheet(rgb, items, args.out / f"{name}-review.png")
    if args.out is not None:
        write_differences(every, args.out / "differences.csv")
        print(f"overlays, review sheets and differences.csv written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
