"""Per-cell measurement along rays: nucleus outline, then cytoplasm and membrane compartments.

Every cell is sampled along ``RAY_ANGLES`` rays from its centre, every ``RAY_STEP_UM`` microns out
to ``RAY_MAX_UM``, with one batched ``grid_sample`` over the haematoxylin and DAB maps. On each ray:

- the nucleus edge is where haematoxylin falls below half-way between the nucleus centre and its
  surroundings (area, elongation and darkness follow); the outline's centroid becomes the cell's
  centre;
- the cell edge is the power-diagram boundary with the neighbouring cells (``|p - c_i|^2 - rho_i^2 =
  |p - c_j|^2 - rho_j^2``, rho = the cell type's body radius, c = outline centroids), each shared
  edge then moved onto the faint haematoxylin line of the cell border; rays that meet no neighbour
  end at the cell's typical body radius, or at its membrane's DAB ridge when one is near;
- the membrane is the brightest DAB just inside that edge; the cytoplasm lies between nucleus and
  membrane.

Frames: positions in microns from the input tile's top-left corner; ray tensors are (K, A, S) for
K cells, A angles, S radial samples, measured from the detected centre (``Rays.yx_um``, the ray
origin); cell edges are distances from the outline centre (``Rays.centre_um``) and move to the
ray frame by ``Rays.lag_um``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pathology.scoring._detect import tile_slots
from pathology.scoring._sampling import sample_points

if TYPE_CHECKING:
    import torch

__all__ = [
    "RAY_ANGLES",
    "RAY_MAX_UM",
    "RAY_STEP_UM",
    "Compartments",
    "Rays",
    "measure_compartments",
    "sample_rays",
]

#: Directions sampled around every cell, 22.5 degrees apart (~2 um of a 10 um nucleus's outline per
#: ray), for the nucleus and the compartments alike. 16 type cells about as 32 did once the
#: cell-type classifier is refitted on them (held-out synthetic accuracy 0.9646 against 0.9652, and
#: 0.9648 against 0.9654 on seeds 903-908); the compartments (means and fractions over rays) read
#: about as on 32; the model takes ~20 % less CPU time than with 32. Fewer rays for the
#: compartments make membrane coverage (a whole number of rays) coarser and lift low PD-L1 scores:
#: the batch test's CPS 1-19 slide (truth 8.22, 10 % allowed) reads 8.89 here, 8.99 with 16
#: compartment rays of 32, 9.11 with 12 of 24 and 9.77 with 8 of 24; with 10 of 20, PD-L1's 0.2
#: coverage is exactly 2 rays and three synthetic JPEG PD-L1 cases read TPS up to 4.6 points high.
#: 24 rays (compartments on 12) typed as 32 did but saved only ~10 % and failed that slide. The
#: classifier in ``cell_types.json`` is fitted for this count: refit it
#: (``scripts/fit_cell_types.py``) when changing it.
RAY_ANGLES = 16
RAY_STEP_UM = 0.5
RAY_MAX_UM = 16.0
#: Neighbours considered for each cell's boundary and local density.
N_NEIGHBOURS = 8
DENSITY_RADIUS_UM = 25.0
#: Membrane band searched on each ray: from this far inside the cell edge to this far outside.
MEMBRANE_IN_UM, MEMBRANE_OUT_UM = 1.25, 0.25
#: Offsets (um) from the cell edge along each ray where the membrane profile is sampled.
EDGE_OFFSETS_UM = tuple(-1.5 + 0.25 * i for i in range(13))
#: A ray's membrane is the cell's own when the DAB this far (um) inside the cell edge is at least
#: that as far outside (half the ~1 um DAB ring a membrane leaves on each side of a border).
SIDE_PROBE_UM = 0.5
#: Largest move (um) from the detected centre to the nucleus outline's centroid.
MAX_CENTRE_SHIFT_UM = 2.0
#: Largest move (um) of a shared cell edge onto the counterstained border line, and the most
#: oblique ray (cosine to the edge normal) whose offset is scaled up in full.
MAX_EDGE_SHIFT_UM, MIN_EDGE_COS = 0.75, 0.3
#: Band around the typical body radius searched for the membrane on rays that face stroma.
FREE_EDGE_IN_UM, FREE_EDGE_OUT_UM = 4.0, 1.5


@dataclass(frozen=True)
class Rays:
    """Ray samples and nucleus features of K cells (all tensors indexed by cell)."""

    tile: torch.Tensor  # (K,) int64
    yx_um: torch.Tensor  # (K, 2) ray origin: the detected (LoG) centre
    centre_um: torch.Tensor  # (K, 2) centroid of the measured nucleus outline
    dab: torch.Tensor  # (K', A, S) DAB OD of the cells with DAB rays (see sample_rays)
    dab_row: torch.Tensor  # (K,) int64 row of each cell in ``dab``, -1 = none
    t_um: torch.Tensor  # (S,) radius of each sample
    edge_um: torch.Tensor  # (K, A) nucleus edge per ray
    area_um2: torch.Tensor  # (K,)
    elongation: torch.Tensor  # (K,) major / minor axis, >= 1
    h_nucleus: torch.Tensor  # (K,) mean haematoxylin OD in the nucleus
    h_around: torch.Tensor  # (K,) haematoxylin OD just outside the nucleus
    density: torch.Tensor  # (K,) other cells within DENSITY_RADIUS_UM
    nb_index: torch.Tensor  # (K, N_NEIGHBOURS) global index of neighbours, -1 = none
    nb_dist_um: torch.Tensor  # (K, N_NEIGHBOURS)
    # (K,) mean DAB OD in the nucleus of every cell (halo cells included) when the outline was
    # traced on haematoxylin + DAB (sample_rays' nucleus_dab); None otherwise.
    nucleus_dab_od: torch.Tensor | None = None

    def lag_um(self, dirs: torch.Tensor) -> torch.Tensor:
        """(K, A) how much further along each ray (directions ``dirs`` (A, 2)) a point lies from
        the ray origin than from the outline centre: ``t_origin = t_centre + lag``."""
        return (self.centre_um - self.yx_um) @ dirs.T

    def dab_rays(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """(M, A, S) DAB OD along the rays of ``cells`` (indices, default all); raises
        ValueError for a cell sampled without DAB (``sample_rays``'s ``dab_cells``)."""
        rows = self.dab_row if cells is None else self.dab_row[cells]
        if rows.numel() and int(rows.min()) < 0:
            raise ValueError("DAB rays were not sampled for some of these cells (dab_cells)")
        if rows.numel() == self.dab.shape[0] and cells is None:
            return self.dab  # every cell has DAB rays, in order
        return self.dab[rows]

    def dab_wcum(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """(M, A, S + 1) prefix sums of DAB x (t + step / 2) along each ray of ``cells`` (indices,
        default all): computed on demand, as only the measured cells need them."""
        return _prefix(self.dab_rays(cells) * (self.t_um + RAY_STEP_UM / 2))

    def dab_nucleus(
        self, cells: torch.Tensor | None = None, dab_wcum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(M,) mean DAB OD in the nucleus of ``cells`` (default all); ``dab_wcum``: their
        :meth:`dab_wcum`, when already at hand."""
        edge = self.edge_um if cells is None else self.edge_um[cells]
        wcum = self.dab_wcum(cells) if dab_wcum is None else dab_wcum
        return _nucleus_mean(wcum, _prefix(self.t_um + RAY_STEP_UM / 2), edge)


@dataclass(frozen=True)
class Compartments:
    """DAB OD per compartment (K,) and the membrane's stained fraction."""

    cell_edge_um: torch.Tensor  # (K, A)
    nucleus: torch.Tensor
    cytoplasm: torch.Tensor
    membrane: torch.Tensor  # mean over the whole outline
    membrane_stained: torch.Tensor  # mean over the stained part of the outline (0 if none)
    membrane_coverage: torch.Tensor  # fraction of rays with stained membrane


def _wmean(v: torch.Tensor, w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    den = w.sum(dim)
    return (v * w).sum(dim) / den.clamp_min(1e-9)


# Ray samples sit at t_i = i * RAY_STEP_UM exactly, so a radial band ``lo <= t <= hi`` is the index
# range [ceil(lo / step), floor(hi / step)], and a (weighted) mean over it is a difference of
# prefix sums: two gathers per ray instead of a mask over every sample.


def _prefix(v: torch.Tensor) -> torch.Tensor:
    """(..., S + 1) prefix sums along the last axis, starting at 0.

    On CUDA the scan runs along the leading axis of a transposed copy: torch's kernel for a scan
    along the last axis is slow for short rows (S ~ 33 samples, millions of rays). Measured on an
    H100 for (87,000 cells, 16 rays, 33 samples): 8.0 ms per call, a third of the model's GPU
    time, against 1.5 ms this way (model alone 25k -> 31k tiles/s at batch 1024). Each ray is then
    summed one sample after another, as on the CPU (equal to the CPU's prefix sums to 8e-6).
    """
    import torch

    s = v.shape[-1]
    if v.device.type == "cuda" and v.dim() > 1:
        return _prefix_by_columns(v)
    out = torch.empty((*v.shape[:-1], s + 1), dtype=v.dtype, device=v.device)
    out[..., 0] = 0.0
    torch.cumsum(v, -1, out=out[..., 1:])
    return out


def _prefix_by_columns(v: torch.Tensor) -> torch.Tensor:
    """:func:`_prefix` as a scan along the leading axis of a transposed copy (the CUDA path)."""
    import torch

    s = v.shape[-1]
    cols = torch.empty((s + 1, v.numel() // max(s, 1)), dtype=v.dtype, device=v.device)
    cols[0] = 0.0
    torch.cumsum(v.reshape(-1, s).t().contiguous(), 0, out=cols[1:])
    return cols.t().contiguous().view(*v.shape[:-1], s + 1)


def _band(lo_um: torch.Tensor, hi_um: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample index range ``[i0, i1)`` (int64) of ``lo_um <= t <= hi_um``, within [0, s]."""
    import torch

    i0 = (lo_um / RAY_STEP_UM).ceil().long().clamp(0, s)
    i1 = ((hi_um / RAY_STEP_UM).floor().long() + 1).clamp(0, s)
    return i0, torch.maximum(i0, i1)


def _band_sum(prefix: torch.Tensor, i0: torch.Tensor | None, i1: torch.Tensor) -> torch.Tensor:
    """Sum over samples [i0, i1) from prefix sums (K, A, S + 1); i0, i1 broadcast to (K, A);
    i0 None: from the first sample (prefix 0, no gather)."""
    shape = prefix.shape[:-1]
    hi = prefix.gather(-1, i1.expand(shape).unsqueeze(-1)).squeeze(-1)
    if i0 is None:
        return hi
    lo = prefix.gather(-1, i0.expand(shape).unsqueeze(-1)).squeeze(-1)
    return hi - lo


def _band_mean(
    prefix: torch.Tensor, wprefix: torch.Tensor, i0: torch.Tensor | None, i1: torch.Tensor
) -> torch.Tensor:
    """Weighted mean over samples [i0, i1) (i0 None: from 0) from the prefix sums of ``v * w``
    (K, A, S + 1) and of the weights (S + 1,); 0 where the band is empty, as :func:`_wmean`
    gives."""
    num = _band_sum(prefix, i0, i1)
    if i0 is None:
        den, empty = wprefix[i1], i1 <= 0
    else:
        den, empty = wprefix[i1] - wprefix[i0], i1 <= i0
    return (num / den.expand(num.shape).clamp_min(1e-9)).masked_fill(empty.expand(num.shape), 0.0)


def _band_end(hi_um: torch.Tensor, s: int) -> torch.Tensor:
    """End ``i1`` of the band ``0 <= t <= hi_um``: :func:`_band` from 0 (whose start is 0)."""
    return ((hi_um / RAY_STEP_UM).floor().long() + 1).clamp(0, s)


def _nucleus_mean(wcum: torch.Tensor, wpre: torch.Tensor, edge_um: torch.Tensor) -> torch.Tensor:
    """(K,) mean over rays of the annulus-weighted mean over the nucleus body ``[0, 0.8 edge]``,
    from the prefix sums (K, A, S + 1) of a map x (t + step / 2) and of the weights (S + 1,)."""
    return _band_mean(wcum, wpre, None, _band_end(0.8 * edge_um, wcum.shape[-1] - 1)).mean(1)


def _neighbours(
    tile: torch.Tensor, yx: torch.Tensor, n_tiles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest neighbours within each tile: (K, n) global indices (-1 none), distances, density."""
    import torch

    k_all = tile.numel()
    dev = yx.device
    if k_all == 0:
        z = torch.zeros((0, N_NEIGHBOURS), device=dev)
        return z.long(), z, torch.zeros(0, device=dev)
    offsets, pos, kmax = tile_slots(tile, n_tiles)
    pad = torch.full((n_tiles, kmax, 2), math.inf, device=dev)
    pad[tile, pos] = yx
    d = torch.cdist(pad, pad)  # (N, kmax, kmax); inf rows/cols for padding
    d = torch.nan_to_num_(d, nan=math.inf, posinf=math.inf)
    d.diagonal(dim1=1, dim2=2).fill_(math.inf)  # not one's own neighbour
    dc = d[tile, pos]  # (K, kmax)
    density = (dc < DENSITY_RADIUS_UM).sum(1).float()
    n = min(N_NEIGHBOURS, kmax)
    nd, ni = torch.topk(dc, n, dim=1, largest=False) if n else (dc[:, :0], dc[:, :0].long())
    gi = ni + offsets[tile].unsqueeze(1)
    gi = torch.where(torch.isfinite(nd), gi, torch.full_like(gi, -1))
    if n < N_NEIGHBOURS:
        fill = N_NEIGHBOURS - n
        gi = torch.cat([gi, torch.full((k_all, fill), -1, device=dev, dtype=gi.dtype)], 1)
        nd = torch.cat([nd, torch.full((k_all, fill), math.inf, device=dev)], 1)
    return gi, nd, density


def sample_rays(
    maps: torch.Tensor,
    meas_mpp: float,
    tile: torch.Tensor,
    yx_um: torch.Tensor,
    radius_um: torch.Tensor,
    dab_cells: torch.Tensor | None = None,
    nucleus_dab: bool = False,
) -> Rays:
    """Sample haematoxylin and DAB along rays around each detected nucleus.

    Parameters
    ----------
    maps : Tensor (N, 2, H, W) float32
        Haematoxylin and DAB OD at ``meas_mpp``.
    tile, yx_um, radius_um : Tensor (K,), (K, 2), (K,)
        Detections (tile index, centre in um, LoG radius in um), ordered by tile.
    dab_cells : Tensor (K,) bool, optional
        Cells whose DAB rays may be measured later (default: all). The others (e.g. cells of a
        tile's halo, kept only as neighbours) get haematoxylin only, and only as far out as their
        nucleus measurement reads (:func:`_h_samples`), when that saves samples; their nucleus
        features are the same.
    nucleus_dab : bool
        Trace the nucleus outline on haematoxylin and DAB (their larger, see :func:`_nucleus`)
        instead of haematoxylin (markers whose nuclei are found on both: a Ki-67-positive nucleus
        is brown and, where the slide's DAB hue differs from the unmixing vector, reads little or
        even negative haematoxylin, so its haematoxylin outline shrinks to a sliver), and
        measure every cell's nucleus DAB (``Rays.nucleus_dab_od``). The nucleus darkness
        features stay haematoxylin: a positive nucleus is not denser chromatin (the cell-type
        classifier leaves them unread where DAB masks them, see ``cell_features``).
    """
    import torch

    dev = maps.device
    n_tiles = maps.shape[0]
    k_all = tile.numel()
    a = RAY_ANGLES
    t = torch.arange(0.0, RAY_MAX_UM + 1e-6, RAY_STEP_UM, device=dev)
    s = t.numel()
    theta = torch.arange(a, device=dev, dtype=torch.float32) * (2 * math.pi / a)
    dirs = torch.stack([torch.sin(theta), torch.cos(theta)], 1)  # (A, 2) as (dy, dx)
    nb_index, nb_dist, density = _neighbours(tile, yx_um, n_tiles)
    if k_all == 0:
        z = torch.zeros(0, device=dev)
        return Rays(
            tile=tile,
            yx_um=yx_um,
            centre_um=yx_um,
            dab=torch.zeros((0, a, s), device=dev),
            dab_row=torch.zeros(0, dtype=torch.long, device=dev),
            t_um=t,
            edge_um=torch.zeros((0, a), device=dev),
            area_um2=z,
            elongation=z,
            h_nucleus=z,
            h_around=z,
            density=z,
            nb_index=nb_index,
            nb_dist_um=nb_dist,
            nucleus_dab_od=z if nucleus_dab else None,
        )
    r0 = radius_um.clamp(2.0, 8.0)
    offsets = (t.view(1, s, 1) * dirs.view(a, 1, 2)).reshape(a * s, 2)  # ray points around a centre
    short, s_short = _short_rays(r0, dab_cells, s)
    if short is None:
        samp = sample_points(maps, meas_mpp, tile, yx_um, offsets)  # (K, 2, A*S)
        h = samp[:, 0].reshape(k_all, a, s)
        dab = samp[:, 1].reshape(k_all, a, s)
        edge, h_nuc, hb, dab_nuc = _nucleus(h, t, r0, dab if nucleus_dab else None)
        dab_row = torch.arange(k_all, device=dev)
    else:
        # Two groups: full rays with DAB, and haematoxylin-only rays of s_short samples.
        full = (~short).nonzero(as_tuple=True)[0]
        part = short.nonzero(as_tuple=True)[0]
        samp = sample_points(maps, meas_mpp, tile[full], yx_um[full], offsets)  # (F, 2, A*S)
        dab = samp[:, 1].reshape(full.numel(), a, s)
        got_f = _nucleus(
            samp[:, 0].reshape(full.numel(), a, s), t, r0[full], dab if nucleus_dab else None
        )
        off_s = offsets.view(a, s, 2)[:, :s_short].reshape(a * s_short, 2)
        nch = 2 if nucleus_dab else 1
        h_s = sample_points(maps[:, :nch], meas_mpp, tile[part], yx_um[part], off_s)
        h_s = h_s.reshape(part.numel(), nch, a, s_short)
        got_s = _nucleus(h_s[:, 0], t[:s_short], r0[part], h_s[:, 1] if nucleus_dab else None)
        edge, h_nuc, hb = (
            _merge(k_all, full, f, part, g) for f, g in zip(got_f[:3], got_s[:3], strict=True)
        )
        df, ds = got_f[3], got_s[3]
        dab_nuc = None if df is None or ds is None else _merge(k_all, full, df, part, ds)
        dab_row = torch.full((k_all,), -1, dtype=torch.long, device=dev)
        dab_row[full] = torch.arange(full.numel(), device=dev)
    # Outline moments on all cells at once: a matrix product's rounding can depend on a row's
    # place in the batch, and each cell's features must not depend on the grouping.
    area, elong, m1 = _outline_moments(edge, dirs)
    # Centre of the measured outline (the star polygon's area centroid: each ray's triangle has
    # area ~ edge^2 and its centroid 2/3 of the way out). The LoG peak sits on a ~1 um grid and
    # drifts with chromatin texture and lobes (median 0.33 um off the true centre of synthetic
    # tumour nuclei, against 0.10 um for the outline centroid); cell edges are bisectors between
    # centres, so that error moves the edge a neighbour's membrane is told apart by.
    shift = m1 * (MAX_CENTRE_SHIFT_UM / m1.norm(dim=1, keepdim=True).clamp_min(MAX_CENTRE_SHIFT_UM))
    return Rays(
        tile=tile,
        yx_um=yx_um,
        centre_um=yx_um + shift,
        dab=dab,
        dab_row=dab_row,
        t_um=t,
        edge_um=edge,
        area_um2=area,
        elongation=elong,
        h_nucleus=h_nuc,
        h_around=hb,
        density=density,
        nb_index=nb_index,
        nb_dist_um=nb_dist,
        nucleus_dab_od=dab_nuc,
    )


def _h_samples(r0: torch.Tensor) -> torch.Tensor:
    """(K,) int64: how many samples from the centre :func:`_nucleus` reads on each ray of a cell
    of LoG radius ``r0`` (clamped to [2, 8] um): through the surroundings ring and through the
    edge search's limit (the same float expressions as there, so the count is exact)."""
    import torch

    ring_end = ((r0 + 4.0) / RAY_STEP_UM).floor().long() + 1  # _band's end of the ring
    _, i_lim = _edge_limit(r0)
    return torch.maximum(ring_end, i_lim + 1)


def _edge_limit(r0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) furthest nucleus edge (um) the edge search of :func:`_nucleus` accepts for LoG radius
    ``r0``, and its sample index (the first at or beyond it)."""
    limit = (2.2 * r0).clamp(max=RAY_MAX_UM - RAY_STEP_UM)
    return limit, (limit / RAY_STEP_UM).ceil().long()


def _short_rays(
    r0: torch.Tensor, dab_cells: torch.Tensor | None, s: int
) -> tuple[torch.Tensor | None, int]:
    """Cells sampled with haematoxylin-only rays of ``s_short`` samples, and ``s_short``: among
    the cells without DAB, those whose nucleus fits in the length that saves most samples; None
    when that saves nothing."""
    import torch

    if dab_cells is None or r0.numel() == 0:
        return None, s
    need = torch.where(dab_cells, s, _h_samples(r0).clamp(max=s))
    counts = torch.bincount(need, minlength=s + 1).cumsum(0)  # cells that fit in n samples
    saved = counts * (s - torch.arange(s + 1, device=r0.device))
    best = int(saved.argmax())
    if int(saved[best]) == 0:
        return None, s
    return need <= best, best


def _merge(
    k: int, i: torch.Tensor, a: torch.Tensor, j: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Rows ``a`` at indices ``i`` and rows ``b`` at ``j`` of a new (k, ...) tensor."""
    import torch

    out = torch.empty((k, *a.shape[1:]), dtype=a.dtype, device=a.device)
    out[i] = a
    out[j] = b
    return out


def _nucleus(
    h: torch.Tensor, t: torch.Tensor, r0: torch.Tensor, dab: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nucleus outline from haematoxylin rays ``h`` (K, A, S) at radii ``t`` (S,): (edge (K, A),
    mean haematoxylin in the nucleus, haematoxylin around it (K,), mean DAB in the nucleus (K,)
    or None). Reads the first :func:`_h_samples` samples of each ray only.

    With ``dab`` (K, A, S), the DAB rays, the outline is traced on the larger of haematoxylin and
    DAB at each sample (a nuclear marker's positive nuclei are brown, not blue), while the two
    haematoxylin means stay haematoxylin, and the nucleus's mean DAB is returned too.

    The larger, not the sum: where a pixel's hue lies off the plane of the two stain vectors
    (saturated, near-black or JPEG-blocked brown on BCData 6_2: RGB (41, 0, 0) or (75, 31, 2)),
    the unmixing splits its absorbance into two large readings of opposite sign (haematoxylin
    -1.7 and DAB +1.7 OD, then x2.5 counterstain scaling), whose sum is ~0 inside a dark nucleus.
    On the sum, outlines of such nuclei broke off at those pixels: 6_2's positive nuclei read
    0.73 of the labelled mask's area (median), and 0.98 on the larger of the two."""
    import torch

    _, a, s = h.shape
    # Weighted means over radial bands by prefix sums (see _band); weights t + step / 2 give each
    # sample the area of its annulus. Haematoxylin bands end by 0.8 x the largest nucleus edge
    # (< RAY_MAX_UM), so the prefix sums stop there (a prefix does not depend on later samples).
    s_nuc = min(s, math.floor(0.8 * RAY_MAX_UM / RAY_STEP_UM) + 1)
    wpre = _prefix(t + RAY_STEP_UM / 2)
    hw = _prefix(h[..., :s_nuc] * (t[:s_nuc] + RAY_STEP_UM / 2))
    # Surroundings: the darkest sample of each ray in [r0 + 1.5, r0 + 4] um (at most 6 samples,
    # always inside the ray since r0 <= 8), then the median over rays.
    i0, i1 = _band(r0 + 1.5, r0 + 4.0, s)
    span = torch.arange(math.floor(2.5 / RAY_STEP_UM) + 1, device=h.device)
    ring_idx = torch.minimum(i0.view(-1, 1) + span, (i1 - 1).view(-1, 1))  # (K, 6)

    def ring(x: torch.Tensor) -> torch.Tensor:
        ring_min = x.gather(2, ring_idx.unsqueeze(1).expand(-1, a, -1)).amin(2)  # (K, A)
        return ring_min.median(1).values.clamp_min(0.0)

    hb = ring(h)
    ow, ob = hw, hb  # the map the outline is traced on: its prefix sums and surroundings
    if dab is not None:
        h = torch.maximum(dab, h)
        # Only the centre band reads these prefix sums: it ends by 0.5 x r0 <= 4 um (r0 <= 8).
        n0 = min(s_nuc, math.floor(4.0 / RAY_STEP_UM) + 1)
        ow, ob = _prefix(h[..., :n0] * (t[:n0] + RAY_STEP_UM / 2)), ring(h)
    i_centre = _band_end((0.5 * r0).clamp_min(1.0), ow.shape[-1] - 1).view(-1, 1)
    h0 = _band_mean(ow, wpre, None, i_centre)
    h0 = h0.mean(1)
    thr = 0.5 * (h0 + ob)
    # Nucleus edge per ray: the first sample (after the centre) below half-way between centre and
    # surroundings, or the first at or beyond ``limit``.
    limit, i_lim = _edge_limit(r0)
    i_lim = i_lim.view(-1, 1)
    below = h < thr.view(-1, 1, 1)
    below[..., 0] = False
    idx = below.view(torch.uint8).argmax(2)  # first True, or 0 when none (bytes: no copy)
    found = below.gather(2, idx.unsqueeze(2)).squeeze(2)
    first = torch.where(found, torch.minimum(idx, i_lim), i_lim.expand_as(idx)).clamp_min(1)
    hi = h.gather(2, first.unsqueeze(2)).squeeze(2)
    lo = h.gather(2, (first - 1).unsqueeze(2)).squeeze(2)
    frac = ((lo - thr.view(-1, 1)) / (lo - hi).clamp_min(1e-6)).clamp(0, 1)
    edge = (first.float() - 1 + frac) * RAY_STEP_UM
    edge = torch.minimum(edge.clamp_min(0.75), limit.view(-1, 1))
    dab_nuc = None
    if dab is not None:
        dab_nuc = _nucleus_mean(
            _prefix(dab[..., :s_nuc] * (t[:s_nuc] + RAY_STEP_UM / 2)), wpre, edge
        )
    return edge, _nucleus_mean(hw, wpre, edge), hb, dab_nuc


def _outline_moments(
    edge: torch.Tensor, dirs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area (K,), elongation (K,) and centroid from the ray origin (K, 2) of the star outlines
    with ``edge`` (K, A) along ``dirs`` (A, 2)."""
    a = edge.shape[1]
    area = 0.5 * (edge**2).sum(1) * (2 * math.pi / a)
    # Elongation from the second moments of the filled outline (as regionprops measures it), not
    # of the outline points: at equal angles those crowd where the outline is close and read an
    # ellipse of aspect 1.8 as ~1.3. Each ray's triangle (area r^2 / 2 per radian) contributes
    # r^4 / 4 u u^T per radian about the ray origin, and r^3 / 3 u to the first moment.
    e2 = edge * edge
    w_area = 0.5 * e2.sum(1)
    m1 = ((e2 * edge) @ dirs) / (3.0 * w_area.unsqueeze(1))  # (K, 2) centroid from the origin
    e4 = e2 * e2 / 4.0
    cyy = (e4 @ (dirs[:, 0] ** 2)) / w_area - m1[:, 0] ** 2
    cxx = (e4 @ (dirs[:, 1] ** 2)) / w_area - m1[:, 1] ** 2
    cxy = (e4 @ (dirs[:, 0] * dirs[:, 1])) / w_area - m1[:, 0] * m1[:, 1]
    tr, det = cyy + cxx, cyy * cxx - cxy**2
    disc = (tr * tr / 4 - det).clamp_min(0).sqrt()
    elong = ((tr / 2 + disc) / (tr / 2 - disc).clamp_min(1e-6)).sqrt().clamp(1.0, 10.0)
    return area, elong, m1


def measure_compartments(
    rays: Rays,
    body_radius_um: torch.Tensor,
    membrane_cut: float,
    maps: torch.Tensor,
    meas_mpp: float,
    ridge_od: float = 0.04,
    ridge_rel: float = 0.15,
    typical_size: torch.Tensor | None = None,
    cells: torch.Tensor | None = None,
) -> Compartments:
    """Cytoplasm and membrane DAB of each cell from its rays and its neighbours' positions.

    Parameters
    ----------
    rays : Rays
    body_radius_um : Tensor (K,)
        Expected cell body radius by cell type (the power-diagram weight and the outer cap).
    membrane_cut : float
        DAB OD at which a ray's membrane counts as stained (the marker's cut).
    maps : Tensor (N, 2, H, W)
        Haematoxylin and DAB OD at ``meas_mpp`` (the membrane is re-sampled finely across the edge).
    ridge_od, ridge_rel : float
        A stained membrane must also stand above the cytoplasm next to it by ``ridge_od`` or
        ``ridge_rel`` x that cytoplasm's DAB, whichever is more, so brown cytoplasm with a pale
        membrane (PD-L1 cytoplasmic-only staining) is not membrane. The membrane is the highest
        DAB sample in a band reaching 1.25 um into the cell, the cytoplasm a band mean: over
        uniformly brown cytoplasm the maximum stands above the mean by the noise alone, and OD
        noise grows with the OD. With 0.04 OD only, cytoplasmic-only tumour cells (0.3-0.5 OD)
        passed on 4 of 16 rays (coverage 0.25 >= 0.2) and 8 of 48 synthetic PD-L1 cases
        (CPS < 1, 1-19, >= 20; seeds 21-28, raw and JPEG) missed truth, CPS < 1 reading up to 1.6;
        with the relative term 2 of 48 (mean |CPS error| on CPS < 1 0.38 -> 0.19, 1-19 0.23 ->
        0.24, >= 20 1.16 -> 1.12). An absolute 0.06-0.08 did about as well on CPS < 1 but
        lost weak membranes on pale cytoplasm (1-19: 0.28).
    typical_size : Tensor (K,) bool, optional
        Cells whose body radius is a typical size for their type rather than measured (tumour
        cells, macrophages): on their rays that face stroma the membrane is searched for around
        it (:func:`_free_edge`). Default: none.
    cells : Tensor (M,) int64, optional
        Measure only these cells (indices into ``rays``), e.g. those a tile counts; their
        neighbours are still every cell of ``rays``. The result has M entries (default: all K).
    """
    import torch

    _, a, s = rays.dab.shape
    dev = rays.dab.device
    theta = torch.arange(a, device=dev, dtype=torch.float32) * (2 * math.pi / a)
    dirs = torch.stack([torch.sin(theta), torch.cos(theta)], 1)  # (A, 2)

    def rows(v: torch.Tensor) -> torch.Tensor:
        """The measured cells' rows of a per-cell tensor (neighbours: looked up in all)."""
        return v if cells is None else v[cells]

    tile, centre, nb_index, edge_um = (
        rows(v) for v in (rays.tile, rays.centre_um, rays.nb_index, rays.edge_um)
    )
    k_all = tile.numel()
    if k_all == 0:
        z = torch.zeros(0, device=dev)
        return Compartments(torch.zeros((0, a), device=dev), z, z, z, z, z)
    ray_dab, body = rays.dab_rays(cells), rows(body_radius_um)
    dab_wcum = _prefix(ray_dab * (rays.t_um + RAY_STEP_UM / 2))  # Rays.dab_wcum of these rows
    valid = nb_index >= 0
    nbi = nb_index.clamp_min(0)
    # Cell edges are found from the outline centres; the ray samples were taken from the detected
    # centres, so band limits on them are moved by each ray's lag (ray frame = centre frame + lag).
    lag = rows(rays.lag_um(dirs))  # (K, A)
    d = rays.centre_um[nbi] - centre.unsqueeze(1)  # (K, n, 2)
    d2 = (d**2).sum(-1)
    rho_i = body.view(-1, 1)
    rho_j = body_radius_um[nbi]
    proj = torch.einsum("knc,ac->kan", d, dirs)  # (K, A, n)
    num = (d2 + rho_i**2 - rho_j**2).unsqueeze(1)
    tb = torch.where(
        (proj > 1e-3) & valid.unsqueeze(1),
        num / (2 * proj.clamp_min(1e-3)),
        torch.full_like(proj, math.inf),
    )
    tb_min, slot = tb.min(2)  # (K, A): nearest boundary on each ray and the neighbour it faces
    cap = body.view(-1, 1)
    shared = tb_min < cap  # the ray ends on an edge shared with a neighbour
    # Rays that end on no neighbour face stroma: there the cell's own stained membrane is the DAB
    # ridge near the typical body radius, wherever the cell's true size puts it.
    edge0 = torch.where(shared, tb_min, cap.expand_as(tb_min))
    if typical_size is not None:
        # Only cells with a ray that meets no neighbour (most cells inside a nest have none).
        need = (rows(typical_size) & ~shared.all(1)).nonzero(as_tuple=True)[0]
        if need.numel():
            cap_n, lag_n = cap[need], lag[need]
            free_edge = _free_edge(ray_dab[need], edge_um[need], cap_n + lag_n, ridge_od)
            free_edge = torch.minimum(free_edge - lag_n, cap_n + FREE_EDGE_OUT_UM)
            edge0[need] = torch.where(shared[need], edge0[need], free_edge)
    # At least 0.5 um outside the nucleus, and the ray-frame bands below within the rays.
    edge0 = torch.maximum(edge0, edge_um - lag + 0.5)
    edge0 = torch.minimum(edge0, RAY_MAX_UM - MEMBRANE_OUT_UM - lag.abs().amax(1, keepdim=True))
    # Fine haematoxylin and DAB profiles across the cell edge on every ray; shared edges are
    # moved onto the counterstained border line.
    prof_h, dab = _edge_profile(maps, meas_mpp, tile, centre, dirs, edge0)  # (K, A, P) each
    off = torch.tensor(EDGE_OFFSETS_UM, device=dev)
    shift = _edge_shift(prof_h, off, slot, shared, proj, d2.sqrt(), nbi.shape[1])
    shift = torch.maximum(shift, edge_um - lag + 0.5 - edge0)
    shift = torch.minimum(shift, RAY_MAX_UM - RAY_STEP_UM - lag - edge0)
    edge_cell = edge0 + shift
    en, ec = edge_um, edge_cell + lag  # both in the ray frame
    wpre = _prefix(rays.t_um + RAY_STEP_UM / 2)
    # Cytoplasm: [nucleus edge + 0.75, cell edge - 1] um, or [+ 0.25, cell edge] when that is empty.
    c0, c1 = _band(en + 0.75, ec - 1.0, s)
    f0, f1 = _band(en + 0.25, ec, s)
    has = c1 > c0
    cyto_ray = _band_mean(dab_wcum, wpre, torch.where(has, c0, f0), torch.where(has, c1, f1))
    cytoplasm = cyto_ray.mean(1)  # (K,)
    # The DAB profile's peak next to the (moved) edge is the membrane. Offsets from the moved
    # edge: off - shift.
    rel = off.view(1, 1, -1) - shift.unsqueeze(2)  # (K, A, P)
    inside = (rel >= -MEMBRANE_IN_UM) & (rel <= MEMBRANE_OUT_UM)
    mem_ray = dab.masked_fill(~inside, -math.inf).amax(2)
    # Which side of the edge the stain lies on: DAB half a ring width inside the edge against the
    # same distance outside. A neighbour's stained ring is darker outside, the cell's own inside.
    # Local and without tolerance on purpose. Chroma subsampling (JPEG 4:2:0, as scanners store
    # slides) smears DAB one pixel each way and turns the lost chroma of a dark ring into
    # haematoxylin, which pulls the border-line estimate (_edge_shift) ~0.25 um onto a
    # neighbour's ring; the centroid of the whole profile's DAB excess, with 0.1 um tolerance,
    # then read that ring as the cell's own (truth-negative cells at 0.2-0.4 coverage). The ring
    # still keeps the stronger DAB on its own side. A border with both rings stained is even:
    # one of the two cells claims it, as the centroid test did.
    own_side = _profile_at(dab, shift - SIDE_PROBE_UM) >= _profile_at(dab, shift + SIDE_PROBE_UM)
    # Cytoplasm just inside the membrane, unweighted: [max(cell edge - 3, nucleus edge + 0.5),
    # cell edge - 1.5] um, or the whole cytoplasm when that is empty.
    i0, i1 = _band(torch.maximum(ec - 3.0, en + 0.5), ec - 1.5, s)
    count = torch.arange(s + 1, device=dev, dtype=ray_dab.dtype)
    inner_ray = torch.where(i1 > i0, _band_mean(_prefix(ray_dab), count, i0, i1), cyto_ray)
    ridge = (ridge_rel * inner_ray).clamp_min(ridge_od)
    stained = (mem_ray >= membrane_cut) & (mem_ray - inner_ray >= ridge)
    stained &= own_side
    coverage = stained.float().mean(1)
    membrane = mem_ray.mean(1)
    mstained = _wmean(mem_ray, stained.float(), 1)
    nucleus = _nucleus_mean(dab_wcum, wpre, edge_um)  # Rays.dab_nucleus of these rows
    return Compartments(edge_cell, nucleus, cytoplasm, membrane, mstained, coverage)


def _edge_profile(
    maps: torch.Tensor,
    meas_mpp: float,
    tile: torch.Tensor,
    yx_um: torch.Tensor,
    dirs: torch.Tensor,
    edge_um: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Haematoxylin and DAB at ``EDGE_OFFSETS_UM`` around each ray's cell edge: (K, A, P) each."""
    import torch

    k_all, a = edge_um.shape
    off = torch.tensor(EDGE_OFFSETS_UM, device=maps.device)
    p = off.numel()
    t = edge_um.unsqueeze(2) + off.view(1, 1, -1)  # (K, A, P)
    samp = sample_points(maps, meas_mpp, tile, yx_um, t, dirs)  # (K, 2, A*P), channel-major
    h, dab = samp.transpose(0, 1).reshape(2, k_all, a, p)
    return h, dab


def _profile_at(prof: torch.Tensor, x_um: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of edge profiles ``prof`` (K, A, P), sampled at ``EDGE_OFFSETS_UM``,
    at offsets ``x_um`` (K, A) (clamped to the sampled range)."""
    lo, step = EDGE_OFFSETS_UM[0], EDGE_OFFSETS_UM[1] - EDGE_OFFSETS_UM[0]
    p = prof.shape[2]
    f = ((x_um - lo) / step).clamp(0.0, p - 1.0)
    i0 = f.floor().long().clamp(max=p - 2)
    w = f - i0
    a = prof.gather(2, i0.unsqueeze(2)).squeeze(2)
    b = prof.gather(2, (i0 + 1).unsqueeze(2)).squeeze(2)
    return a + w * (b - a)


def _free_edge(
    dab: torch.Tensor, nucleus_edge_um: torch.Tensor, cap_um: torch.Tensor, ridge_od: float
) -> torch.Tensor:
    """Cell edge on rays that face stroma, from the DAB along each ray: (K, A) um in the ray
    frame, ``cap_um`` where no membrane ridge is found.

    The membrane is the strongest DAB sample in ``[cap - FREE_EDGE_IN_UM, cap + FREE_EDGE_OUT_UM]``
    (at least 1 um outside the nucleus) that stands ``ridge_od`` above both the cytoplasm 1.5-3 um
    inside it and the stroma 1.5 um outside it; the edge is half a micron beyond it (the membrane
    ring lies just inside the cell's border). Brown cytoplasm fading into stroma has no such
    ridge, so cytoplasmic-only staining keeps the cap.

    Parameters
    ----------
    dab : Tensor (K, A, S)
        DAB OD along each ray, every ``RAY_STEP_UM`` from the ray origin.
    nucleus_edge_um, cap_um : Tensor (K, A), (K, 1) or (K, A)
        Nucleus edge and the cell's typical body radius along each ray (ray frame).
    """
    import torch

    k_all, a, s = dab.shape
    idx = torch.arange(s, device=dab.device).view(1, 1, -1)
    lo = torch.maximum(cap_um - FREE_EDGE_IN_UM, nucleus_edge_um + 1.0)
    lo_i = (lo / RAY_STEP_UM).ceil().long().unsqueeze(2)
    hi_i = ((cap_um + FREE_EDGE_OUT_UM) / RAY_STEP_UM).floor().long().expand(k_all, a).unsqueeze(2)
    hi_i = hi_i.clamp(max=s - 1 - round(1.5 / RAY_STEP_UM))
    win = (idx >= lo_i) & (idx <= hi_i)
    peak, at = dab.masked_fill(~win, -math.inf).max(2)  # (K, A)
    step_in, step_out = round(1.5 / RAY_STEP_UM), round(3.0 / RAY_STEP_UM)
    back = torch.arange(step_in, step_out + 1, device=dab.device)
    ins = dab.gather(2, (at.unsqueeze(2) - back).clamp_min(0)).mean(2)
    out = dab.gather(2, (at + step_in).clamp(max=s - 1).unsqueeze(2)).squeeze(2)
    ridge = (peak - ins >= ridge_od) & (peak - out >= ridge_od) & torch.isfinite(peak)
    edge = at.to(dab.dtype) * RAY_STEP_UM + 0.5
    return torch.where(ridge, edge, cap_um.expand(k_all, a))


def _edge_shift(
    h_prof: torch.Tensor,
    off: torch.Tensor,
    slot: torch.Tensor,
    shared: torch.Tensor,
    proj: torch.Tensor,
    dist: torch.Tensor,
    n_nb: int,
) -> torch.Tensor:
    """How far (um, along each ray) the edge shared with a neighbour lies from the power-diagram
    estimate, measured on the counterstained cell border: (K, A), 0 on rays without a neighbour.

    Cell borders carry a faint haematoxylin line centred on the true edge, whatever either cell's
    DAB. Body sizes differ from cell to cell, so a power diagram with one radius per type puts a
    whole shared edge up to ~1 um to one side; every ray on that edge is off the same way, and a
    neighbour's stained membrane then reads as the cell's own. The line's offset is measured on
    each ray (centroid of the haematoxylin excess in the profile), turned into a distance across
    the edge, averaged over the rays that share the edge (one straight edge per neighbour), and
    turned back into a distance along each ray.

    Parameters
    ----------
    h_prof : Tensor (K, A, P)
        Haematoxylin OD at ``off`` (P,) um from each ray's estimated edge.
    slot, shared : Tensor (K, A)
        Neighbour slot of each ray's edge, and whether the edge is shared at all.
    proj : Tensor (K, A, n)
        Ray direction dotted with the vector to each neighbour (um).
    dist : Tensor (K, n)
        Distance to each neighbour (um).
    """
    import torch

    ex = (h_prof - h_prof.amin(2, keepdim=True)).clamp_min(0)
    along = _wmean(off.view(1, 1, -1).expand_as(ex), ex, 2)  # (K, A)
    cos = proj.gather(2, slot.unsqueeze(2)).squeeze(2) / dist.gather(1, slot).clamp_min(1e-6)
    w = shared.to(along.dtype)
    across = torch.zeros((slot.shape[0], n_nb), dtype=along.dtype, device=along.device)
    count = torch.zeros_like(across)
    across.scatter_add_(1, slot, along * cos * w)
    count.scatter_add_(1, slot, w)
    per_edge = across / count.clamp_min(1.0)
    shift = per_edge.gather(1, slot) / cos.clamp_min(MIN_EDGE_COS)
    return (shift * w).clamp(-MAX_EDGE_SHIFT_UM, MAX_EDGE_SHIFT_UM)
