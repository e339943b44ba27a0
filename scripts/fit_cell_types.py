"""Refit the cell-type regression of a model (``models/<model>/cell_types.json``).

By default it fits on the project's synthetic slides (several presets, seeds, stains and scan
resolutions) and reports accuracy on held-out seeds. To fit on your own annotations, build
feature rows with ``pathology.scoring.training_cells(image, xy, types, mpp=...)`` per annotated image
and call ``pathology.scoring.fit_cell_types``; this script shows the whole loop.

    python scripts/fit_cell_types.py --out models/physics-v1/cell_types.json

Scale variety: besides regions at their true size, each seed also renders every preset at a coarser
pixel size ``mpp / f`` and hands the image to the detector as if it were at ``mpp`` (``--scales``,
default f = 0.75, 0.6, 0.5). The detector then sees the same tissue with every length shrunk by f:
smaller nuclei (tumour 4.5-10.5 um across instead of 9-14 um), packed closer, with the
peri-nuclear haematoxylin of crowded tissue. Real Ki-67 tiles at 0.25 um/px (DeepLIIF/BCData, the
OS-2 osteosarcoma crops) look like that: their nuclei are ~7 um across, and a classifier fitted on
true-size synthetic cells only typed most of them ``none``.

Look variety (``--variety``, default 1.0): two thirds of the regions are drawn with
``SynthParams.variety`` (cytoplasm counterstain, pale and dark nuclei, elongated tumour nuclei,
dense DAB that partly unmixes as haematoxylin) and stronger staining, so the fit does not lean on
cues that are constants of the generator but vary on real slides (see the model card).

Each region is unmixed with stain vectors and glass brightness estimated from it, as
``score_image`` does: the features are optical densities, and a fit on reference vectors and white
glass is off by the glass's optical density on every slide scored.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import numpy as np

from pathology.scoring import CELL_CLASSES, fit_cell_types
from pathology.scoring._celltype import HIDDEN_UNITS
from pathology.scoring._fit import MPPS, MPPS_SHRUNK, PRESETS, type_confusion
from pathology.scoring._fit import synthetic_training_cells as collect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="cell_types.json to write")
    ap.add_argument("--train-seeds", type=int, default=8)
    ap.add_argument("--test-seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024, help="region size in pixels")
    ap.add_argument(
        "--scales",
        default="1.0,0.75,0.6,0.5",
        help="comma-separated length factors f (1.0 = true size; see the module docstring)",
    )
    ap.add_argument(
        "--jpeg",
        action="store_true",
        help="pass every other region through the SVS writer's JPEG (q90, 4:2:0), train and test",
    )
    ap.add_argument(
        "--variety",
        type=float,
        default=1.0,
        help="look variety of the regions (SynthParams.variety), cycled 0, half, full over the "
        "regions, train and test (default 1.0; 0 = the reference look only, as before 2026-11-24)",
    )
    ap.add_argument(
        "--hidden",
        type=int,
        default=HIDDEN_UNITS,
        help=f"hidden tanh units of the classifier (default {HIDDEN_UNITS}: the shipped linear "
        "softmax regression; a hidden layer suits fits on annotated real cells, see the model card)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the hidden layer's random start")
    args = ap.parse_args(argv)
    if args.hidden < 0:
        ap.error(f"--hidden must be >= 0, got {args.hidden}")
    if not 0.0 <= args.variety <= 1.0:
        ap.error(f"--variety must be 0-1, got {args.variety}")
    scales = tuple(float(f) for f in args.scales.split(","))
    if not scales or any(not 0.2 <= f <= 1.0 for f in scales):
        ap.error(f"--scales must be factors in 0.2-1.0, got {args.scales!r}")
    train, test = range(100, 100 + args.train_seeds), range(900, 900 + args.test_seeds)
    xtr, ytr = collect(train, args.size, scales, args.jpeg, args.variety)
    meta = {
        "fitted": dt.date.today().isoformat(),
        "fitted_on": f"synthetic regions {args.size}px, presets {', '.join(PRESETS)}, seeds "
        f"100-{99 + args.train_seeds}; true size at mpp {sorted(set(MPPS))}; lengths shrunk by "
        f"f = {', '.join(str(f) for f in scales if f != 1.0) or 'none'} (rendered at mpp / f, "
        f"detected at mpp {sorted(set(MPPS_SHRUNK))}); stains and glass estimated per region, "
        "as at scoring"
        + ("; every other region through JPEG q90 4:2:0" if args.jpeg else "")
        + (
            f"; look variety cycled 0 / {args.variety / 2:g} / {args.variety:g} over the regions "
            "(stronger Ki-67 and PD-L1 staining where it is not 0)"
            if args.variety
            else ""
        ),
        "held_out": f"seeds 900-{899 + args.test_seeds}, each scale",
    }
    model = fit_cell_types(xtr, ytr, hidden=args.hidden, seed=args.seed, meta=meta)
    by_scale: dict[float, np.ndarray] = {}
    for f in scales:
        xte, yte = collect(test, args.size, (f,), args.jpeg, args.variety)
        cm = type_confusion(model, xte, yte)
        by_scale[f] = cm
        rec = [round(float(cm[i, i] / max(1, cm[i].sum())), 3) for i in range(len(CELL_CLASSES))]
        print(
            f"held-out f={f}: {len(yte)} cells, accuracy {np.trace(cm) / cm.sum():.4f}, recall {rec}"
        )
    cm = np.sum(list(by_scale.values()), axis=0)
    acc = float(np.trace(cm) / cm.sum())
    per = {
        CELL_CLASSES[i]: round(float(cm[i, i] / max(1, cm[i].sum())), 4)
        for i in range(len(CELL_CLASSES))
    }
    model = type(model)(
        **{
            **model.__dict__,
            "meta": {
                **model.meta,
                "held_out_accuracy": round(acc, 4),
                "held_out_recall": per,
                "held_out_confusion": cm.tolist(),
                "held_out_accuracy_by_scale": {
                    str(f): round(float(np.trace(c) / c.sum()), 4) for f, c in by_scale.items()
                },
            },
        }
    )
    model.save(args.out)
    print(f"train cells {len(ytr)}, held-out cells {int(cm.sum())}, held-out accuracy {acc:.4f}")
    print("confusion (rows truth, cols predicted):", " ".join(CELL_CLASSES))
    for i, row in enumerate(cm):
        print(f"  {CELL_CLASSES[i]:>10}: {row.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
