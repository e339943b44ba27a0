"""Nucleus and cell-body sprites, drawn once per slide in microns and rasterised at its mpp.

A sprite is a small array centred on the pixel that holds the cell centre: a nucleus mask, a
relative haematoxylin map (chromatin texture, nuclear rim, nucleoli) and, for cells whose body is
not a disc (fibroblast spindles), a "power" map in um^2 that is negative inside the body. Round
bodies use one shared squared-distance table instead, so a tumour cell costs a slice and a subtract.

Shape parameters come from their own random stream before any pixel noise is drawn, so the same
seed gives the same shapes in microns at every mpp (the nucleus areas in the truth are analytic,
not pixel counts, and are identical at 0.25 and 0.5 um/px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = ["CELL_TYPES", "FIBROBLAST", "LYMPHOCYTE", "MACROPHAGE", "TUMOR", "Sprite", "SpriteBank"]

TUMOR, LYMPHOCYTE, MACROPHAGE, FIBROBLAST = 0, 1, 2, 3
CELL_TYPES = ("tumor", "lymphocyte", "macrophage", "fibroblast")

#: Sprites per type. Fibroblasts: shapes x orientation bins (spindles follow the stroma fibres).
N_TUMOR, N_LYMPH, N_MACRO = 96, 48, 48
N_FIBRO_SHAPES, N_FIBRO_ANGLES = 6, 16


@dataclass(frozen=True)
class Sprite:
    """One rasterised nucleus (and optional non-round body).

    Attributes
    ----------
    mask : ndarray (h, w) bool
        Nucleus pixels; the centre pixel is ``(h // 2, w // 2)``.
    h_rel : ndarray (h, w) float32
        Haematoxylin relative to the cell type's base OD (0 outside the nucleus).
    body : ndarray (hb, wb) float32 or None
        Power value in um^2, negative inside the body (``None`` for disc bodies).
    area_um2 : float
        Analytic nucleus area in um^2 (independent of mpp).
    radius_um : float
        Largest distance of the nucleus outline from the centre, um.
    angle : float
        Orientation of the long axis, radians in [0, pi).
    """

    mask: NDArray[np.bool_]
    h_rel: NDArray[np.float32]
    body: NDArray[np.float32] | None
    area_um2: float
    radius_um: float
    angle: float


def _grid(mpp: float, extent_um: float) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(dy, dx) in um of a square sprite grid centred on its middle pixel."""
    r = math.ceil(extent_um / mpp) + 1
    ax = (np.arange(-r, r + 1, dtype=np.float32)) * np.float32(mpp)
    return ax[:, None] + np.zeros((1, ax.size), np.float32), ax[None, :] + np.zeros(
        (ax.size, 1), np.float32
    )


def _rotate(
    dy: NDArray[np.float32], dx: NDArray[np.float32], angle: float
) -> tuple[NDArray, NDArray]:
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return u, v


def _texture(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float
) -> NDArray[np.float32]:
    """Zero-mean, unit-sd smooth noise (chromatin granularity)."""
    t = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(sigma_px, 0.5))
    sd = float(t.std()) or 1.0
    return ((t - t.mean()) / sd).astype(np.float32)


