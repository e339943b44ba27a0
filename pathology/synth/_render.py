"""Rendering: cell stamps -> label maps -> stain OD maps -> Beer-Lambert RGB.

Any level-0 rectangle renders to the same pixels whether alone or inside a larger one: cells are
stamped in id order into a halo around the rectangle, textures are periodic in level-0 pixels and
all randomness was drawn when the scene was built. That is what lets the slide writer render
horizontal bands in threads and still be byte-for-byte deterministic.

Per rectangle (``ext`` = rectangle plus a halo for the ring test and the blur):

1. Stamp every cell that reaches ``ext``: body as a power diagram (``d^2 - r^2`` for discs, a
   sprite for spindles; the smallest value wins, only negative values claim a pixel) into
   ``cell_labels``; nucleus sprites into ``nucleus_labels`` and a haematoxylin map.
2. Membrane ring: body pixels within ``k`` px (~0.75 um) of a label change.
3. Look-up tables per cell give cytoplasm / ring / arc / nucleus DAB and haematoxylin; stroma
   gets pale haematoxylin from two fibre textures; DAB gets a mean-1 granular texture.
4. Optics: Gaussian PSF on the stain maps, OD mix along the slide's stain vectors plus a neutral
   section background and artifacts, :func:`pathology.stain.od_to_rgb`, sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pathology.stain import od_to_rgb
from pathology.synth._fields import interp_grid
from pathology.synth._layout import Scene, rng_for

__all__ = [
    "Maps",
    "Textures",
    "active_tiles",
    "build_textures",
    "compose_rgb",
    "glass_rgb",
    "render_band",
    "render_maps",
    "render_rgb",
]

F32 = NDArray[np.float32]
I32 = NDArray[np.int32]

_TILE = 1024  # period of the fibre textures, px
_GRAIN = 512
_NOISE = (509, 521)  # co-prime periods: the noise pattern never lines up with JPEG tiles
_EDGE_UM = 1.5  # width of the anti-aliased tissue edge


@dataclass(frozen=True)
class Textures:
    """Periodic textures of one slide (level-0 pixel periods) and its OD -> intensity table.

    Attributes
    ----------
    fibre_a, fibre_b : ndarray (1024, 1024) float32
        Mean-1 collagen textures along the two fibre directions.
    grain : ndarray (512, 512) float32
        Mean-1 DAB granularity.
    noise : ndarray (3, 509, 521) int8 or None
        Sensor noise per channel, grey levels.
    od_table : ndarray (3, n) int16
        Transmitted intensity per channel at OD ``k / 4096`` (see :func:`_od_table`).
    """

    fibre_a: F32
    fibre_b: F32
    grain: F32
    noise: NDArray[np.int8] | None
    od_table: NDArray[np.int16]


def _fibres(rng: np.random.Generator, mpp: float, angle: float) -> F32:
    """Mean-1 lognormal texture elongated along ``angle`` (collagen bundles), period _TILE."""
    ky = np.fft.fftfreq(_TILE)[:, None]
    kx = np.fft.rfftfreq(_TILE)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    k_along = kx * c + ky * s
    k_across = -kx * s + ky * c
    long_px, short_px = 9.0 / mpp, 0.9 / mpp
    g = np.exp(-2 * math.pi**2 * ((k_along * long_px) ** 2 + (k_across * short_px) ** 2))
    white = rng.standard_normal((_TILE, _TILE)).astype(np.float32)
    f = np.fft.irfft2(np.fft.rfft2(white) * g, s=(_TILE, _TILE))
    f = (f - f.mean()) / (f.std() or 1.0)
    t = np.exp(0.4 * f)
    return (t / t.mean()).astype(np.float32)


_OD_STEPS = 4096  # OD -> intensity table resolution: 1/4096 OD is < 0.1 grey level
_OD_MAX = 6.0


def _od_table(background: tuple[float, float, float]) -> NDArray[np.int16]:
    """(3, n) intensity per channel at OD ``k / _OD_STEPS``, from :func:`od_to_rgb`.

    Beer-Lambert per channel depends on that channel's OD only, so one table lookup replaces a
    power, a multiply and a rounding per pixel and channel.
    """
    od = np.arange(int(_OD_MAX * _OD_STEPS) + 1, dtype=np.float32) / np.float32(_OD_STEPS)
    return od_to_rgb(np.repeat(od[:, None], 3, axis=1), background).T.astype(np.int16)


def build_textures(scene: Scene) -> Textures:
    """Fibre, DAB-grain and sensor-noise tiles for ``scene`` (deterministic in the seed)."""
    p = scene.params
    rng = rng_for(p.seed, "textures")
    a1, a2 = scene.fields.fibre_angle
    fa, fb = _fibres(rng, p.mpp, a1), _fibres(rng, p.mpp, a2)
    g = ndi.gaussian_filter(
        rng.standard_normal((_GRAIN, _GRAIN)).astype(np.float32),
        max(0.35 / p.mpp, 0.5),
        mode="wrap",
    )
    g = 1.0 + 0.12 * (g - g.mean()) / (g.std() or 1.0)
    noise = None
    if p.noise > 0:
        noise = np.clip(np.rint(rng.normal(0, p.noise, (3, *_NOISE))), -127, 127).astype(np.int8)
    return Textures(fa, fb, g.astype(np.float32), noise, _od_table(scene.look.background_rgb))


def _periodic(tile: NDArray, y0: int, y1: int, x0: int, x1: int) -> NDArray:
    rows = np.arange(y0, y1) % tile.shape[0]
    cols = np.arange(x0, x1) % tile.shape[1]
    return np.take(tile[rows], cols, axis=1)


@dataclass(frozen=True)
class Maps:
    """Label and stain maps of a rectangle (before optics), all (h, w) over the ``ext`` rectangle.

    Attributes
    ----------
    y0, x0 : int
        Level-0 position of ``[0, 0]`` (the rectangle's corner minus the halo).
    halo : int
        Pixels around the requested rectangle.
    cell_labels, nucleus_labels : int32
        Cell id (truth ``id``) of each body / nucleus pixel, -1 elsewhere.
    membrane : bool
        Membrane ring pixels.
    od_h, od_dab : float32
        Haematoxylin and DAB optical density (unblurred).
    alpha : float32
        Tissue coverage 0-1 (anti-aliased outline).
    """

    y0: int
    x0: int
    halo: int
    cell_labels: I32
    nucleus_labels: I32
    membrane: NDArray[np.bool_]
    od_h: F32
    od_dab: F32
    alpha: F32


def _halo(scene: Scene) -> int:
    p = scene.params
    return _ring_px(p.mpp) + math.ceil(3 * p.blur_um / p.mpp) + 2


def _ring_px(mpp: float) -> int:
    # ~0.75 um per cell, so a shared membrane reads as a ~1.5 um brown line (as DAB precipitate
    # does at 40x) and keeps most of its OD through the optical blur.
    return max(1, round(0.75 / mpp))


def _stamp(scene: Scene, ey0: int, ey1: int, ex0: int, ex1: int) -> tuple[I32, I32, F32]:
    """Body labels, nucleus labels and nuclear haematoxylin over ``[ey0, ey1) x [ex0, ex1)``."""
    c, bank, mpp = scene.cells, scene.bank, scene.params.mpp
    eh, ew = ey1 - ey0, ex1 - ex0
    best = np.zeros((eh, ew), np.float32)  # only negative power values claim a pixel
    lab = np.full((eh, ew), -1, np.int32)
    nuc = np.full((eh, ew), -1, np.int32)
    hn = np.zeros((eh, ew), np.float32)
    reach = bank.max_extent_px() + 1
    lo = int(np.searchsorted(c.iy, ey0 - reach, "left"))
    hi = int(np.searchsorted(c.iy, ey1 + reach, "right"))
    sel = np.arange(lo, hi)
    sel = sel[(c.ix[sel] >= ex0 - reach) & (c.ix[sel] < ex1 + reach)]
    if sel.size == 0:
        return lab, nuc, hn
    d2, rd = bank.d2, bank.disc_r_px
    rpx = np.minimum(np.ceil(np.sqrt(c.body_r2[sel]) / mpp).astype(np.int64) + 1, rd)
    sprites = bank.sprites
    cols = zip(
        sel.tolist(),
        (c.iy[sel] - ey0).tolist(),
        (c.ix[sel] - ex0).tolist(),
        c.body_r2[sel].tolist(),
        rpx.tolist(),
        c.body_sprite[sel].tolist(),
        c.type[sel].tolist(),
        c.nuc_sprite[sel].tolist(),
        c.nuc_h[sel].tolist(),
        strict=True,
    )
    for cid, cy, cx, r2, rp, bs, t, ns, hs in cols:
        # Body: power value (um^2), negative inside; the smallest value over all cells wins.
        if bs < 0:
            tpl = d2[rd - rp : rd + rp + 1, rd - rp : rd + rp + 1]
            sub = r2
        else:
            body = sprites[t][bs].body
            assert body is not None  # spindle sprites always carry a body
            tpl = body
            sub = 0.0
            rp = tpl.shape[0] // 2
        ya, xa = cy - rp, cx - rp
        yb, xb = ya + tpl.shape[0], xa + tpl.shape[1]
        ca, cb, da, db = max(ya, 0), min(yb, eh), max(xa, 0), min(xb, ew)
        if ca < cb and da < db:
            val = tpl[ca - ya : cb - ya, da - xa : db - xa] - np.float32(sub)
            bst = best[ca:cb, da:db]
            m = val < bst
            np.copyto(bst, val, where=m)
            np.copyto(lab[ca:cb, da:db], cid, where=m)
        sp = sprites[t][ns]
        r = sp.mask.shape[0] // 2
        ya, xa = cy - r, cx - r
        yb, xb = ya + 2 * r + 1, xa + 2 * r + 1
        ca, cb, da, db = max(ya, 0), min(yb, eh), max(xa, 0), min(xb, ew)
        if ca < cb and da < db:
            msk = sp.mask[ca - ya : cb - ya, da - xa : db - xa]
            np.copyto(nuc[ca:cb, da:db], cid, where=msk)
            hn[ca:cb, da:db] += sp.h_rel[ca - ya : cb - ya, da - xa : db - xa] * np.float32(hs)
    return lab, nuc, hn


def _ring(lab: I32, nuc: I32, k: int) -> NDArray[np.bool_]:
    """Body pixels within ``k`` px (along x or y) of a different label, outside nuclei."""
    e = np.zeros(lab.shape, bool)
    a = lab[:, k:] != lab[:, :-k]
    e[:, k:] |= a
    e[:, :-k] |= a
    b = lab[k:, :] != lab[:-k, :]
    e[k:, :] |= b
    e[:-k, :] |= b
    e &= lab >= 0
    e &= nuc < 0
    return e


def _lut(values: NDArray[np.floating], background: float = 0.0) -> F32:
    """Table indexed by ``label + 1`` (index 0 = no cell)."""
    return np.concatenate([[background], np.asarray(values, np.float32)]).astype(np.float32)


def render_maps(scene: Scene, tex: Textures, y0: int, y1: int, x0: int, x1: int) -> Maps:
    """Labels and unblurred stain maps of level-0 rectangle ``[y0, y1) x [x0, x1)`` plus a halo."""
    p, c, f = scene.params, scene.cells, scene.fields
    halo = _halo(scene)
    ey0, ey1, ex0, ex1 = y0 - halo, y1 + halo, x0 - halo, x1 + halo
    lab, nuc, hn = _stamp(scene, ey0, ey1, ex0, ex1)
    np.copyto(lab, nuc, where=nuc >= 0)  # a nucleus belongs to its own cell's body
    mem = _ring(lab, nuc, _ring_px(p.mpp))
    li = lab + 1
    st = c.stain
    dab = np.take(_lut(st.cytoplasm), li)
    h = np.take(_lut(c.cyto_h), li)

    # Stroma: pale haematoxylin only, carried by two fibre textures and the tissue outline.
    ds = f.ds
    alpha = interp_grid(f.edge_um, ds, ey0, ey1, ex0, ex1)
    alpha *= np.float32(1.0 / _EDGE_UM)
    alpha += np.float32(0.5)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    sa = interp_grid(f.stroma_a, ds, ey0, ey1, ex0, ex1)
    sa *= _periodic(tex.fibre_a, ey0, ey1, ex0, ex1)
    sb = interp_grid(f.stroma_b, ds, ey0, ey1, ex0, ex1)
    sb *= _periodic(tex.fibre_b, ey0, ey1, ex0, ex1)
    sa += sb
    sa *= alpha
    np.copyto(h, sa, where=lab < 0)

    # Membrane ring: arc test by angle around the cell centre, only for ring pixels.
    idx = np.flatnonzero(mem)
    if idx.size:
        ew = lab.shape[1]
        cl = lab.ravel()[idx]
        dy = (idx // ew + ey0).astype(np.float32) - c.iy[cl].astype(np.float32)
        dx = (idx % ew + ex0).astype(np.float32) - c.ix[cl].astype(np.float32)
        frac = np.mod(np.arctan2(dy, dx) - st.arc_start[cl], np.float32(2 * math.pi))
        frac *= np.float32(1 / (2 * math.pi))
        on = frac < st.coverage[cl]
        dab.ravel()[idx] = np.where(on, st.membrane[cl], st.ring_off[cl])
        h.ravel()[idx] += c.mem_h[cl]
    nuc1 = nuc + 1
    np.copyto(dab, np.take(_lut(st.nucleus), nuc1), where=nuc1 > 0)
    h += hn
    dab *= _periodic(tex.grain, ey0, ey1, ex0, ex1)
    return Maps(ey0, ex0, halo, lab, nuc, mem, h, dab, alpha)


def _blur(a: F32, sigma_px: float) -> F32:
    if sigma_px < 0.15:
        return a
    out = ndi.gaussian_filter1d(a, sigma_px, axis=0, mode="nearest", truncate=3.0)
    return ndi.gaussian_filter1d(out, sigma_px, axis=1, mode="nearest", truncate=3.0)


def compose_rgb(scene: Scene, tex: Textures, maps: Maps) -> NDArray[np.uint8]:
    """Transmitted light of the rectangle inside ``maps`` (halo cropped), (h, w, 3) uint8."""
    p, look = scene.params, scene.look
    sig = p.blur_um / p.mpp
    k = maps.halo
    crop = (slice(k, maps.od_h.shape[0] - k), slice(k, maps.od_h.shape[1] - k))
    h = _blur(maps.od_h, sig)[crop]
    dab = _blur(maps.od_dab, sig)[crop]
    alpha = maps.alpha[crop]
    hh, ww = h.shape
    y0, x0 = maps.y0 + k, maps.x0 + k
    extra = scene.artifacts.extra_od(scene.fields.ds, p.size, y0, y0 + hh, x0, x0 + ww)
    top = np.float32(tex.od_table.shape[1] - 1)
    steps = np.float32(_OD_STEPS)
    rgb = np.empty((hh, ww, 3), np.uint8)
    o = np.empty((hh, ww), np.float32)
    tmp = np.empty((hh, ww), np.float32)
    # Dense DAB scatters (``variety``): a neutral share that grows with its density, dab^2.
    dab2 = np.square(dab) if look.dab_neutral > 0 else None
    for ch in range(3):
        # Table index = OD * steps (+0.5 to round), the steps folded into the stain vectors.
        np.multiply(h, np.float32(look.stain_h[ch]) * steps, out=o)
        o += np.multiply(dab, np.float32(look.stain_dab[ch]) * steps, out=tmp)
        if dab2 is not None:
            o += np.multiply(
                dab2, np.float32(look.dab_neutral * look.stain_neutral[ch]) * steps, out=tmp
            )
        if p.background_od > 0:
            o += np.multiply(
                alpha, np.float32(p.background_od * look.stain_neutral[ch]) * steps, out=tmp
            )
        if extra is not None:
            o += np.multiply(extra[..., ch], steps, out=tmp)
        o += np.float32(0.5)
        np.minimum(o, top, out=o)
        val = np.take(tex.od_table[ch], o.astype(np.int32))
        rgb[..., ch] = _add_noise(val, tex, ch, y0, x0)
    return rgb


def _add_noise(
    val: NDArray[np.int16], tex: Textures, ch: int, y0: int, x0: int
) -> NDArray[np.int16]:
    """Sensor noise of channel ``ch`` added in place to intensities ``val`` at level-0 ``(y0, x0)``."""
    if tex.noise is not None:
        hh, ww = val.shape
        val += _periodic(tex.noise[ch], y0, y0 + hh, x0, x0 + ww)
        np.clip(val, 0, 255, out=val)
    return val


def glass_rgb(tex: Textures, y0: int, y1: int, x0: int, x1: int) -> NDArray[np.uint8]:
    """What :func:`render_rgb` gives where nothing absorbs: glass colour plus sensor noise."""
    rgb = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    for ch in range(3):
        val = np.full((y1 - y0, x1 - x0), tex.od_table[ch][0], np.int16)
        rgb[..., ch] = _add_noise(val, tex, ch, y0, x0)
    return rgb


def render_rgb(
    scene: Scene, tex: Textures, y0: int, y1: int, x0: int, x1: int
) -> NDArray[np.uint8]:
    """Level-0 rectangle ``[y0, y1) x [x0, x1)`` as (y1 - y0, x1 - x0, 3) uint8 (before JPEG)."""
    return compose_rgb(scene, tex, render_maps(scene, tex, y0, y1, x0, x1))


def active_tiles(
    scene: Scene, y0: int, y1: int, x0: int, n_tiles: int, tile: int
) -> NDArray[np.bool_]:
    """Which of ``n_tiles`` tiles from level-0 ``x0`` in rows ``[y0, y1)`` could hold anything but glass.

    Conservative: a tile counts as active when tissue (including its anti-aliased edge), ink, dust,
    the border or any cell stamp comes within the blur halo of it. Inactive tiles render exactly
    as :func:`glass_rgb`, so skipping them changes no pixel.
    """
    f, c, art = scene.fields, scene.cells, scene.artifacts
    ds, halo = f.ds, _halo(scene)
    gh, gw = f.shape
    act = np.zeros(n_tiles, bool)
    edges = x0 + np.arange(n_tiles + 1) * tile
    # Grid fields: a pixel interpolates the grid cells around it; widen by the halo and one cell.
    g0, g1 = max(0, (y0 - halo) // ds - 1), min(gh, (y1 + halo) // ds + 2)
    if g0 < g1:
        # alpha > 0 needs edge_um > -_EDGE_UM / 2; keep a little slack for float rounding.
        live = (f.edge_um[g0:g1] > -0.55 * _EDGE_UM).any(axis=0)
        if art.pen_od is not None:
            live |= (art.pen_od[g0:g1] > 0).any(axis=(0, 2))
        cum = np.concatenate([[0], np.cumsum(live)])
        lo = np.clip((edges[:-1] - halo) // ds - 1, 0, gw)
        hi = np.clip((edges[1:] + halo) // ds + 2, 0, gw)
        act |= cum[hi] > cum[lo]

    def mark(xa: NDArray, xb: NDArray) -> None:
        """Mark tiles overlapping level-0 column spans [xa, xb)."""
        if xa.size:
            ta = np.clip((xa - x0) // tile, 0, n_tiles)
            tb = np.clip(-(-(xb - x0) // tile), 0, n_tiles)
            diff = np.zeros(n_tiles + 1, np.int64)
            np.add.at(diff, ta, 1)
            np.add.at(diff, tb, -1)
            act[np.cumsum(diff)[:-1] > 0] = True

    reach = scene.bank.max_extent_px() + halo + 1
    lo_i = int(np.searchsorted(c.iy, y0 - reach, "left"))
    hi_i = int(np.searchsorted(c.iy, y1 + reach, "right"))
    mark(c.ix[lo_i:hi_i] - reach, c.ix[lo_i:hi_i] + reach + 1)
    if art.specks:
        sp = [(s.iy, s.ix, s.amount.shape[0] // 2 + halo + 1) for s in art.specks]
        near = np.array(
            [(ix - r, ix + r + 1) for iy, ix, r in sp if y0 - r <= iy < y1 + r], np.int64
        )
        if near.size:
            mark(near[:, 0], near[:, 1])
    if art.border is not None:
        edge, width = art.border
        w_px, h_px = scene.params.size
        if edge == "left":
            mark(np.array([0]), np.array([width + halo]))
        elif edge == "right":
            mark(np.array([w_px - width - halo]), np.array([edges[-1]]))
        elif (edge == "top" and y0 < width + halo) or (
            edge == "bottom" and y1 > h_px - width - halo
        ):
            act[:] = True
    return act


def render_band(
    scene: Scene, tex: Textures, y0: int, y1: int, x0: int, n_tiles: int, tile: int
) -> NDArray[np.uint8]:
    """Rows ``[y0, y1)`` of ``n_tiles`` whole tiles from ``x0``: rendered where anything is, glass
    elsewhere; pixel-identical to :func:`render_rgb` over the same rectangle."""
    act = active_tiles(scene, y0, y1, x0, n_tiles, tile)
    x1 = x0 + n_tiles * tile
    if act.all():
        return render_rgb(scene, tex, y0, y1, x0, x1)
    rgb = glass_rgb(tex, y0, y1, x0, x1)
    d = np.diff(np.concatenate([[0], act.astype(np.int8), [0]]))
    for a, b in zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True):
        rgb[:, a * tile : b * tile] = render_rgb(scene, tex, y0, y1, x0 + a * tile, x0 + b * tile)
    return rgb
