"""Binary morphology by distance transforms and connected components, sizes in pixels."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def _dilate(mask: NDArray[np.bool_], radius: float) -> NDArray[np.bool_]:
    """Binary dilation by a disk, via the Euclidean distance transform (O(n) for any radius)."""
    from scipy import ndimage as ndi

    if not mask.any():
        return mask.copy()
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius + 0.5)


def _erode(mask: NDArray[np.bool_], radius: float) -> NDArray[np.bool_]:
    """Binary erosion by a disk; pixels outside the image do not erode (they are unknown)."""
    from scipy import ndimage as ndi

    if mask.all():
        return mask.copy()
    return np.asarray(ndi.distance_transform_edt(mask) > radius + 0.5)


def _fill_small_holes(mask: NDArray[np.bool_], max_hole_px: float) -> NDArray[np.bool_]:
    from scipy import ndimage as ndi

    if max_hole_px <= 0:
        return mask
    holes = ~mask
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # Background touching the image edge is glass around the tissue, not a hole.
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_hole_px
    fill[edge] = False
    fill[0] = False
    return mask | fill[labels]


def _remove_small_objects(mask: NDArray[np.bool_], min_px: float) -> NDArray[np.bool_]:
    from scipy import ndimage as ndi

    if min_px <= 1:
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]
