"""Layout of a synthetic slide: the look, the cells and their truth.

Frames: positions are drawn in microns (``*_um``) and snapped to level-0 pixel centres
(``ix, iy`` integer pixel, truth ``x = ix + 0.5``), so a cell is stamped at exactly the position
the truth records at every mpp.

Cells:

- tumour: a jittered, gently warped hexagonal lattice (spacing 17-20.5 um per slide) inside the
  nests; bodies are power-diagram cells restricted to a radius of ~0.68 x spacing, so packed cells
  are polygons sharing membranes and edge cells are rounded.
- lymphocytes: in stroma, denser within ~40 um of nests, a quarter of them in round aggregates,
  and ~12 % inside nests (intra-epithelial).
- macrophages: 15 % of the stromal immune cells.
- fibroblasts: spindles in stroma, aligned with the local collagen fibre direction.

Overlapping cells of lower priority are dropped (tumour > macrophage > lymphocyte > fibroblast).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from pathology.stain import DAB, HAEMATOXYLIN
from pathology.synth._artifacts import Artifacts, build_artifacts
from pathology.synth._fields import Fields, build_fields
from pathology.synth._marker import Staining, assign_staining
from pathology.synth._params import SynthParams
from pathology.synth._shapes import FIBROBLAST, LYMPHOCYTE, MACROPHAGE, TUMOR, SpriteBank

__all__ = ["Cells", "Look", "Scene", "build_scene", "rng_for", "seed_for"]

F32 = NDArray[np.float32]

# Haematoxylin OD of each cell type at counterstain 1.0: (nucleus base, cytoplasm). IHC
# counterstain is light: vesicular tumour nuclei ~0.3, lymphocytes dark, cytoplasm barely tinted.
_H_NUCLEUS = {TUMOR: 0.30, LYMPHOCYTE: 0.72, MACROPHAGE: 0.32, FIBROBLAST: 0.48}
_H_CYTO = {TUMOR: 0.035, LYMPHOCYTE: 0.09, MACROPHAGE: 0.06, FIBROBLAST: 0.04}
_H_MEMBRANE_ACCENT = 0.05  # squamous cell borders stay faintly visible in the counterstain
# Collision radii (um) and drop priority (higher survives).
_COLLIDE = {TUMOR: 7.0, LYMPHOCYTE: 4.2, MACROPHAGE: 7.0, FIBROBLAST: 3.0}
_PRIORITY = {TUMOR: 3, MACROPHAGE: 2, LYMPHOCYTE: 1, FIBROBLAST: 0}
_NEUTRAL = (1.0, 1.0, 1.0)


def seed_for(seed: int, name: str) -> np.random.SeedSequence:
    """Independent, named random stream: changing one part never reshuffles another."""
    return np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(name.encode())])


def rng_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, name))


def _unit(v: NDArray[np.float64]) -> tuple[float, float, float]:
    v = np.abs(np.asarray(v, np.float64))
    return tuple(float(c) for c in v / np.linalg.norm(v))  # type: ignore[return-value]


@dataclass(frozen=True)
class Look:
    """Per-slide appearance drawn from the seed (recorded in the truth where it matters)."""

    counterstain: float
    background_rgb: tuple[float, float, float]
    stain_h: tuple[float, float, float]
    stain_dab: tuple[float, float, float]
    stain_neutral: tuple[float, float, float]
    tumor_spacing_um: float
    stroma_h: float
    fibro_density: float
    cyto_h_extra: float = 0.0  # haematoxylin OD added to every cytoplasm (``variety``)
    dab_neutral: float = 0.0  # neutral OD = dab_neutral x (DAB OD)^2 (``variety``)


def _draw_look(params: SynthParams, rng: np.random.Generator, vrng: np.random.Generator) -> Look:
    """Per-slide look from ``rng``; the ``variety`` extras from their own stream ``vrng``, so a
    slide at ``variety=0`` draws exactly what it did before they existed."""
    h0, d0 = params.stain_vectors or (HAEMATOXYLIN, DAB)
    h, d = _unit(np.array(h0)), _unit(np.array(d0))
    if params.stain_jitter > 0:
        for _ in range(100):  # redraw until the two stains stay distinguishable
            hj = _unit(np.array(h) + rng.normal(0, params.stain_jitter, 3))
            dj = _unit(np.array(d) + rng.normal(0, params.stain_jitter, 3))
            if float(np.dot(hj, dj)) < 0.97:
                h, d = hj, dj
                break
    cs = params.counterstain if params.counterstain is not None else float(rng.uniform(0.75, 1.3))
    glass = float(rng.uniform(236, 250))
    tint = rng.uniform(-3, 3, 3)
    bg = tuple(float(np.clip(glass + t, 200, 254)) for t in tint)
    return Look(
        counterstain=cs,
        background_rgb=bg,  # type: ignore[arg-type]
        stain_h=h,
        stain_dab=d,
        stain_neutral=_unit(np.array(_NEUTRAL)),
        tumor_spacing_um=float(rng.uniform(17.0, 20.5)),
        stroma_h=float(rng.uniform(0.02, 0.06)) * cs,
        fibro_density=float(rng.uniform(900, 1600)),
        cyto_h_extra=params.variety * float(vrng.uniform(0.0, 0.12)),
        dab_neutral=params.variety * float(vrng.uniform(0.0, 0.5)),
    )


@dataclass(frozen=True)
class Cells:
    """All cells of a slide, sorted by ``iy`` (arrays (N,))."""

    ix: NDArray[np.int64]
    iy: NDArray[np.int64]
    type: NDArray[np.int8]
    body_r2: F32  # squared body radius, um^2 (disc bodies)
    body_sprite: NDArray[np.int32]  # -1 = disc body
    nuc_sprite: NDArray[np.int32]
    nuc_h: F32  # haematoxylin OD scale of the nucleus sprite
    cyto_h: F32
    mem_h: F32
    area_um2: NDArray[np.float64]
    stain: Staining

    def __len__(self) -> int:
        return len(self.ix)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any rectangle of the slide and to write its truth."""

    params: SynthParams
    look: Look
    fields: Fields
    bank: SpriteBank
    cells: Cells
    artifacts: Artifacts

    @property
    def tissue_mask(self) -> NDArray[np.bool_]:
        """Truth tissue mask on the field grid: tissue minus pen, dust and border."""
        return self.fields.tissue & ~self.artifacts.mask


