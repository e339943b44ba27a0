"""Pen ink and scanner borders: colours no haematoxylin/eosin/DAB mix makes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    pass

from pathology.tissue._constants import (
    _BLACK_GREY_RATIO,
    _BLACK_OD,
    _BLUE_INK_OD,
    _INK_FRINGE_COS,
    _INK_MIN_OD,
)


def _ink_colour(od: NDArray[np.float32], od_norm: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Which pixels have a colour no stain mix makes: pen ink, or a near-black border.

    Haematoxylin, eosin and DAB all absorb green. In OD ratios ``x = od_r / od_g`` and
    ``y = od_b / od_g``, real stains (measured on H&E, Ki-67 and FHL2 IHC from four scanners at
    1-8 um/px) lie along two arms: H to E (y < 0.8) and H to DAB (y rising as x falls), with blue
    (Mayer's) haematoxylin reaching x ~2 at low OD. Inks fall off both arms.

    Parameters
    ----------
    od : ndarray (N, 3) float32
        OD per RGB channel of the pixels to judge, all with ``od_norm >= _INK_MIN_OD``.
    od_norm : ndarray (N,) float32
        Their OD norms.

    Returns
    -------
    ndarray (N,) bool
    """
    od_r, od_g, od_b = od[:, 0], od[:, 1], od[:, 2]
    g = np.maximum(
        od_g, 1e-3
    )  # green ink absorbs little green: the ratios become large, as they should
    x, y = od_r / g, od_b / g
    # Green / teal ink transmits green best: red and blue absorbed more than green.
    green = ((x >= 1.5) & (y >= 1.1)) | (x >= 2.4)
    # Blue ink: red absorbed more than green, blue hardly at all. Blue haematoxylin has that hue too;
    # only its darkness at thumbnail scale tells blue ink apart.
    blue = (x >= 1.15) & (y <= 0.5) & (od_norm >= _BLUE_INK_OD)
    # Red ink: green and blue absorbed, red not: too much blue for eosin, too little red for DAB.
    red = (x <= 0.3) & (y >= 0.72) & (y <= 1.5)
    # Black ink, scanner border: every channel absorbs strongly and about equally.
    od_min = np.minimum(np.minimum(od_r, od_g), od_b)
    od_max = np.maximum(np.maximum(od_r, od_g), od_b)
    black = (od_min >= _BLACK_OD) & (od_min >= _BLACK_GREY_RATIO * od_max)
    return green | blue | red | black


def _ink_mask(
    od: NDArray[np.float32],
    od_norm: NDArray[np.float32],
    stained: NDArray[np.bool_],
    *,
    min_ink_px: float,
    fringe_px: float,
) -> NDArray[np.bool_]:
    """Pixels to remove for ink: long or large ink regions, their soft edges, and one pixel more.

    ``od`` (h, w, 3), ``od_norm`` and ``stained`` (h, w); returns (h, w) bool.
    """
    from scipy import ndimage as ndi

    # Every ink pixel is reliable (OD norm >= _INK_MIN_OD; black implies more): judge only those.
    core = od_norm >= _INK_MIN_OD
    core[core] = _ink_colour(od[core], od_norm[core])
    if not core.any():
        return core
    # Dark stain makes ink-coloured specks (saturated DAB nuclei look black and grey); pen strokes
    # and borders are large and long, nuclei small and round. Keep regions above the size floor
    # that are elongated (length >= 3 widths, from the widest inscribed disc) or very large.
    labels, n = ndi.label(core, structure=np.ones((3, 3), dtype=bool))
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    half_width = np.zeros(n + 1)
    np.maximum.at(half_width, labels[core], ndi.distance_transform_edt(core)[core])
    elongation = area / np.maximum(2.0 * half_width[1:], 1.0) ** 2
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (area >= min_ink_px) & ((elongation >= 3.0) | (area >= 20 * min_ink_px))
    core = keep[labels]
    if not core.any():
        return core
    # The soft edge of a stroke is the same ink at a lower OD: the same OD direction as the nearest
    # ink pixel (pale tissue beside a stroke points elsewhere). One pixel more for the smoothing.
    dist, (iy, ix) = ndi.distance_transform_edt(~core, return_indices=True)
    fringe = (dist <= fringe_px) & stained & ~core
    od_f, od_c = od[fringe], od[iy[fringe], ix[fringe]]
    cos = (od_f * od_c).sum(axis=1) / np.maximum(
        od_norm[fringe] * od_norm[iy[fringe], ix[fringe]], 1e-6
    )
    fringe[fringe] = cos >= _INK_FRINGE_COS
    return core | fringe
