"""Tissue detection on one RGB thumbnail: stain threshold over modelled glass, ink, shape."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    pass

from pathology.tissue._constants import (
    _MAX_HOLE_FRAC,
    _MAX_THRESHOLD_OD,
    _MIN_INK_FRAC,
    _MIN_INK_UM2,
    _MIN_OBJECT_FRAC,
    _NOISE_K,
)
from pathology.tissue._glass import _glass_background
from pathology.tissue._ink import _ink_mask
from pathology.tissue._morph import _dilate, _erode, _fill_small_holes, _remove_small_objects


def tissue_mask_from_rgb(
    rgb: NDArray[np.uint8],
    *,
    mpp: float | None = None,
    min_od: float = 0.02,
    reject_ink: bool = True,
    smooth_px: float = 0.5,
    close_um: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 10_000.0,
) -> NDArray[np.bool_]:
    """Tissue mask of a low-resolution RGB image of a brightfield slide (H&E or IHC).

    Meant for thumbnails at about 2-16 um/px, where a pixel averages many cells. At full resolution it
    still separates stain from glass, but ink rejection is less reliable (saturated DAB nuclei are
    nearly black); pass ``reject_ink=False`` there if nothing was drawn on the slide.

    Parameters
    ----------
    rgb : ndarray (h, w, 3) uint8
        Transmitted light, 0-255. Pure white (255, 255, 255) is treated as "no data" (OpenSlide's
        padding outside the scanned area), never as tissue.
    mpp : float, optional
        Microns per pixel *of this image*. Without it, ``close_um`` becomes 1 px and the size limits
        become fractions of the image area (objects < 0.01%, holes < 0.05%).
    min_od : float
        Lowest tissue threshold, as the norm of the OD vector relative to glass (base-10). The actual
        threshold is 5 robust standard deviations of the glass OD, clamped to
        [``min_od``, ``max(min_od, 0.04)``]. 0.02 = 4.5% of the light absorbed; pale IHC
        counterstain is ~0.05-0.15.
    reject_ink : bool
        Remove pen ink (green, blue, red, black) and near-black scanner borders.
    smooth_px : float
        Gaussian sigma in pixels applied before thresholding (glass noise, JPEG blocks).
    close_um : float
        Radius of the morphological closing (um) that joins loose stroma and fibres; 0 disables.
    min_object_um2 : float
        Connected tissue regions smaller than this area (um^2) are dropped (dust, debris).
        20,000 um^2 is a disc of ~160 um.
    max_hole_um2 : float
        Holes smaller than this (um^2) are filled (lumina, fat cells, small tears).

    Returns
    -------
    ndarray (h, w) bool
        True where there is tissue.
    """
    from scipy import ndimage as ndi

    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"rgb must be an (h, w, 3) uint8 array; got {arr.shape} {arr.dtype}")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of microns per pixel; got {mpp!r}")
    if not 0 < min_od < 1:
        raise ValueError(
            f"min_od must be an optical density between 0 and 1 (e.g. 0.02); got {min_od!r}"
        )
    for name, value in (
        ("smooth_px", smooth_px),
        ("close_um", close_um),
        ("min_object_um2", min_object_um2),
        ("max_hole_um2", max_hole_um2),
    ):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a non-negative number; got {value!r}")
    h, w = arr.shape[:2]
    if mpp is not None:
        close_px = max(1, round(close_um / mpp))
        min_object_px = min_object_um2 / mpp**2
        max_hole_px = max_hole_um2 / mpp**2
        min_ink_px = _MIN_INK_UM2 / mpp**2
    else:
        close_px = 1
        min_object_px = _MIN_OBJECT_FRAC * h * w
        max_hole_px = _MAX_HOLE_FRAC * h * w
        min_ink_px = _MIN_INK_FRAC * h * w
    nodata = (arr == 255).all(axis=-1)

    rgbf = arr.astype(np.float32)
    if smooth_px > 0:
        rgbf = ndi.gaussian_filter(rgbf, sigma=(smooth_px, smooth_px, 0), mode="nearest")

    glass, noise_od = _glass_background(rgbf, ~nodata)
    # Beer-Lambert: od = log10(I0 / I) per channel, I0 = local glass; +1 keeps log finite at 0.
    od = np.log10((glass + 1.0) / (rgbf + 1.0))
    np.maximum(od, 0.0, out=od)
    od_norm = np.sqrt(od[..., 0] ** 2 + od[..., 1] ** 2 + od[..., 2] ** 2)

    threshold = float(np.clip(_NOISE_K * noise_od, min_od, max(min_od, _MAX_THRESHOLD_OD)))
    # Hysteresis: a region must reach 1.5x the threshold somewhere, so glass noise blobs that just
    # graze the threshold vanish while pale edges attached to real tissue are kept.
    weak = (od_norm >= threshold) & ~nodata
    labels, n = ndi.label(weak)
    keep = np.zeros(n + 1, dtype=bool)
    keep[labels[weak & (od_norm >= 1.5 * threshold)]] = True
    keep[0] = False
    cand = keep[labels]

    ink = np.zeros_like(cand)
    if reject_ink:
        # How far a stroke's soft edge is followed: a few pixels beyond the smoothing.
        fringe_px = 4 * max(smooth_px, 1.0)
        ink = _ink_mask(od, od_norm, weak, min_ink_px=min_ink_px, fringe_px=fringe_px)
        cand &= ~ink

    if close_um > 0 and cand.any():
        # Outside the image counts as tissue for the erosion, so edge-touching tissue is not eaten.
        cand = _erode(_dilate(cand, close_px), close_px)
    cand = _fill_small_holes(cand, max_hole_px)
    # Holes left by ink stay holes: what lies under ink cannot be scored.
    cand &= ~ink & ~nodata
    return _remove_small_objects(cand, min_object_px)
