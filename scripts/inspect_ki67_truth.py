"""Compare the Ki-67 scorer with the DeepLIIF / BCData ground truth in ``../shared/data``.

Per image: kept cells and positive % against the mask's nuclei, one-to-one matches (true / false
positives, misses), how many matched nuclei the cell typing dropped as ``none``, and an overlay PNG
(2x) for review: truth circles (red positive, blue negative), every detection as a cross (nucleus
DAB < 0.2) or square (>= 0.2), green when kept, yellow when typed ``none``, labelled with its type
letter (T L M F N) and nucleus DAB.

    python scripts/inspect_ki67_truth.py --out /tmp/ki67-review

The images are non-commercial data referenced from the shared folder; the overlays are written
outside the repository and must not be committed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pathology.groundtruth import MaskCells, deepliif_panel, load_deepliif_mask, match_cells
from pathology.scoring import StainEstimate, score_image

DEEPLIIF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepliif-ki67-samples"
TYPE_LETTERS = "TLMFN"


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
    """Every detection before ``none`` is dropped: centres (K, 2) image pixels (x, y), cell class
    (K,) (index into ``CELL_CLASSES``, 4 = ``none``) and nucleus DAB OD (K,)."""
    import torch

    from pathology.scoring import load_model
    from pathology.scoring._api import tiles_with_halo
    from pathology.scoring._celltype import cell_features
    from pathology.scoring._model import halo_for

    halo = halo_for(mpp)
    scorer = load_model("ki67", mpp, stains=stains, halo_px=halo, device="cpu")
    tiles, origins = tiles_with_halo(rgb, 256, halo)
    xy, cls_all, dab = [], [], []
    with torch.inference_mode():
        t = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
        rays, resp, radius = scorer.detect(scorer.stain_maps(t))
        cls, _ = scorer.classify(cell_features(rays, resp, radius, scorer.stains.h_scale))
        y = rays.yx_um[:, 0].numpy() / mpp - 0.5
        x = rays.yx_um[:, 1].numpy() / mpp - 0.5
        size = t.shape[-1]
        core = (
            (y >= halo - 0.5)
            & (y < size - halo - 0.5)
            & (x >= halo - 0.5)
            & (x < size - halo - 0.5)
        )
        o = origins[rays.tile.numpy()]
        gx, gy = x - halo + o[:, 1], y - halo + o[:, 0]
        core &= (gx < rgb.shape[1]) & (gy < rgb.shape[0])
        xy.append(np.stack([gx, gy], 1)[core])
        cls_all.append(cls.numpy()[core])
        dab.append(rays.dab_nucleus().numpy()[core])
    return np.concatenate(xy).astype(np.float64), np.concatenate(cls_all), np.concatenate(dab)


def overlay(
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
    for (x, y), c, d in zip(xy, cls, dab, strict=True):
        cx, cy, s = 2 * (x + 0.5), 2 * (y + 0.5), 5
        col = (255, 255, 0) if c == 4 else (0, 200, 0)
        if d >= 0.2:
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], outline=col, width=2)
        else:
            draw.line([cx - s, cy, cx + s, cy], fill=col, width=2)
            draw.line([cx, cy - s, cx, cy + s], fill=col, width=2)
        draw.text((cx + 6, cy - 4), f"{TYPE_LETTERS[int(c)]}{d:.2f}", fill=col)
    im.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEEPLIIF, help="deepliif-ki67-samples folder")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for overlay PNGs (none: no PNGs)"
    )
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--match-px", type=float, default=16.0, help="match radius, pixels")
    args = ap.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for name, rgb, truth in cases(args.data):
        res = score_image(rgb, "ki67", mpp=args.mpp, device="cpu")
        c = res.cells
        kept_xy = np.stack([c["x"], c["y"]], 1)
        m = match_cells(kept_xy, truth.centroid_xy, args.match_px)
        pos = 100 * float(np.mean(c["nucleus_dab"] >= 0.2)) if len(kept_xy) else 0.0
        xy, cls, dab = all_detections(rgb, args.mpp, res.extra["stains"])
        m_all = match_cells(xy, truth.centroid_xy, args.match_px)
        none_matched = int(np.sum(cls[m_all.pairs[:, 0]] == 4)) if len(m_all.pairs) else 0
        types = np.bincount(c["type"], minlength=4).tolist()
        print(
            f"{name}: kept {len(kept_xy)} / truth {truth.n_cells}, positive {pos:.1f} / "
            f"{truth.percent_positive:.1f} %, TP {m.tp} FP {m.fp} FN {m.fn}, types T/L/M/other "
            f"{types}, truth nuclei matched by a `none` detection {none_matched}"
        )
        if args.out is not None:
            overlay(rgb, truth, xy, cls, dab, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
