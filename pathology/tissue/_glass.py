"""Glass (background) intensity: brightest-pixel estimate refined by a smooth surface."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    pass

from pathology.tissue._constants import (
    _DEFAULT_GLASS,
    _GLASS_GRID,
    _GLASS_MAX_DEV_OD,
    _GLASS_MAX_OD_WHITE,
    _GLASS_MAX_TINT_OD,
    _GLASS_SEED_OD,
    _GLASS_SUPPORT,
    _GLASS_TOP_OD,
    _PADDING_RUN_PX,
    _PADDING_STRAIGHT,
)
from pathology.tissue._morph import _dilate


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
