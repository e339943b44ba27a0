"""Tissue mask at thumbnail scale, built from transmitted-light optics so pale IHC tissue survives.

Coordinate planes (as in :mod:`pathology.slide`):

- ``l0_xy`` / ``l0_size``: (x, y) position / (w, h) size in level-0 pixels.
- mask pixel ``(row, col)`` covers level-0 ``[col * ds_x, (col + 1) * ds_x) x [row * ds_y, (row + 1) * ds_y)``
  with ``(ds_x, ds_y) = TissueMask.downsample_xy``.
- ``mpp`` in :func:`tissue_mask_from_rgb`: microns per pixel *of the image given* (the thumbnail);
  ``TissueMask.mpp``: microns per level-0 pixel.

Why not Otsu: Otsu on grey or saturation splits the two largest intensity populations. On IHC the
counterstain is pale and often grey, and pen ink or a black border is the darkest population, so the
threshold lands between tissue and ink and pale tissue is called glass. Here glass is modelled
instead of tissue, from transmitted-light optics:

1. Glass. Its intensity ``I0`` per RGB channel is the median of the brightest pixels (pure-white
   scanner padding left out when its edges run along the tile grid), refined as a smooth quadratic
   surface fitted to glass seeds: pixels with no stain anywhere near them, grown outward from the
   brightest glass. Tinted and unevenly lit glass is OD 0; the surface is trusted only near glass it
   has seen, so it never extrapolates into tissue. A view without glass-like pixels (a field inside
   tissue) gets white-balanced glass.
2. Stain. Optical density relative to that glass, ``od = log10(I0 / I)`` (Beer-Lambert), is
   thresholded at 5 robust standard deviations of the glass OD, clamped to [``min_od``, 0.04], with
   1.5x hysteresis: any stain, however pale, absorbs light; glass does not.
3. Ink. Haematoxylin, eosin and DAB all absorb green, and their OD ratios ``r/g``, ``b/g`` lie on
   an H-E arm and an H-DAB arm. Green ink absorbs red and blue more than green, blue ink red but not
   blue (and darker than a counterstain), red ink too much blue for its red, black ink and scanner
   borders everything about equally. Such regions, if long (strokes, borders) rather than round
   (dark nuclei), are removed with their soft edges (same OD direction as the nearest ink).
4. Shape, in microns when ``mpp`` is known: a closing joins loose stroma, holes below
   ``max_hole_um2`` are filled (lumina, fat cells), regions below ``min_object_um2`` dropped (dust).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from pathology.slide import SlideReader

__all__ = [
    "TissueMask",
    "compute_tissue_mask",
    "mask_downsample",
    "overlay",
    "read_thumbnail",
    "tissue_mask_from_rgb",
]

# --- Tuning constants (immutable). OD is base-10; "OD norm" is the Euclidean norm of the per-channel
# --- OD vector, i.e. the amount of a single stain along its unit absorbance vector.

#: Glass candidates: pixels within this OD of the 99.5th brightness percentile (about 3.5% darker).
_GLASS_TOP_OD = 0.015
#: A pixel is a glass seed for the background surface while its OD norm is below this.
_GLASS_SEED_OD = 0.03
#: The fitted glass surface may be at most this much darker (OD) than the brightest glass.
_GLASS_MAX_DEV_OD = 0.08
#: Glass must look like glass: every channel brighter than OD 0.15 from white (I >= ~180) and
#: nearly grey (channel ODs within 0.05). Otherwise the image has no glass (a field inside tissue)
#: and white-balanced glass of this intensity is assumed.
_GLASS_MAX_OD_WHITE = 0.15
_GLASS_MAX_TINT_OD = 0.05
_DEFAULT_GLASS = 240.0
#: The glass surface is trusted where at least this fraction of the neighbourhood (a Gaussian of
#: 10% of the image size) is glass; deep inside tissue the brightest glass is used, so an
#: extrapolated surface can never make pale tissue look like glass.
_GLASS_SUPPORT = 0.1
#: Pure white is scanner padding when at least this fraction of its edge lies on straight
#: horizontal or vertical runs of this many pixels; otherwise it is saturated glass.
_PADDING_STRAIGHT = 0.8
_PADDING_RUN_PX = 8
#: Longest side of the grid on which the glass surface is fitted.
_GLASS_GRID = 256
#: Threshold = this many robust standard deviations of the glass OD norm ...
_NOISE_K = 5.0
#: ... capped here, so noisy glass cannot push pale tissue (OD ~0.05) under the threshold.
_MAX_THRESHOLD_OD = 0.04
#: Ink colour is judged only where it is reliable (OD norm at least this).
_INK_MIN_OD = 0.15
#: Blue ink has the hue of a blue haematoxylin counterstain (Mayer's, IHC); only its darkness at
#: thumbnail scale tells them apart: counterstain stays below ~0.5 at 4-8 um/px.
_BLUE_INK_OD = 0.45
#: A pixel near ink whose OD direction is within ~20 degrees of the nearest ink pixel's is ink too.
_INK_FRINGE_COS = math.cos(math.radians(20.0))
#: Near-black: every channel at OD >= this (<= 45% transmission) and grey (min >= ratio * max).
_BLACK_OD = 0.35
_BLACK_GREY_RATIO = 0.7
#: Ink regions smaller than this are not ink but dark stain (DAB-saturated nuclei look black and
#: grey; a pen stroke is hundreds of microns long). Without mpp: this fraction of the image.
_MIN_INK_UM2 = 5_000.0
_MIN_INK_FRAC = 2e-4
#: Without mpp, size limits are fractions of the image area.
_MIN_OBJECT_FRAC = 1e-4
_MAX_HOLE_FRAC = 5e-4

# ----------------------------------------------------------------------------------------------
# Result type


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask over a whole slide, with its scale.

    Parameters
    ----------
    mask : ndarray (h, w) bool
        True where there is tissue. Stored read-only.
    downsample_xy : (float, float)
        Level-0 pixels per mask pixel in x and y (``level0_width / w``, ``level0_height / h``).
    l0_dimensions : (int, int)
        Level-0 (width, height) of the slide.
    mpp : float or None
        Microns per level-0 pixel, when known.
    """

    mask: NDArray[np.bool_]
    downsample_xy: tuple[float, float]
    l0_dimensions: tuple[int, int]
    mpp: float | None = None
    # (h + 1, w + 1) float64 summed-area table, for box_fraction.
    _integral: NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.array(self.mask, dtype=bool, copy=True)
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D bool array; got shape {m.shape}")
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        dsx, dsy = (float(d) for d in self.downsample_xy)
        if not (dsx > 0 and dsy > 0 and math.isfinite(dsx) and math.isfinite(dsy)):
            raise ValueError(
                f"downsample_xy must be two positive numbers; got {self.downsample_xy!r}"
            )
        object.__setattr__(self, "downsample_xy", (dsx, dsy))
        object.__setattr__(
            self, "l0_dimensions", (int(self.l0_dimensions[0]), int(self.l0_dimensions[1]))
        )
        integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.float64)
        np.cumsum(np.cumsum(m, axis=0, dtype=np.float64), axis=1, out=integral[1:, 1:])
        integral.setflags(write=False)
        object.__setattr__(self, "_integral", integral)

    @property
    def shape(self) -> tuple[int, int]:
        """Mask (h, w) in pixels."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def mask_mpp(self) -> float | None:
        """Microns per mask pixel (mean of x and y), when the slide's mpp is known."""
        if self.mpp is None:
            return None
        return self.mpp * 0.5 * (self.downsample_xy[0] + self.downsample_xy[1])

    def fraction(self) -> float:
        """Fraction of the slide area that is tissue, 0-1."""
        return float(self.mask.mean())

    def box_fraction(self, l0_xy: tuple[float, float], l0_size: tuple[float, float]) -> float:
        """Tissue fraction (0-1) inside one level-0 box; see :meth:`box_fractions`."""
        return float(self.box_fractions(np.asarray([l0_xy], dtype=np.float64), l0_size)[0])

    def box_fractions(self, l0_xy: ArrayLike, l0_size: ArrayLike) -> NDArray[np.float64]:
        """Tissue fraction inside many level-0 boxes at once (the tiling stage's per-tile test).

        Exact area weighting: the summed-area table of a piecewise-constant mask is bilinear inside
        each cell, so boxes whose edges fall between mask pixels are weighted by the covered area.
        Parts of a box outside the slide count as glass.

        Parameters
        ----------
        l0_xy : array (N, 2) or (2,)
            Top-left (x, y) of each box in level-0 pixels.
        l0_size : array (2,) or (N, 2)
            Box (w, h) in level-0 pixels, one for all boxes or one per box.

        Returns
        -------
        ndarray (N,) float64
            Tissue fraction of each box, 0-1 (0 for empty boxes).
        """
        xy = np.atleast_2d(np.asarray(l0_xy, dtype=np.float64))
        size = np.broadcast_to(np.asarray(l0_size, dtype=np.float64), xy.shape)
        dsx, dsy = self.downsample_xy
        h, w = self.shape
        x0, y0 = xy[:, 0] / dsx, xy[:, 1] / dsy
        x1, y1 = (xy[:, 0] + size[:, 0]) / dsx, (xy[:, 1] + size[:, 1]) / dsy
        area = (x1 - x0) * (y1 - y0)
        x0c, x1c = np.clip(x0, 0, w), np.clip(x1, 0, w)
        y0c, y1c = np.clip(y0, 0, h), np.clip(y1, 0, h)
        inside = (
            self._area_sum(x1c, y1c)
            - self._area_sum(x0c, y1c)
            - self._area_sum(x1c, y0c)
            + self._area_sum(x0c, y0c)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(area > 0, inside / area, 0.0)
        return np.clip(frac, 0.0, 1.0)

    def _area_sum(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
        """Tissue area in [0, x) x [0, y) (mask pixels, fractional), by bilinear lookup."""
        ii = self._integral
        h, w = self.shape
        i = np.minimum(np.floor(x).astype(np.intp), w - 1)
        j = np.minimum(np.floor(y).astype(np.intp), h - 1)
        a, b = x - i, y - j
        return (
            ii[j, i] * (1 - a) * (1 - b)
            + ii[j, i + 1] * a * (1 - b)
            + ii[j + 1, i] * (1 - a) * b
            + ii[j + 1, i + 1] * a * b
        )

    def to_png(self, path: str | os.PathLike[str]) -> None:
        """Write the mask as an 8-bit PNG (255 = tissue) with its scale in PNG text chunks."""
        from PIL import Image, PngImagePlugin

        meta = PngImagePlugin.PngInfo()
        meta.add_text(
            "pathology.downsample_xy", f"{self.downsample_xy[0]!r},{self.downsample_xy[1]!r}"
        )
        meta.add_text("pathology.l0_dimensions", f"{self.l0_dimensions[0]},{self.l0_dimensions[1]}")
        if self.mpp is not None:
            meta.add_text("pathology.mpp", repr(self.mpp))
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(os.fspath(path), pnginfo=meta)

    @classmethod
    def from_png(cls, path: str | os.PathLike[str]) -> TissueMask:
        """Read a mask written by :meth:`to_png`."""
        from PIL import Image

        with Image.open(os.fspath(path)) as im:
            text = dict(getattr(im, "text", {}))
            arr = np.asarray(im.convert("L")) >= 128
        try:
            dsx, dsy = (float(v) for v in text["pathology.downsample_xy"].split(","))
            w0, h0 = (int(v) for v in text["pathology.l0_dimensions"].split(","))
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{path}: not a tissue mask written by TissueMask.to_png (no scale)"
            ) from exc
        mpp = float(text["pathology.mpp"]) if "pathology.mpp" in text else None
        return cls(arr, (dsx, dsy), (w0, h0), mpp)


# ----------------------------------------------------------------------------------------------
# Algorithm on one RGB image


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


# ----------------------------------------------------------------------------------------------
# Steps


def _glass_background(
    rgbf: NDArray[np.float32], valid: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], float]:
    """Glass intensity per pixel and channel, and the glass noise as an OD-norm standard deviation.

    The surface is fitted on a grid of at most ``_GLASS_GRID`` px (block means): glass varies
    slowly, and the block means of tissue include its nuclei, which keeps tissue out of the seeds.

    Parameters
    ----------
    rgbf : ndarray (h, w, 3) float32
        Smoothed intensities, 0-255.
    valid : ndarray (h, w) bool
        Pixels that are not scanner padding (pure white).

    Returns
    -------
    glass : ndarray (h, w, 3) float32
        Estimated unobstructed-light intensity, 0-255.
    noise_od : float
        Robust standard deviation of the glass OD (norm over channels).
    """
    from scipy import ndimage as ndi

    h, w = rgbf.shape[:2]
    # Percentiles on a regular subsample: a few hundred thousand pixels pin them down.
    step = max(1, int(math.sqrt(h * w / 400_000)))
    rgb_s = rgbf[::step, ::step]
    lum_s = rgb_s.mean(axis=-1)
    valid_s = valid[::step, ::step]
    usable = valid if valid_s.sum() >= 16 else np.ones_like(valid)
    usable_s = usable[::step, ::step]
    bright = usable_s & (lum_s >= np.percentile(lum_s[usable_s], 99.5) * 10.0**-_GLASS_TOP_OD)
    if not valid_s.all() and not _is_padding(~valid):
        # Pure white that is not scanner padding (rectangles along the tile grid) is glass
        # saturated to 255: estimate the glass from it too.
        usable = np.ones_like(valid)
        usable_s = usable[::step, ::step]
        bright = lum_s >= np.percentile(lum_s, 99.5) * 10.0**-_GLASS_TOP_OD
    i0 = np.median(rgb_s[bright], axis=0)

    od_white = np.log10(256.0 / (i0 + 1.0))
    if od_white.max() > _GLASS_MAX_OD_WHITE or np.ptp(od_white) > _GLASS_MAX_TINT_OD:
        # The brightest pixels are stained: no glass in view. Everything darker than white-balanced
        # glass is then measured as stain, which is what a field full of tissue needs.
        i0 = np.maximum(i0, _DEFAULT_GLASS)
        return np.broadcast_to(i0.astype(np.float32), rgbf.shape).copy(), 0.0

    log_i0 = np.log10(i0 + 1.0).astype(np.float32)
    lo_limit, hi_limit = log_i0 - _GLASS_MAX_DEV_OD, np.minimum(log_i0 + 0.01, np.log10(256.0))
    lo, hi = lo_limit, hi_limit

    # Coarse grid: means of the usable pixels of k x k blocks.
    k = max(1, math.ceil(max(h, w) / _GLASS_GRID))
    hb, wb = -(-h // k), -(-w // k)
    count = _block_sum(usable.astype(np.float32), k)
    mean_c = _block_sum(rgbf * usable[..., None], k) / np.maximum(count, 1e-6)[..., None]
    log_c = np.log10(mean_c + 1.0)
    usable_c = count > 0
    # Normalised coordinates of the block centres, in the frame of the full image.
    xc = _norm_coord((np.arange(wb) + 0.5) * k - 0.5, w)
    yc = _norm_coord((np.arange(hb) + 0.5) * k - 0.5, h)

    # Unevenly lit or tinted glass: fit a quadratic surface of log-intensity to glass seeds, then
    # re-pick seeds against it, reaching a little further each round (so the fit follows a
    # gradient across the slide but cannot jump into tissue far from any glass). Illumination falls
    # off smoothly, so 6 terms are enough. Seeds have no stain anywhere near them: the pale gaps
    # between nuclei are as bright as glass, but never far from a nucleus.
    def seeds_against(log_glass_c: NDArray[np.float32]) -> NDArray[np.bool_]:
        od = np.maximum(log_glass_c - log_c, 0.0)
        near_max = ndi.maximum_filter(np.sqrt((od * od).sum(axis=-1)), size=5)
        return usable_c & (near_max < _GLASS_SEED_OD)

    reach_px = 0.1 * max(hb, wb)
    seeds = seeds_against(np.broadcast_to(log_i0, (hb, wb, 3)).astype(np.float32))
    coef: NDArray[np.float32] | None = None
    for _ in range(8):
        if seeds.sum() < 16 or seeds.sum() < 0.005 * hb * wb:
            break
        rows, cols = np.nonzero(seeds)
        basis = _quadratic_basis(xc[cols], yc[rows])
        target = log_c[rows, cols].astype(np.float64)
        coef = np.linalg.lstsq(basis, target, rcond=None)[0].astype(np.float32)
        # Never darker or brighter than glass actually seen: no extrapolation runs away into tissue.
        lo, hi = _seen_range(log_c[rows, cols], lo_limit, hi_limit)
        surface_c = np.clip(_quadratic_surface(coef, xc, yc), lo, hi)
        grown = _grow_seeds(seeds_against(surface_c), seeds, reach_px)
        if np.array_equal(grown, seeds):
            break
        seeds = grown
    # The surface is trusted where glass was seen nearby; deep inside tissue, the brightest glass.
    density = ndi.gaussian_filter(seeds.astype(np.float32), sigma=reach_px, mode="nearest")
    support_c = np.clip(density / _GLASS_SUPPORT, 0.0, 1.0)

    if coef is None:
        log_glass = np.broadcast_to(log_i0, rgbf.shape).astype(np.float32)
    else:
        support = _upsample_bilinear(support_c, k, (h, w))[..., None]
        surface = _quadratic_surface(
            coef, _norm_coord(np.arange(w), w), _norm_coord(np.arange(h), h)
        )
        log_glass = np.clip(support * surface + (1 - support) * log_i0, lo, hi).astype(np.float32)

    # Glass noise: robust spread of the (unclipped) OD at full resolution inside seed blocks.
    seed_px = seeds[np.arange(0, h, step)[:, None] // k, np.arange(0, w, step)[None, :] // k]
    seed_px &= usable_s
    od_seed = log_glass[::step, ::step][seed_px] - np.log10(rgb_s[seed_px] + 1.0)
    glass = (10.0**log_glass - 1.0).astype(np.float32)
    if len(od_seed) < 16:
        return glass, 0.0
    med = np.median(od_seed, axis=0)
    sigma = 1.4826 * np.median(np.abs(od_seed - med), axis=0)
    return glass, float(np.sqrt((sigma**2).sum()))


def _seen_range(
    log_seen: NDArray[np.float32], lo_limit: NDArray[np.float32], hi_limit: NDArray[np.float32]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-channel range of the glass log-intensities seen (1st-99th percentile, +-0.01 OD)."""
    lo = np.maximum(np.percentile(log_seen, 1, axis=0) - 0.01, lo_limit)
    hi = np.minimum(np.percentile(log_seen, 99, axis=0) + 0.01, hi_limit)
    return lo.astype(np.float32), np.maximum(hi, lo).astype(np.float32)


def _grow_seeds(
    candidates: NDArray[np.bool_], seeds: NDArray[np.bool_], reach_px: float
) -> NDArray[np.bool_]:
    """Candidate glass regions that touch the seeds, or are large and within ``reach_px`` of them.

    Small pale pockets inside tissue agree with the glass surface too; glass beyond a pen stroke is
    a large region.
    """
    from scipy import ndimage as ndi

    labels, n = ndi.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    touching = np.zeros(n + 1, dtype=bool)
    touching[labels[seeds]] = True
    near = np.zeros(n + 1, dtype=bool)
    near[labels[_dilate(seeds, reach_px)]] = True
    keep = touching | (near & (sizes >= 0.005 * candidates.size))
    keep[0] = False
    return keep[labels]


def _is_padding(white: NDArray[np.bool_]) -> bool:
    """Whether pure-white pixels look like scanner padding: regions with straight, axis-parallel edges.

    OpenSlide fills unscanned tiles with white; their edges follow the tile grid. Glass saturated
    to 255 instead meets tissue along curved edges.
    """
    from scipy import ndimage as ndi

    edge = white & ~ndi.binary_erosion(white, border_value=1)
    if not edge.any():
        return False
    run = _PADDING_RUN_PX
    straight = np.zeros_like(edge)
    for axis in (0, 1):
        full = ndi.minimum_filter1d(edge.view(np.uint8), run, axis=axis, mode="constant")
        straight |= ndi.maximum_filter1d(full, run, axis=axis).astype(bool)
    return float(straight[edge].mean()) >= _PADDING_STRAIGHT


def _block_sum(a: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """Sums over k x k blocks of the first two axes (zero-padded at the far edges)."""
    if k == 1:
        return a.astype(np.float32)
    h, w = a.shape[:2]
    hb, wb = -(-h // k), -(-w // k)
    pad = [(0, hb * k - h), (0, wb * k - w)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad)
    return p.reshape(hb, k, wb, k, *a.shape[2:]).sum(axis=(1, 3), dtype=np.float32)


def _norm_coord(pos: ArrayLike, n: int) -> NDArray[np.float32]:
    """Pixel positions 0..n-1 mapped to -1..1, where the surface fit is well conditioned."""
    return (2.0 * np.asarray(pos, dtype=np.float32) / max(n - 1, 1) - 1.0).astype(np.float32)


def _quadratic_basis(x: NDArray[np.float32], y: NDArray[np.float32]) -> NDArray[np.float64]:
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1).astype(np.float64)


def _quadratic_surface(
    coef: NDArray[np.float32], x: NDArray[np.float32], y: NDArray[np.float32]
) -> NDArray[np.float32]:
    """(len(y), len(x), 3) surface from (6, 3) coefficients over the grid of x and y."""
    xx, yy = x[None, :, None], y[:, None, None]
    c = coef[:, None, None, :]
    out = c[0] + c[1] * xx + c[2] * yy + c[3] * xx * xx + c[4] * xx * yy + c[5] * yy * yy
    return out.astype(np.float32)


def _upsample_bilinear(
    small: NDArray[np.float32], k: int, shape: tuple[int, int]
) -> NDArray[np.float32]:
    """Bilinear upsampling of a block grid (block centres at ``(i + 0.5) k - 0.5``) to ``shape``."""

    def weights(n_out: int, n_in: int) -> NDArray[np.float32]:
        pos = np.clip((np.arange(n_out) + 0.5) / k - 0.5, 0, n_in - 1)
        i = np.minimum(np.floor(pos).astype(np.intp), max(n_in - 2, 0))
        frac = (pos - i).astype(np.float32)
        m = np.zeros((n_out, n_in), dtype=np.float32)
        m[np.arange(n_out), i] = 1 - frac
        if n_in > 1:
            m[np.arange(n_out), i + 1] += frac
        return m

    return (weights(shape[0], small.shape[0]) @ small @ weights(shape[1], small.shape[1]).T).astype(
        np.float32
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


# ----------------------------------------------------------------------------------------------
# Slides


def read_thumbnail(
    reader: SlideReader, downsample: float
) -> tuple[NDArray[np.uint8], tuple[float, float]]:
    """The whole slide averaged down by about ``downsample``, read in chunks (bounded memory).

    Reads the coarsest pyramid level not coarser than asked and averages blocks of ``k x k`` level
    pixels (an exact area mean, so no aliasing of small dark specks into large ones).

    Parameters
    ----------
    reader : SlideReader
        An open slide.
    downsample : float
        Wanted level-0 pixels per thumbnail pixel (>= 1).

    Returns
    -------
    rgb : ndarray (h, w, 3) uint8
        The thumbnail.
    downsample_xy : (float, float)
        Actual level-0 pixels per thumbnail pixel in x and y (close to ``downsample``).
    """
    w0, h0 = reader.level_dimensions[0]
    ds = max(1.0, float(downsample))
    level = reader.get_best_level_for_downsample(ds)
    lw, lh = reader.level_dimensions[level]
    level_ds = float(reader.level_downsamples[level])
    k = max(1, round(ds / level_ds))
    out_w, out_h = -(-lw // k), -(-lh // k)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    chunk = k * max(1, 2048 // k)  # level pixels per read, a multiple of k
    for y in range(0, lh, chunk):
        for x in range(0, lw, chunk):
            cw, ch = min(chunk, lw - x), min(chunk, lh - y)
            region = reader.read_region((round(x * level_ds), round(y * level_ds)), level, (cw, ch))
            block = _block_mean(region, k)
            out[y // k : y // k + block.shape[0], x // k : x // k + block.shape[1]] = block
    return out, (w0 / out_w, h0 / out_h)


def _block_mean(img: NDArray[np.uint8], k: int) -> NDArray[np.uint8]:
    """Mean of k x k blocks; partial blocks at the right/bottom edge average their real pixels only."""
    if k == 1:
        return np.ascontiguousarray(img[..., :3])
    h, w = img.shape[:2]
    hb, wb = -(-h // k), -(-w // k)
    padded = np.zeros((hb * k, wb * k, 3), dtype=np.float64)
    padded[:h, :w] = img[..., :3]
    sums = padded.reshape(hb, k, wb, k, 3).sum(axis=(1, 3))
    rows = np.minimum(k, h - np.arange(hb) * k)
    cols = np.minimum(k, w - np.arange(wb) * k)
    counts = (rows[:, None] * cols[None, :])[..., None]
    return np.clip(np.rint(sums / counts), 0, 255).astype(np.uint8)


def mask_downsample(reader: SlideReader, *, mask_mpp: float = 8.0, max_size: int = 4096) -> float:
    """Level-0 pixels per mask pixel that :func:`compute_tissue_mask` asks for (>= 1).

    ``mask_mpp / slide mpp`` when the slide's mpp is known, raised so the longest side fits
    ``max_size``; without mpp, only the ``max_size`` fit.
    """
    if not (mask_mpp > 0 and math.isfinite(mask_mpp)):
        raise ValueError(
            f"mask_mpp must be a positive number of microns per pixel; got {mask_mpp!r}"
        )
    if max_size < 1:
        raise ValueError(f"max_size must be a positive number of pixels; got {max_size!r}")
    w0, h0 = reader.level_dimensions[0]
    ds = max(w0, h0) / max_size
    if reader.info.mpp is not None:
        ds = max(ds, mask_mpp / reader.info.mpp)
    return max(ds, 1.0)


def compute_tissue_mask(
    reader: SlideReader,
    *,
    mask_mpp: float = 8.0,
    max_size: int = 4096,
    min_od: float = 0.02,
    reject_ink: bool = True,
    smooth_px: float = 0.5,
    close_um: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Tissue mask of a slide, computed on a thumbnail read through ``reader``.

    Parameters
    ----------
    reader : SlideReader
        An open slide (:func:`pathology.slide.open_slide`).
    mask_mpp : float
        Wanted microns per mask pixel when the slide's mpp is known (8 um/px: a 20 x 15 mm section
        gives a 2500 x 1900 mask). Never finer than level 0.
    max_size : int
        Longest side of the mask in pixels: the scale when the slide's mpp is unknown, and a cap
        otherwise (huge slides, tiny ``mask_mpp``).
    min_od, reject_ink, smooth_px, close_um, min_object_um2, max_hole_um2
        As in :func:`tissue_mask_from_rgb` (sizes in microns; ignored in favour of image-relative
        sizes when the slide has no mpp).

    Returns
    -------
    TissueMask
        Mask (h, w) bool with its level-0 scale.
    """
    w0, h0 = reader.level_dimensions[0]
    slide_mpp = reader.info.mpp
    ds = mask_downsample(reader, mask_mpp=mask_mpp, max_size=max_size)
    rgb, ds_xy = read_thumbnail(reader, ds)
    thumb_mpp = None if slide_mpp is None else slide_mpp * 0.5 * (ds_xy[0] + ds_xy[1])
    mask = tissue_mask_from_rgb(
        rgb,
        mpp=thumb_mpp,
        min_od=min_od,
        reject_ink=reject_ink,
        smooth_px=smooth_px,
        close_um=close_um,
        min_object_um2=min_object_um2,
        max_hole_um2=max_hole_um2,
    )
    return TissueMask(mask, ds_xy, (w0, h0), slide_mpp)


def overlay(
    rgb: NDArray[np.uint8], mask: NDArray[np.bool_], *, alpha: float = 0.35
) -> NDArray[np.uint8]:
    """Thumbnail with non-tissue tinted blue and the tissue outline drawn in green, for review.

    Parameters
    ----------
    rgb : ndarray (h, w, 3) uint8
        Thumbnail.
    mask : ndarray (h, w) bool
        Tissue mask of the same size.
    alpha : float
        Strength of the tint over non-tissue, 0-1.

    Returns
    -------
    ndarray (h, w, 3) uint8
    """
    from scipy import ndimage as ndi

    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size")
    out = rgb.astype(np.float32)
    tint = np.array([40, 80, 200], dtype=np.float32)
    out[~mask] = (1 - alpha) * out[~mask] + alpha * tint
    edge = mask & ~ndi.binary_erosion(mask, border_value=1)
    out[edge] = (0, 200, 0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