def _grid_lookup(field: NDArray, gum: float, y_um: NDArray, x_um: NDArray) -> NDArray:
    gh, gw = field.shape[:2]
    gi = np.clip((y_um / gum).astype(np.int64), 0, gh - 1)
    gj = np.clip((x_um / gum).astype(np.int64), 0, gw - 1)
    return field[gi, gj]


def _sample_grid(
    rng: np.random.Generator, weight: NDArray[np.float64], n: int, gum: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``n`` points, each grid cell drawn with probability ~ weight, uniform inside the cell."""
    total = float(weight.sum())
    if n <= 0 or total <= 0:
        return np.zeros(0), np.zeros(0)
    counts = rng.multinomial(n, (weight / total).ravel())
    idx = np.repeat(np.arange(counts.size), counts)
    gw = weight.shape[1]
    y = (idx // gw + rng.random(idx.size)) * gum
    x = (idx % gw + rng.random(idx.size)) * gum
    return y, x


def _aggregates(
    rng: np.random.Generator, weight: NDArray[np.float64], n: int, gum: float, f: Fields
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``n`` lymphocyte positions in dense round aggregates (~120 um^2 per cell) in stroma."""
    if n <= 0:
        return np.zeros(0), np.zeros(0)
    k = max(1, n // 90)
    cy, cx = _sample_grid(rng, weight, k, gum)
    sizes = rng.multinomial(n, np.full(k, 1.0 / k))
    ys, xs = [], []
    for y0, x0, m in zip(cy, cx, sizes, strict=True):
        r = math.sqrt(m * 120.0 / math.pi)
        ys.append(y0 + rng.normal(0, r / 1.6, m))
        xs.append(x0 + rng.normal(0, r / 1.6, m))
    y, x = np.concatenate(ys), np.concatenate(xs)
    H_um, W_um = f.shape[0] * gum, f.shape[1] * gum
    ok = (y >= 0) & (y < H_um) & (x >= 0) & (x < W_um)
    y, x = y[ok], x[ok]
    ok = _grid_lookup(weight > 0, gum, y, x)
    return y[ok], x[ok]


def _tumour_lattice(
    params: SynthParams,
    f: Fields,
    s: float,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    H_um, W_um = params.height * params.mpp, params.width * params.mpp  # type: ignore[operator]
    cy, cx = H_um / 2, W_um / 2
    half = 0.5 * math.hypot(H_um, W_um) + s
    rows = np.arange(-half, half, s * math.sqrt(3) / 2)
    cols = np.arange(-half, half, s)
    v, u = np.meshgrid(rows, cols, indexing="ij")
    u = u + (np.arange(rows.size)[:, None] % 2) * s / 2
    th = float(rng.uniform(0, math.pi))
    y = cy + u * math.sin(th) + v * math.cos(th)
    x = cx + u * math.cos(th) - v * math.sin(th)
    y, x = y.ravel(), x.ravel()
    y = y + rng.normal(0, 0.08 * s, y.size)
    x = x + rng.normal(0, 0.08 * s, x.size)
    ok = (y >= 0) & (y < H_um) & (x >= 0) & (x < W_um)
    y, x = y[ok], x[ok]
    dy = _grid_lookup(f.disp_y_um, f.grid_um, y, x)
    dx = _grid_lookup(f.disp_x_um, f.grid_um, y, x)
    y, x = y + dy, x + dx
    ok = (y >= 0) & (y < H_um) & (x >= 0) & (x < W_um)
    y, x = y[ok], x[ok]
    keep = _grid_lookup(f.nest, f.grid_um, y, x) & (
        _grid_lookup(f.inside_um, f.grid_um, y, x) >= 0.6 * s
    )
    y, x = y[keep], x[keep]
    if params.tumor_cell_limit is not None and y.size > params.tumor_cell_limit:
        c = f.nest_centre_um or (float(y.mean()), float(x.mean()))
        order = np.argsort((y - c[0]) ** 2 + (x - c[1]) ** 2, kind="stable")
        sel = np.sort(order[: params.tumor_cell_limit])
        y, x = y[sel], x[sel]
    return y, x


def _drop_collisions(y: NDArray, x: NDArray, types: NDArray) -> NDArray[np.bool_]:
    """Keep-mask after removing the lower-priority cell of every overlapping pair."""
    keep = np.ones(y.size, bool)
    if y.size < 2:
        return keep
    rc = np.array([_COLLIDE[int(t)] for t in range(4)])[types]
    pri = np.array([_PRIORITY[int(t)] for t in range(4)])[types]
    pairs = cKDTree(np.column_stack([y, x])).query_pairs(2 * rc.max(), output_type="ndarray")
    if pairs.size == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.hypot(y[i] - y[j], x[i] - x[j])
    both_tumour = (types[i] == TUMOR) & (types[j] == TUMOR)  # the lattice already spaces them
    hit = (d < rc[i] + rc[j]) & ~both_tumour
    i, j = i[hit], j[hit]
    loser = np.where((pri[i] > pri[j]) | ((pri[i] == pri[j]) & (i < j)), j, i)
    keep[loser] = False
    return keep


def build_scene(params: SynthParams) -> Scene:
    """Draw look, fields, sprites and cells for ``params`` (deterministic in ``params.seed``)."""
    seed = params.seed
    look = _draw_look(params, rng_for(seed, "look"), rng_for(seed, "variety"))
    s = look.tumor_spacing_um
    f = build_fields(
        params,
        rng_for(seed, "fields"),
        stroma_h=look.stroma_h,
        cell_area_um2=s * s * math.sqrt(3) / 2,
    )
    bank = SpriteBank(
        params.mpp,
        seed_for(seed, "shapes"),
        seed_for(seed, "shape-pixels"),
        tumor_aspect_max=1.35 + 0.3 * params.variety,
    )
    rng = rng_for(seed, "cells")
    gum = f.grid_um

    ty, tx = _tumour_lattice(params, f, s, rng)
    types_t = np.full(ty.size, TUMOR, np.int8)
    tissue_mm2 = float(f.tissue.sum()) * gum * gum / 1e6
    n_imm = round(params.immune_density * tissue_mm2)
    # Intra-epithelial lymphocytes replace lattice points (they sit in a clear halo).
    n_intra = min(round(0.12 * n_imm), int(0.08 * ty.size))
    if n_intra:
        types_t[rng.choice(ty.size, n_intra, replace=False)] = LYMPHOCYTE

    stroma_ok = f.tissue & (f.inside_um >= 6.0) & (f.nest_dist_um >= 10.0)
    near = 1.0 + 4.0 * np.exp(-f.nest_dist_um.astype(np.float64) / 40.0)
    n_str = n_imm - n_intra
    # A quarter of the stromal lymphocytes gather in aggregates (~90 cells each) near the tumour.
    n_agg = round(0.25 * n_str) if n_str >= 120 else 0
    ay_um, ax_um = _aggregates(rng, stroma_ok * near, n_agg, gum, f)
    sy_um, sx_um = _sample_grid(rng, stroma_ok * near, n_str - n_agg, gum)
    mac_p = 0.15 * n_str / max(n_str - n_agg, 1)  # macrophages stay 15 % of stromal immune cells
    types_i = np.where(rng.random(sy_um.size) < mac_p, MACROPHAGE, LYMPHOCYTE).astype(np.int8)
    iy_um = np.concatenate([ay_um, sy_um])
    ix_um = np.concatenate([ax_um, sx_um])
    types_i = np.concatenate([np.full(ay_um.size, LYMPHOCYTE, np.int8), types_i])
    stroma_mm2 = float(stroma_ok.sum()) * gum * gum / 1e6
    fy_um, fx_um = _sample_grid(
        rng, stroma_ok.astype(np.float64), round(look.fibro_density * stroma_mm2), gum
    )
    types_f = np.full(fy_um.size, FIBROBLAST, np.int8)

    y = np.concatenate([ty, iy_um, fy_um])
    x = np.concatenate([tx, ix_um, fx_um])
    types = np.concatenate([types_t, types_i, types_f])
    # Only cells whose centre lies in the slide (the last grid row/column can overhang it).
    H_um, W_um = params.size[1] * params.mpp, params.size[0] * params.mpp
    inside = (y >= 0) & (y < H_um) & (x >= 0) & (x < W_um)
    y, x, types = y[inside], x[inside], types[inside]
    keep = _drop_collisions(y, x, types)
    art = build_artifacts(params, f, rng_for(seed, "artifacts"))
    if art.mask.any():  # cells under ink, dust or the border are not visible: not in the truth
        keep &= ~_grid_lookup(art.mask, gum, y, x)
    y, x, types = y[keep], x[keep], types[keep]

    # Snap to pixel centres; sort by row so a band finds its cells with one binary search.
    mpp = params.mpp
    ix = np.floor(x / mpp).astype(np.int64)
    iy = np.floor(y / mpp).astype(np.int64)
    order = np.lexsort((ix, iy))
    ix, iy, types = ix[order], iy[order], types[order]
    y, x = y[order], x[order]  # unsnapped: sizing decisions must not depend on mpp
    n = ix.size

    # Sprites and bodies per type.
    nuc_sprite = np.zeros(n, np.int32)
    body_sprite = np.full(n, -1, np.int32)
    body_r = np.zeros(n, np.float64)
    area = np.zeros(n, np.float64)
    tum = np.flatnonzero(types == TUMOR)
    if tum.size:
        pts = np.column_stack([y, x])
        dnn, _ = cKDTree(pts).query(pts[tum], k=2)
        nn = dnn[:, 1] if n > 1 else np.full(tum.size, 2 * s)
        body_r[tum] = 0.68 * s * rng.uniform(0.95, 1.06, tum.size)
        # Nucleus sprites (sorted by size) that leave ~2 um of cytoplasm and membrane to the
        # nearest neighbour; pick among the larger 70 % of those: SCC nuclei are big.
        max_r = np.minimum(0.5 * nn - 1.8, body_r[tum] - 2.2)
        fit = np.maximum(np.searchsorted(bank.radius_um[TUMOR], max_r, side="right"), 1)
        lo = np.floor(0.3 * fit)
        pick = np.minimum(lo + np.floor(rng.random(tum.size) * (fit - lo)), fit - 1).astype(
            np.int32
        )
        nuc_sprite[tum] = pick
        area[tum] = bank.area_um2[TUMOR][pick]
    for t, lo_hi in ((LYMPHOCYTE, (0.7, 1.2)), (MACROPHAGE, None)):
        idx = np.flatnonzero(types == t)
        pick = rng.integers(0, len(bank.sprites[t]), idx.size).astype(np.int32)
        nuc_sprite[idx] = pick
        area[idx] = bank.area_um2[t][pick]
        r_n = bank.radius_um[t][pick]
        if lo_hi is not None:
            body_r[idx] = r_n + rng.uniform(*lo_hi, idx.size)
        else:
            body_r[idx] = np.maximum(rng.uniform(9.0, 12.0, idx.size), r_n + 2.0)
    fib = np.flatnonzero(types == FIBROBLAST)
    if fib.size:
        a1, a2 = f.fibre_angle
        wa = _grid_lookup(f.stroma_a, gum, y[fib], x[fib])
        wb = _grid_lookup(f.stroma_b, gum, y[fib], x[fib])
        ang = np.where(wa >= wb, a1, a2) + rng.normal(0, 0.2, fib.size)
        pick = bank.fibro_index(ang, rng.integers(0, 1 << 30, fib.size)).astype(np.int32)
        nuc_sprite[fib] = pick
        body_sprite[fib] = pick
        area[fib] = bank.area_um2[FIBROBLAST][pick]

    cs = look.counterstain
    nuc_h = np.array([_H_NUCLEUS[int(t)] for t in range(4)], np.float64)[types]
    cyto_h = np.array([_H_CYTO[int(t)] for t in range(4)], np.float64)[types]
    nuc_h = nuc_h * cs * rng.uniform(0.85, 1.15, n)
    cyto_h = cyto_h * cs * rng.uniform(0.8, 1.2, n)
    if params.variety > 0:  # own stream: the reference look (variety 0) draws nothing here
        vr = rng_for(seed, "variety-cells")
        cyto_h += look.cyto_h_extra * cs * vr.uniform(0.5, 1.5, n)
        v = params.variety
        nuc_h *= vr.uniform(1.0 - 0.5 * v, 1.0 + 0.25 * v, n)  # pale and dark nuclei side by side
    mem_h = np.where(types == TUMOR, _H_MEMBRANE_ACCENT * cs, 0.0)
    stain = assign_staining(params, types, rng_for(seed, "staining"))
    cells = Cells(
        ix=ix,
        iy=iy,
        type=types,
        body_r2=(body_r**2).astype(np.float32),
        body_sprite=body_sprite,
        nuc_sprite=nuc_sprite,
        nuc_h=nuc_h.astype(np.float32),
        cyto_h=cyto_h.astype(np.float32),
        mem_h=mem_h.astype(np.float32),
        area_um2=area,
        stain=stain,
    )
    return Scene(params=params, look=look, fields=f, bank=bank, cells=cells, artifacts=art)
