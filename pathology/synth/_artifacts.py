"""Slide artifacts: pen ink on the glass, dust specks and a black scanner border strip.

These are what tissue detectors trip over: green, blue and black marker ink circling or ticking
the tissue (absorbs strongly in one or two channels, unlike haematoxylin or DAB), near-opaque dust,
and the dark strip some scanners leave along an edge. All three are excluded from the truth tissue
mask, and cells whose centre lies under them are left out of the layout (a pipeline should not
count what the pathologist cannot see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pathology.synth._fields import Fields, interp_grid, smooth_field
from pathology.synth._params import SynthParams

__all__ = ["Artifacts", "build_artifacts"]

F32 = NDArray[np.float32]

# Absorbance of marker inks per RGB channel (unit vectors): green ink transmits green,
# blue ink transmits blue, black absorbs everything.
_INKS = {
    "green": (0.70, 0.20, 0.62),
    "blue": (0.76, 0.58, 0.12),
    "black": (0.58, 0.58, 0.57),
}
_DUST = (0.55, 0.58, 0.60)
_BORDER_OD = 2.1  # ~2 % transmission: near-black, with sensor noise on top


def _unit(v: tuple[float, float, float]) -> NDArray[np.float32]:
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


@dataclass(frozen=True)
class Speck:
    iy: int
    ix: int
    amount: F32  # (2r+1, 2r+1) OD along the dust vector
    radius_um: float


@dataclass(frozen=True)
class Artifacts:
    """Artifacts of one slide (empty when ``params.artifacts`` is false).

    Attributes
    ----------
    pen_od : ndarray (gh, gw, 3) float32 or None
        Ink optical density per RGB channel on the field grid.
    mask : ndarray (gh, gw) bool
        Grid cells covered by pen, dust or border (excluded from the tissue truth).
    specks : tuple of Speck
    border : (edge, width_px) or None
        ``edge`` in {"left", "right", "top", "bottom"}.
    """

    pen_od: F32 | None
    mask: NDArray[np.bool_]
    specks: tuple[Speck, ...]
    border: tuple[str, int] | None
    inks: tuple[str, ...]

    def extra_od(
        self, ds: int, size: tuple[int, int], y0: int, y1: int, x0: int, x1: int
    ) -> F32 | None:
        """Artifact OD (h, w, 3) float32 for level-0 rectangle ``[y0, y1) x [x0, x1)``, or None."""
        if self.pen_od is None and not self.specks and self.border is None:
            return None
        h, w = y1 - y0, x1 - x0
        out = np.zeros((h, w, 3), np.float32)
        if self.pen_od is not None:
            for c in range(3):
                out[..., c] = interp_grid(self.pen_od[..., c], ds, y0, y1, x0, x1)
        dust = np.zeros((h, w), np.float32)
        for s in self.specks:
            r = s.amount.shape[0] // 2
            ya, yb, xa, xb = s.iy - r - y0, s.iy + r + 1 - y0, s.ix - r - x0, s.ix + r + 1 - x0
            ca, cb, da, db = max(ya, 0), min(yb, h), max(xa, 0), min(xb, w)
            if ca < cb and da < db:
                dust[ca:cb, da:db] += s.amount[ca - ya : cb - ya, da - xa : db - xa]
        out += dust[..., None] * _unit(_DUST)
        if self.border is not None:
            edge, width = self.border
            W, H = size
            ys = np.arange(y0, y1)
            xs = np.arange(x0, x1)
            if edge == "left":
                band = (xs < width)[None, :] & np.ones((h, 1), bool)
            elif edge == "right":
                band = (xs >= W - width)[None, :] & np.ones((h, 1), bool)
            elif edge == "top":
                band = (ys < width)[:, None] & np.ones((1, w), bool)
            else:
                band = (ys >= H - width)[:, None] & np.ones((1, w), bool)
            out[band] += _BORDER_OD * _unit((1.0, 1.0, 1.0))
        return out


def _stroke(
    rng: np.random.Generator,
    centre: tuple[float, float],
    span: tuple[float, float],
) -> NDArray[np.float64]:
    """Points (k, 2) in um along one pen stroke: an arc around the tissue or a tick mark."""
    cy, cx = centre
    H, W = span
    if rng.random() < 0.6:
        ry, rx = rng.uniform(0.3, 0.5) * H, rng.uniform(0.3, 0.5) * W
        a0 = rng.uniform(0, 2 * math.pi)
        t = np.linspace(a0, a0 + rng.uniform(1.0, 3.5), 600)
        wob = 1 + 0.04 * np.sin(t * rng.uniform(2, 5) + rng.uniform(0, 6))
        return np.column_stack([cy + ry * wob * np.sin(t), cx + rx * wob * np.cos(t)])
    y0, x0 = rng.uniform(0.05, 0.95) * H, rng.uniform(0.05, 0.95) * W
    ang = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.1, 0.3) * min(H, W)
    t = np.linspace(0, 1, 300)
    bend = rng.uniform(-0.15, 0.15) * length * np.sin(math.pi * t)
    return np.column_stack(
        [
            y0 + t * length * math.sin(ang) + bend * math.cos(ang),
            x0 + t * length * math.cos(ang) - bend * math.sin(ang),
        ]
    )


def build_artifacts(params: SynthParams, f: Fields, rng: np.random.Generator) -> Artifacts:
    """Pen strokes, dust and border for ``params`` (nothing unless ``params.artifacts``)."""
    gh, gw = f.shape
    none = Artifacts(None, np.zeros((gh, gw), bool), (), None, ())
    if not params.artifacts:
        return none
    W, H = params.size
    mpp, gum = params.mpp, f.grid_um
    H_um, W_um = H * mpp, W * mpp
    ty, tx = np.nonzero(f.tissue)
    centre = ((ty.mean() + 0.5) * gum, (tx.mean() + 0.5) * gum) if ty.size else (H_um / 2, W_um / 2)

    # Pen: 1-3 strokes, each one ink colour, width proportional to the slide.
    pen = np.zeros((gh, gw, 3), np.float32)
    y_um = (np.arange(gh) + 0.5) * gum
    x_um = (np.arange(gw) + 0.5) * gum
    streak = 0.85 + 0.15 * smooth_field(rng, y_um, x_um, 60.0)
    inks = []
    for _ in range(int(rng.integers(1, 4))):
        ink = str(rng.choice(list(_INKS)))
        inks.append(ink)
        pts = _stroke(rng, centre, (H_um, W_um))
        hit = np.zeros((gh, gw), bool)
        gi = np.clip((pts[:, 0] / gum).astype(int), 0, gh - 1)
        gj = np.clip((pts[:, 1] / gum).astype(int), 0, gw - 1)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < H_um) & (pts[:, 1] >= 0) & (pts[:, 1] < W_um)
        if not inside.any():
            continue
        hit[gi[inside], gj[inside]] = True
        dist = ndi.distance_transform_edt(~hit) * gum
        half = float(np.clip(0.02 * min(H_um, W_um), 20.0, 250.0)) * rng.uniform(0.7, 1.3)
        cover = np.clip((half - dist) / (0.25 * half), 0, 1).astype(np.float32)
        amount = float(rng.uniform(0.7, 1.5))
        pen += (cover * amount * streak)[..., None] * _unit(_INKS[ink])
    pen_mask = pen.max(axis=2) > 0.1

    # Dust: a few near-opaque irregular specks, 2-25 um in radius.
    n_dust = min(200, 2 + int(rng.poisson(2.0 * H_um * W_um / 1e6)))
    specks = []
    dust_mask = np.zeros((gh, gw), bool)
    for _ in range(n_dust):
        r_um = float(math.exp(rng.uniform(math.log(2.0), math.log(25.0))))
        iy, ix = int(rng.integers(0, H)), int(rng.integers(0, W))
        rp = math.ceil(r_um * 1.3 / mpp) + 1
        ax = np.arange(-rp, rp + 1) * mpp
        yy, xx = ax[:, None], ax[None, :]
        phi = np.arctan2(yy, xx)
        rad = r_um * (
            1 + sum(rng.uniform(0, 0.15) * np.cos(m * phi + rng.uniform(0, 6)) for m in (2, 3, 5))
        )
        d = np.hypot(yy, xx)
        amt = np.clip((rad - d) / max(0.6, 0.15 * r_um), 0, 1) * rng.uniform(0.8, 2.0)
        specks.append(Speck(iy, ix, amt.astype(np.float32), r_um))
        gi0, gi1 = max(0, int((iy * mpp - r_um) / gum)), min(gh, int((iy * mpp + r_um) / gum) + 1)
        gj0, gj1 = max(0, int((ix * mpp - r_um) / gum)), min(gw, int((ix * mpp + r_um) / gum) + 1)
        cy = (np.arange(gi0, gi1) + 0.5) * gum - iy * mpp
        cx = (np.arange(gj0, gj1) + 0.5) * gum - ix * mpp
        dust_mask[gi0:gi1, gj0:gj1] |= (cy[:, None] ** 2 + cx[None, :] ** 2) <= r_um**2

    # Border: a dark strip 1-2.5 % of the slide wide along one edge.
    edge = str(rng.choice(["left", "right", "top", "bottom"]))
    dim = W if edge in ("left", "right") else H
    width = max(24, round(rng.uniform(0.01, 0.025) * dim))
    border_mask = np.zeros((gh, gw), bool)
    cy_px = (np.arange(gh) + 0.5) * f.ds
    cx_px = (np.arange(gw) + 0.5) * f.ds
    if edge == "left":
        border_mask[:, cx_px < width] = True
    elif edge == "right":
        border_mask[:, cx_px >= W - width] = True
    elif edge == "top":
        border_mask[cy_px < width, :] = True
    else:
        border_mask[cy_px >= H - width, :] = True
    return Artifacts(
        pen, pen_mask | dust_mask | border_mask, tuple(specks), (edge, width), tuple(inks)
    )