def _outline_area(a: float, b: float, harm: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Area (um^2) and max radius of an ellipse (semi-axes a, b) whose normalised radius is
    modulated by ``1 + sum(eps * cos(m * phi + psi))``."""
    phi = np.linspace(0.0, 2 * math.pi, 2048, endpoint=False)
    r_ell = 1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2)
    mod = 1.0 + sum(eps * np.cos(m * phi + psi) for m, eps, psi in harm)
    r = r_ell * mod
    return float(0.5 * np.mean(r**2) * 2 * math.pi), float(r.max())


def _harmonics(rng: np.random.Generator, amp: float) -> list[tuple[int, float, float]]:
    return [
        (m, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * math.pi))) for m in (2, 3, 4, 5)
    ]


def _round_nucleus(
    mpp: float,
    shape_rng: np.random.Generator,
    pix_rng: np.random.Generator,
    *,
    diameter: tuple[float, float],
    aspect: tuple[float, float],
    harm_amp: float,
    texture: float,
    grain_um: float,
    rim: float,
    nucleoli: tuple[float, float, float],
    kidney: float = 0.0,
) -> Sprite:
    """Elliptic nucleus with a wobbly outline, chromatin texture, a darker rim and nucleoli."""
    d = shape_rng.uniform(*diameter)
    asp = shape_rng.uniform(*aspect)
    r = d / 2
    a, b = r * math.sqrt(asp), r / math.sqrt(asp)
    angle = float(shape_rng.uniform(0, math.pi))
    harm = _harmonics(shape_rng, harm_amp)
    n_nuc = int(shape_rng.choice(3, p=list(nucleoli)))
    nuc_pos = [
        (
            shape_rng.uniform(0, 0.45),
            shape_rng.uniform(0, 2 * math.pi),
            shape_rng.uniform(0.45, 0.8),
        )
        for _ in range(n_nuc)
    ]
    notch = bool(shape_rng.random() < kidney)
    area, rmax = _outline_area(a, b, harm)
    cut_r = 0.55 * a

    def inside(u: NDArray, v: NDArray) -> tuple[NDArray, NDArray, NDArray]:
        phi = np.arctan2(v, u)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        lim = 1.0 + sum(eps * np.cos(m * phi + psi) for m, eps, psi in harm)
        m = rho <= lim
        if notch:
            # Kidney-shaped macrophage nucleus: a disc bitten out of one long side.
            m &= (u**2 + (v - (b + 0.45 * cut_r)) ** 2) > cut_r**2
        return m, rho, lim

    if notch:
        # The bite has no closed-form area; measure it on a fine grid in um (mpp-independent).
        fy, fx = _grid(0.05, rmax * 1.05)
        fm, _, _ = inside(*_rotate(fy, fx, angle))
        area = float(fm.sum()) * 0.05 * 0.05

    dy, dx = _grid(mpp, rmax * 1.05)
    u, v = _rotate(dy, dx, angle)
    mask, rho, lim = inside(u, v)
    # Distance to the outline in um (radial approximation) for the chromatin rim.
    edge_um = np.clip((lim - rho) * min(a, b), 0, None)
    h = 1.0 + texture * _texture(pix_rng, mask.shape, grain_um / mpp)
    h += rim * np.exp(-edge_um / 0.6)
    for pr, pa, prad in nuc_pos:
        cy, cx = pr * b * math.sin(pa), pr * a * math.cos(pa)
        d2 = (u - cx) ** 2 + (v - cy) ** 2
        h += 1.6 * np.exp(-d2 / (2 * (prad / 2) ** 2))
    h = np.where(mask, np.clip(h, 0.25, None), 0.0).astype(np.float32)
    return Sprite(mask, h, None, area, rmax, angle % math.pi)


def _spindle(
    mpp: float, shape_rng: np.random.Generator, pix_rng: np.random.Generator, angle: float
) -> Sprite:
    """Fibroblast: a curved, pointed spindle nucleus inside a longer, thin spindle body."""
    a = shape_rng.uniform(5.5, 9.0)  # half-length, um
    b = shape_rng.uniform(1.1, 1.7)  # half-width, um
    bend = shape_rng.uniform(-0.25, 0.25) * a
    ab = a * shape_rng.uniform(1.6, 2.2)
    bb = b + shape_rng.uniform(1.0, 1.6)
    # Area of |v| <= b (1 - t^2)^0.6 over t in [-1, 1]: 2 a b * integral((1 - t^2)^0.6).
    t = np.linspace(-1, 1, 4001)
    prof = (1 - t**2) ** 0.6
    area = float(2 * a * b * np.sum((prof[1:] + prof[:-1]) / 2 * np.diff(t)))  # trapezoid rule

    dy, dx = _grid(mpp, a * 1.05 + abs(bend))
    u, v = _rotate(dy, dx, angle)
    tn = np.clip(u / a, -1, 1)
    half = b * np.clip(1 - (u / a) ** 2, 0, None) ** 0.6
    mask = np.abs(v - bend * tn**2) <= half
    mask &= np.abs(u) <= a
    h = 1.0 + 0.12 * _texture(pix_rng, mask.shape, 0.3 / mpp)
    h = np.where(mask, h, 0.0).astype(np.float32)

    by, bx = _grid(mpp, ab + abs(bend) + 1)
    ub, vb = _rotate(by, bx, angle)
    tb = np.clip(ub / ab, -1, 1)
    body = (bb * bb) * ((ub / ab) ** 2 + ((vb - bend * tb**2) / bb) ** 2 - 1.0)
    return Sprite(
        mask, h, body.astype(np.float32), area, float(math.hypot(a, b + abs(bend))), angle
    )


class SpriteBank:
    """All sprites of one slide, rasterised at ``mpp``.

    Parameters
    ----------
    mpp : float
        Microns per level-0 pixel.
    seed_shape, seed_pixels : np.random.SeedSequence
        Streams for shape parameters (mpp-independent) and pixel noise.
    tumor_aspect_max : float
        Largest long / short axis ratio of a tumour nucleus (drawn uniformly from 1 to this).
    """

    def __init__(
        self,
        mpp: float,
        seed_shape: np.random.SeedSequence,
        seed_pixels: np.random.SeedSequence,
        tumor_aspect_max: float = 1.35,
    ) -> None:
        srng = np.random.default_rng(seed_shape)
        prng = np.random.default_rng(seed_pixels)
        self.mpp = mpp
        tumor = [
            _round_nucleus(
                mpp,
                srng,
                prng,
                diameter=(9.0, 14.0),
                aspect=(1.0, tumor_aspect_max),
                harm_amp=0.05,
                texture=0.28,
                grain_um=0.45,
                rim=0.55,
                nucleoli=(0.3, 0.5, 0.2),
            )
            for _ in range(N_TUMOR)
        ]
        lymph = [
            _round_nucleus(
                mpp,
                srng,
                prng,
                diameter=(6.2, 7.8),
                aspect=(1.0, 1.12),
                harm_amp=0.025,
                texture=0.14,
                grain_um=0.35,
                rim=0.12,
                nucleoli=(1.0, 0.0, 0.0),
            )
            for _ in range(N_LYMPH)
        ]
        macro = [
            _round_nucleus(
                mpp,
                srng,
                prng,
                diameter=(8.0, 10.5),
                aspect=(1.3, 1.8),
                harm_amp=0.04,
                texture=0.18,
                grain_um=0.4,
                rim=0.25,
                nucleoli=(0.7, 0.3, 0.0),
                kidney=0.5,
            )
            for _ in range(N_MACRO)
        ]
        fibro = []
        for k in range(N_FIBRO_ANGLES):
            ang = (k + 0.5) * math.pi / N_FIBRO_ANGLES
            fibro += [_spindle(mpp, srng, prng, ang) for _ in range(N_FIBRO_SHAPES)]
        # Sort tumour nuclei by size so layout can pick "the largest that fits" with one search.
        tumor.sort(key=lambda s: s.radius_um)
        self.sprites: tuple[tuple[Sprite, ...], ...] = (
            tuple(tumor),
            tuple(lymph),
            tuple(macro),
            tuple(fibro),
        )
        self.radius_um = tuple(np.array([s.radius_um for s in g], np.float64) for g in self.sprites)
        self.area_um2 = tuple(np.array([s.area_um2 for s in g], np.float64) for g in self.sprites)
        # Shared squared-distance table (um^2) for disc bodies; 14 um covers the largest macrophage.
        self.disc_r_px = math.ceil(14.0 / mpp) + 1
        ax = np.arange(-self.disc_r_px, self.disc_r_px + 1, dtype=np.float32) * np.float32(mpp)
        self.d2 = (ax[:, None] ** 2 + ax[None, :] ** 2).astype(np.float32)
        self._extent = self._max_extent()

    def fibro_index(
        self, angle: NDArray[np.floating], shape: NDArray[np.integer]
    ) -> NDArray[np.int64]:
        """Sprite index of fibroblasts with long-axis ``angle`` (rad) and shape variant ``shape``."""
        k = np.floor((np.mod(angle, math.pi) / math.pi) * N_FIBRO_ANGLES).astype(np.int64)
        k = np.clip(k, 0, N_FIBRO_ANGLES - 1)
        return k * N_FIBRO_SHAPES + np.mod(shape, N_FIBRO_SHAPES)

    def max_extent_px(self) -> int:
        """Half-size in pixels of the largest sprite or disc (band halo for cell selection)."""
        return self._extent

    def _max_extent(self) -> int:
        m = self.disc_r_px
        for group in self.sprites:
            for s in group:
                m = max(m, s.mask.shape[0] // 2)
                if s.body is not None:
                    m = max(m, s.body.shape[0] // 2)
        return m
