"""Refitting the cell-type regression from annotated cells.

Given an image and annotated nucleus centres with their types (from a pathologist's QuPath points,
or a synthetic slide's truth), :func:`training_cells` runs the detector, matches detections to the
annotations one-to-one within a radius and returns the feature rows with labels (detections that
match nothing are labelled ``none``). Stack rows from several images and pass them to
:func:`pathology.scoring.fit_cell_types`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pathology.scoring._celltype import CELL_CLASSES, FEATURES, NONE, CellTypeModel, cell_features
from pathology.scoring._markers import MarkerConfig, load_marker
from pathology.scoring._stains import StainEstimate

__all__ = [
    "INTENSITIES",
    "MPPS",
    "MPPS_SHRUNK",
    "PRESETS",
    "TrainingCells",
    "synthetic_training_cells",
    "training_cells",
    "type_confusion",
]

#: A detection within this distance of an annotated centre matches it.
MATCH_RADIUS_UM = 4.0

#: Synthetic presets the shipped cell-type classifier is fitted on (``scripts/fit_cell_types.py``).
PRESETS = ("p16_positive", "p16_negative", "pdl1_cps_ge20", "pdl1_cps_1_19", "ki67")
#: Scan resolutions cycled over (seed, preset): true-size regions, and shrunk ones (f < 1), whose
#: cells are small enough that 1.0 um/px would leave them a few pixels across.
MPPS = (0.25, 0.5, 0.5, 1.0)
MPPS_SHRUNK = (0.25, 0.25, 0.5)
#: Staining strengths (DAB OD) cycled over in regions drawn with ``variety``. Ki-67-positive
#: nuclei on scanned slides read 1.7-2.2 OD (BCData 22_2, 34_3, 6_2: the upper quantiles of the
#: nuclei matched to the labels, i.e. the positive ones), far above the presets' 0.5.
INTENSITIES: dict[str, tuple[str | float, ...]] = {
    "ki67": ("moderate", "strong", 1.2, 1.6, 2.0),
    "pdl1_cps_ge20": ("strong", 1.1),
    "pdl1_cps_1_19": ("moderate", "strong"),
}


@dataclass(frozen=True)
class TrainingCells:
    """Feature rows (M, F) float32, labels (M,) int (index into CELL_CLASSES), and xy (M, 2) px."""

    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    xy: NDArray[np.float32]
    n_annotated: int
    n_matched: int


def training_cells(
    rgb: NDArray[np.uint8],
    truth_xy: ArrayLike,
    truth_type: ArrayLike,
    *,
    mpp: float,
    marker: str | os.PathLike[str] | MarkerConfig = "ki67",
    tile_px: int = 256,
    stains: StainEstimate | str = "estimate",
) -> TrainingCells:
    """Detections of ``rgb`` with features and the annotated type they match.

    Parameters
    ----------
    rgb : ndarray (H, W, 3) uint8
    truth_xy : array (M, 2) float
        Annotated nucleus centres, image pixels (x, y).
    truth_type : array (M,) of str
        One of ``tumor``, ``lymphocyte``, ``macrophage``, ``fibroblast`` per annotation.
    stains : StainEstimate or {"estimate", "reference"}
        How the image is unmixed, as in :func:`score_image` (default: estimated from the image,
        which is what scoring does). Features are optical densities, so a classifier must be
        fitted on the unmixing it will be used with: reference vectors and white glass on a slide
        whose glass is 239 shift every haematoxylin feature by ~0.03 OD, and on the synthetic
        slides that alone turned half the macrophages into tumour cells at scoring time.
    """
    import torch

    from pathology.groundtruth import match_cells
    from pathology.scoring._api import image_stains, tiles_with_halo
    from pathology.scoring._model import CellScorer, halo_for

    cfg = load_marker(marker)
    img = np.asarray(rgb, np.uint8)
    est = image_stains(img, stains, cfg)
    dummy = _dummy_types()
    halo = halo_for(mpp)
    scorer = CellScorer(cfg, mpp, dummy, stains=est, halo_px=halo).eval()
    tiles, origins = tiles_with_halo(img, tile_px, halo)
    feats, xy = [], []
    with torch.inference_mode():
        for i in range(0, len(tiles), 16):
            t = torch.from_numpy(tiles[i : i + 16]).permute(0, 3, 1, 2).contiguous()
            maps = scorer.stain_maps(t)
            rays, resp, radius = scorer.detect(maps)
            fe = cell_features(rays, resp, radius, est.h_scale).numpy()
            y = rays.centre_um[:, 0].numpy() / mpp - 0.5
            x = rays.centre_um[:, 1].numpy() / mpp - 0.5
            core = scorer.in_core(rays.centre_um, t.shape[-2], t.shape[-1]).numpy()
            o = origins[i + rays.tile.numpy()]
            feats.append(fe[core])
            xy.append(np.stack([x - halo + o[:, 1], y - halo + o[:, 0]], 1)[core])
    fx = np.concatenate(feats).astype(np.float32)
    pxy = np.concatenate(xy).astype(np.float32)
    txy = np.asarray(truth_xy, np.float64).reshape(-1, 2)
    names = np.asarray(truth_type)
    lut = {n: i for i, n in enumerate(CELL_CLASSES)}
    tlab = np.array([lut[str(n)] for n in names], np.int64)
    m = match_cells(pxy, txy, MATCH_RADIUS_UM / mpp)
    labels = np.full(len(pxy), NONE, np.int64)
    if len(m.pairs):
        labels[m.pairs[:, 0]] = tlab[m.pairs[:, 1]]
    return TrainingCells(fx, labels, pxy, len(txy), int(m.tp))


def _dummy_types() -> CellTypeModel:
    c, f = len(CELL_CLASSES), len(FEATURES)
    return CellTypeModel(
        weights=np.zeros((c, f), np.float32),
        bias=np.array([1, 0, 0, 0, 0], np.float32),
        mean=np.zeros(f, np.float32),
        scale=np.ones(f, np.float32),
    )


def synthetic_training_cells(
    seeds: range,
    size: int,
    scales: tuple[float, ...] = (1.0,),
    jpeg: bool = False,
    variety: float = 0.0,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Feature rows and labels of every (seed, preset, scale) of the project's synthetic slides:
    a ``size`` px region rendered at ``mpp / f`` and detected as if at ``mpp``, so every length the
    detector sees is ``f`` x the true one. ``jpeg``: every other region goes through the SVS
    writer's JPEG (q90, 4:2:0) first, as a scanned slide's pixels do. ``variety``: the regions
    cycle through ``SynthParams.variety`` 0, ``variety / 2`` and ``variety`` (and, where it is not
    0, Ki-67 and PD-L1 through stronger staining, :data:`INTENSITIES`), so the reference look
    stays a third of the cells. What ``scripts/fit_cell_types.py`` fits and tests on."""
    from pathology.synth import SynthParams, render_region
    from pathology.synth._svs import jpeg_round_trip

    feats, labels = [], []
    for seed in seeds:
        for k, preset in enumerate(PRESETS):
            for f in scales:
                mpps = MPPS if f == 1.0 else MPPS_SHRUNK
                mpp = mpps[(seed + k) % len(mpps)]
                v = variety * ((seed + k) % 3) / 2
                extra: dict[str, object] = {"variety": v}
                if v > 0 and preset in INTENSITIES:
                    cyc = INTENSITIES[preset]
                    extra["intensity"] = cyc[(seed + k + int(f * 4)) % len(cyc)]
                p = SynthParams.preset(
                    preset, width=size, height=size, mpp=mpp / f, seed=seed, **extra
                )
                r = render_region(p)
                xy = np.array([(c.x, c.y) for c in r.truth.cells], np.float64)
                types = [c.type for c in r.truth.cells]
                rgb = jpeg_round_trip(r.rgb) if jpeg and (seed + k) % 2 else r.rgb
                tc = training_cells(rgb, xy, types, mpp=mpp, marker=p.marker)
                feats.append(tc.features)
                labels.append(tc.labels)
    return np.concatenate(feats), np.concatenate(labels)


def type_confusion(
    model: CellTypeModel, x: NDArray[np.float32], y: NDArray[np.int64]
) -> NDArray[np.int64]:
    """(C, C) confusion counts of ``model`` on feature rows ``x`` with labels ``y``: rows the true
    class, columns the predicted one, in :data:`CELL_CLASSES` order."""
    pred = model.predict_proba(x).argmax(1)
    c = len(CELL_CLASSES)
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
