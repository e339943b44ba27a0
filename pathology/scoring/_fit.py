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

__all__ = ["TrainingCells", "training_cells"]

#: A detection within this distance of an annotated centre matches it.
MATCH_RADIUS_UM = 4.0


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
            fe = cell_features(rays, resp, radius).numpy()
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
