"""Coarse fields of a slide: tissue outline, tumour nests, stroma density and fibre direction.

All fields live on one grid of ``ds`` level-0 pixels per cell (``grid_um = ds * mpp``, ~4 um), the
same grid as the truth tissue mask. Random fields are sums of Gaussians on a lattice laid out in
microns, evaluated at the grid-cell centres with two dense matrix products (BLAS, fast even for a
40k x 40k slide), so a seed gives the same tissue in microns at 0.25, 0.5 and 1.0 um/px.

Grid plane: cell ``(gi, gj)`` covers level-0 pixels ``[gj*ds, (gj+1)*ds) x [gi*ds, (gi+1)*ds)``; its
centre is at ``((gj + 0.5) * ds, (gi + 0.5) * ds)`` level-0 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pathology.synth._params import SynthParams

__all__ = ["Fields", "build_fields", "grid_downsample", "interp_grid", "smooth_field"]

F32 = NDArray[np.float32]


def grid_downsample(mpp: float) -> int:
    """Level-0 pixels per grid cell: the power of two nearest to 4 um (16 at 0.25 um/px)."""
    return int(2 ** max(0, round(math.log2(4.0 / mpp))))


def _gauss_matrix(pos_um: NDArray[np.floating], scale_um: float) -> tuple[NDArray[np.float32], int]:
    sigma = scale_um / 2.0
    step = scale_um / 3.0
    lo = float(pos_um.min()) - 3 * sigma
    n = math.ceil((float(pos_um.max()) + 3 * sigma - lo) / step) + 1
    lat = lo + np.arange(n) * step
    w = np.exp(-0.5 * ((pos_um[:, None] - lat[None, :]) / sigma) ** 2).astype(np.float32)
    return w, n


def smooth_field(
    rng: np.random.Generator,
    y_um: NDArray[np.floating],
    x_um: NDArray[np.floating],
    scale_um: float,
) -> F32:
    """Zero-mean, unit-variance smooth random field with feature size ~``scale_um``.

    Parameters
    ----------
    y_um, x_um : ndarray (gh,), (gw,) float
        Positions (microns) of the grid rows and columns.
    """
    wy, ny = _gauss_matrix(y_um, scale_um)
    wx, nx = _gauss_matrix(x_um, scale_um)
    z = rng.standard_normal((ny, nx)).astype(np.float32)
    f = (wy @ z) @ wx.T
    # Var(f_ij) = sum_k wy_ik^2 * sum_l wx_jl^2 for white z: divide it out for unit variance.
    norm = np.sqrt((wy**2).sum(1))[:, None] * np.sqrt((wx**2).sum(1))[None, :]
    return (f / norm).astype(np.float32)


def interp_grid(field: NDArray[np.floating], ds: int, y0: int, y1: int, x0: int, x1: int) -> F32:
    """Bilinear upsampling of a grid field to level-0 pixels ``[y0, y1) x [x0, x1)``.

    Returns
    -------
    ndarray (y1 - y0, x1 - x0) float32
        Separable: two gathers along rows, two along columns; edges clamp.
    """
    gh, gw = field.shape[:2]

    def axis(lo: int, hi: int, n: int) -> tuple[NDArray[np.intp], NDArray[np.intp], F32]:
        g = (np.arange(lo, hi, dtype=np.float64) + 0.5) / ds - 0.5
        f0 = np.floor(g)
        frac = (g - f0).astype(np.float32)
        i0 = np.clip(f0, 0, n - 1).astype(np.intp)
        i1 = np.clip(f0 + 1, 0, n - 1).astype(np.intp)
        return i0, i1, frac

    r0, r1, fy = axis(y0, y1, gh)
    c0, c1, fx = axis(x0, x1, gw)
    rows = field[r0] * (1 - fy)[:, None] + field[r1] * fy[:, None]
    rows = rows.astype(np.float32, copy=False)
    a = np.take(rows, c0, axis=1)
    b = np.take(rows, c1, axis=1)
    b -= a
    b *= fx
    a += b
    return a


@dataclass(frozen=True)
class Fields:
    """Grid fields of one slide (all (gh, gw) unless noted).

    Attributes
    ----------
    ds : int
        Level-0 pixels per grid cell; ``grid_um = ds * mpp``.
    tissue : bool
        Tissue at the cell centre (before artifacts).
    edge_um : float32
        First-order signed distance to the tissue outline, um (+ inside), clipped to +-30; sub-grid
        accurate, used for the anti-aliased tissue edge.
    inside_um : float32
        Distance into tissue (0 outside), um; used to keep cells off the edge.
    nest : bool
        Tumour nest.
    nest_dist_um : float32
        Distance to the nearest nest, um (0 inside).
    stroma_a, stroma_b : float32
        Haematoxylin OD of stroma carried by fibre textures A and B (density x blend weight).
    fibre_angle : (float, float)
        Long-axis angles (rad) of the two fibre textures.
    disp_y_um, disp_x_um : float32
        Smooth displacement applied to the tumour-cell lattice (curved rows), um.
    """

    ds: int
    grid_um: float
    tissue: NDArray[np.bool_]
    edge_um: F32
    inside_um: F32
    nest: NDArray[np.bool_]
    nest_dist_um: F32
    stroma_a: F32
    stroma_b: F32
    fibre_angle: tuple[float, float]
    disp_y_um: F32
    disp_x_um: F32
    nest_centre_um: tuple[float, float] | None

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.tissue.shape
        return h, w


def build_fields(
    params: SynthParams, rng: np.random.Generator, *, stroma_h: float, cell_area_um2: float
) -> Fields:
    """Tissue, nests and stroma fields for ``params``.

    Parameters
    ----------
    stroma_h : float
        Mean haematoxylin OD of stroma (the slide's look).
    cell_area_um2 : float
        Area per tumour cell, to size the single nest of ``tumor_cell_limit`` slides.
    """
    w_px, h_px = params.size
    ds = grid_downsample(params.mpp)
    gum = ds * params.mpp
    gh, gw = -(-h_px // ds), -(-w_px // ds)
    y_um = (np.arange(gh) + 0.5) * gum
    x_um = (np.arange(gw) + 0.5) * gum
    H_um, W_um = h_px * params.mpp, w_px * params.mpp
    span = min(H_um, W_um)

    # Tissue: multi-scale noise over a centred dome, so tissue rarely touches the slide edge.
    big = min(600.0, 0.45 * span)
    f = smooth_field(rng, y_um, x_um, big) + 0.5 * smooth_field(rng, y_um, x_um, big / 3)
    f += 0.22 * smooth_field(rng, y_um, x_um, max(big / 10, 12.0))
    yy = ((y_um - H_um / 2) / (H_um / 2))[:, None]
    xx = ((x_um - W_um / 2) / (W_um / 2))[None, :]
    f -= 1.6 * (yy**2 + xx**2) ** 1.5
    thr = float(np.quantile(f, 1.0 - params.tissue_fraction))
    tissue = f > thr
    gy, gx = np.gradient(f, gum)
    grad = np.maximum(np.hypot(gy, gx), 1e-6)
    edge = np.clip((f - thr) / grad, -30, 30).astype(np.float32)
    inside = (ndi.distance_transform_edt(tissue) * gum).astype(np.float32)

    # Tumour nests: islands of ~50-150 um inside the tissue, covering tumor_fraction of it.
    nf = smooth_field(rng, y_um, x_um, min(160.0, 0.4 * span)) + 0.45 * smooth_field(
        rng, y_um, x_um, 45.0
    )
    deep = inside >= 12.0
    nest_centre = None
    if params.tumor_fraction <= 0 or not deep.any() or params.tumor_cell_limit == 0:
        nest = np.zeros_like(tissue)
    elif params.tumor_cell_limit is not None:
        # One compact nest sized for the requested number of cells.
        cand = np.flatnonzero(inside >= 30.0)
        if cand.size == 0:
            cand = np.flatnonzero(deep)
        c = int(cand[rng.integers(cand.size)])
        cy, cx = y_um[c // gw], x_um[c % gw]
        r = math.sqrt(params.tumor_cell_limit * cell_area_um2 / math.pi)
        nest = (((y_um[:, None] - cy) ** 2 + (x_um[None, :] - cx) ** 2) <= r * r) & deep
        nest_centre = (float(cy), float(cx))
    else:
        nthr = float(
            np.quantile(nf[deep], 1.0 - min(1.0, params.tumor_fraction * tissue.sum() / deep.sum()))
        )
        nest = (nf > nthr) & deep
    nest_dist = (
        (ndi.distance_transform_edt(~nest) * gum).astype(np.float32)
        if nest.any()
        else np.full(tissue.shape, 1e6, np.float32)
    )

    # Stroma: two fibre directions blended by a smooth weight, density varying over ~100 um.
    a1 = float(rng.uniform(0, math.pi))
    a2 = a1 + float(rng.uniform(0.5, 1.2)) * (1 if rng.random() < 0.5 else -1)
    wgt = 1 / (1 + np.exp(-2.5 * smooth_field(rng, y_um, x_um, min(200.0, 0.5 * span))))
    dens = 0.7 + 0.6 / (1 + np.exp(-2.0 * smooth_field(rng, y_um, x_um, 90.0)))
    base = (stroma_h * dens).astype(np.float32)
    disp_y = 6.0 * smooth_field(rng, y_um, x_um, 120.0)
    disp_x = 6.0 * smooth_field(rng, y_um, x_um, 120.0)
    return Fields(
        ds=ds,
        grid_um=gum,
        tissue=tissue,
        edge_um=edge,
        inside_um=inside,
        nest=nest,
        nest_dist_um=nest_dist,
        stroma_a=(base * wgt).astype(np.float32),
        stroma_b=(base * (1 - wgt)).astype(np.float32),
        fibre_angle=(a1, a2 % math.pi),
        disp_y_um=disp_y,
        disp_x_um=disp_x,
        nest_centre_um=nest_centre,
    )
