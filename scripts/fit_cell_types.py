"""Refit the cell-type regression of a model (``models/<model>/cell_types.json``).

By default it fits on the project's synthetic slides (several presets, seeds, stains and scan
resolutions) and reports accuracy on held-out seeds. To fit on your own annotations, build
feature rows with ``pathology.scoring.training_cells(image, xy, types, mpp=...)`` per annotated image
and call ``pathology.scoring.fit_cell_types``; this script shows the whole loop.

    python scripts/fit_cell_types.py --out models/physics-v1/cell_types.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import numpy as np

from pathology.scoring import CELL_CLASSES, fit_cell_types, training_cells
from pathology.synth import SynthParams, render_region

PRESETS = ("p16_positive", "p16_negative", "pdl1_cps_ge20", "pdl1_cps_1_19", "ki67")
MARKER = {"p16": "p16", "pdl1": "pdl1", "ki67": "ki67"}


def collect(seeds: range, size: int, mpps: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for seed in seeds:
        for k, preset in enumerate(PRESETS):
            mpp = mpps[(seed + k) % len(mpps)]
            p = SynthParams.preset(preset, width=size, height=size, mpp=mpp, seed=seed)
            r = render_region(p)
            xy = np.array([(c.x, c.y) for c in r.truth.cells], np.float64)
            types = [c.type for c in r.truth.cells]
            tc = training_cells(r.rgb, xy, types, mpp=mpp, marker=MARKER[p.marker])
            feats.append(tc.features)
            labels.append(tc.labels)
    return np.concatenate(feats), np.concatenate(labels)


def confusion(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    pred = model.predict_proba(x).argmax(1)
    c = len(CELL_CLASSES)
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="cell_types.json to write")
    ap.add_argument("--train-seeds", type=int, default=8)
    ap.add_argument("--test-seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024, help="region size in pixels")
    args = ap.parse_args(argv)
    mpps = (0.25, 0.5, 0.5, 1.0)
    xtr, ytr = collect(range(100, 100 + args.train_seeds), args.size, mpps)
    xte, yte = collect(range(900, 900 + args.test_seeds), args.size, mpps)
    meta = {
        "fitted": dt.date.today().isoformat(),
        "fitted_on": f"synthetic regions {args.size}px, presets {', '.join(PRESETS)}, seeds "
        f"100-{99 + args.train_seeds}, mpp {sorted(set(mpps))}",
        "held_out": f"seeds 900-{899 + args.test_seeds}",
    }
    model = fit_cell_types(xtr, ytr, meta=meta)
    cm = confusion(model, xte, yte)
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
            },
        }
    )
    model.save(args.out)
    print(f"train cells {len(ytr)}, held-out cells {len(yte)}, held-out accuracy {acc:.4f}")
    print("confusion (rows truth, cols predicted):", " ".join(CELL_CLASSES))
    for i, row in enumerate(cm):
        print(f"  {CELL_CLASSES[i]:>10}: {row.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
