"""The scoring model: RGB tiles in, typed cells with compartment DAB and per-tile counts out.

``CellScorer`` is a ``torch.nn.Module`` whose state (stain unmixing, optical-density table, cell-type
regression) is held in buffers, so ``.to(device)`` moves everything and the forward pass runs the
same on the CPU and on a GPU. Stages, all batched tensor operations:

1. colour deconvolution (``_stains``), at ~0.5 um/px;
2. nucleus detection by multi-scale LoG on a ~1 um/px grid (``_detect``);
3. ray sampling around each nucleus: outline, darkness, elongation, neighbours (``_measure``);
   a second detection of one nucleus (outline centres together) is dropped;
4. cell typing by softmax regression (``_celltype``), ``none`` detections dropped;
5. compartments: nucleus, cytoplasm, membrane (power-diagram cell edges) and the marker's rule.

Frames: input tiles are (N, 3, H, W) uint8 at ``mpp``; a ``halo_px`` border of context is measured
but only cells centred in the core ``[halo, H - halo)`` are reported and counted. Cell positions
are returned in core pixels of the input (x right, y down).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathology.scoring._celltype import (
    FIBROBLAST,
    LYMPHOCYTE,
    MACROPHAGE,
    NONE,
    TUMOR,
    CellTypeModel,
    cell_features,
)
from pathology.scoring._detect import (
    DAB_CLOSING_UM,
    DETECT_MPP,
    detect_nuclei,
    grey_closing,
    tile_slots,
)
from pathology.scoring._markers import MarkerConfig
from pathology.scoring._measure import (
    DENSITY_RADIUS_UM,
    MAX_CENTRE_SHIFT_UM,
    Compartments,
    Rays,
    _neighbours,
    measure_compartments,
    sample_rays,
)
from pathology.scoring._stains import StainEstimate, deconvolve, log_background

__all__ = ["CELL_FIELDS", "COUNT_NAMES", "CellScorer", "ScoredBatch"]

#: Microns per pixel the compartments are measured at (membranes are ~1.5 um wide).
MEASURE_MPP = 0.5
#: Expected body radius (um) per type: the power-diagram weight and the outer cap of a cell.
TUMOR_BODY_UM, MACROPHAGE_BODY_UM, THIN_RIM_UM = 12.75, 10.5, 1.0

COUNT_NAMES = (
    "tumor_cells",
    "tumor_positive",
    "immune_cells",
    "immune_positive",
    "lymphocytes",
    "macrophages",
    "other_cells",
    "tumor_bin0",
    "tumor_bin1",
    "tumor_bin2",
    "tumor_bin3",
    "immune_stained",
)
#: Per-cell record fields (see :class:`ScoredBatch`).
CELL_FIELDS = (
    "tile",
    "x",
    "y",
    "type",
    "type_prob",
    "nucleus_dab",
    "cytoplasm_dab",
    "membrane_dab",
    "membrane_coverage",
    "scored_dab",
    "intensity_bin",
    "positive",
    "nucleus_area_um2",
)


@dataclass(frozen=True)
class ScoredBatch:
    """Model output for N tiles.

    Attributes
    ----------
    counts : Tensor (N, len(COUNT_NAMES)) int64
        Per-tile counts of core cells, columns :data:`COUNT_NAMES`.
    cells : dict of str -> Tensor (K,)
        Per-cell records, keys :data:`CELL_FIELDS`: ``tile`` (index in batch), ``x``, ``y`` (core
        pixels at the input mpp), ``type`` (0 tumour, 1 lymphocyte, 2 macrophage, 3 other),
        DAB OD per compartment, membrane coverage (0-1), the marker's scored value, intensity bin
        (0-3), ``positive`` (False for types the marker does not score) and nucleus area.
    """

    counts: torch.Tensor
    cells: dict[str, torch.Tensor]


class CellScorer(nn.Module):
    """Physics-based IHC cell scorer.

    Parameters
    ----------
    marker : MarkerConfig
    mpp : float
        Microns per pixel of the input tiles.
    cell_types : CellTypeModel
    stains : StainEstimate, optional
        Slide stains and glass brightness; reference H-DAB and white glass by default.
    halo_px : int
        Context border on each side of the input tiles (not counted).
    """

    def __init__(
        self,
        marker: MarkerConfig,
        mpp: float,
        cell_types: CellTypeModel,
        stains: StainEstimate | None = None,
        halo_px: int = 0,
    ) -> None:
        super().__init__()
        if not (isinstance(mpp, (int, float)) and 0.05 <= mpp <= 2.0):
            raise ValueError(f"mpp must be 0.05-2.0 um/px for cell scoring, got {mpp!r}")
        self.marker = marker
        self.mpp = float(mpp)
        self.halo_px = int(halo_px)
        self.meas_factor = max(1, round(MEASURE_MPP / self.mpp))
        self.meas_mpp = self.mpp * self.meas_factor
        self.det_factor = max(1, round(DETECT_MPP / self.meas_mpp))
        self.det_mpp = self.meas_mpp * self.det_factor
        st = stains or StainEstimate()
        self.stains = st
        unmix = np.linalg.inv(st.stains.complete())[:, :2]
        # Counterstain normalisation: scaling the haematoxylin column of the unmixing matrix scales
        # the haematoxylin map at no cost; the DAB column stays absolute (intensity bins are OD).
        unmix = (unmix * np.array([st.h_scale, 1.0])).astype(np.float32)
        self.register_buffer("log_i0", torch.from_numpy(log_background(st.background)))
        self.register_buffer("unmix", torch.from_numpy(np.ascontiguousarray(unmix)))
        self.register_buffer("tw", torch.from_numpy(cell_types.weights))
        self.register_buffer("tb", torch.from_numpy(cell_types.bias))
        self.register_buffer("tmean", torch.from_numpy(cell_types.mean))
        self.register_buffer("tscale", torch.from_numpy(cell_types.scale))
        hw, hb = cell_types.hidden_weights, cell_types.hidden_bias
        self.register_buffer("thw", None if hw is None else torch.from_numpy(hw))
        self.register_buffer("thb", None if hb is None else torch.from_numpy(hb))
        #: Seconds per step of the forward pass, accumulated while this is a dict (see
        #: :meth:`step_times`); None (the default) records nothing.
        self.timings: dict[str, float] | None = None
        rules = marker.cells
        mem_rules = [r for r in rules.values() if "membrane" in r.compartments]
        self.membrane_cut = mem_rules[0].cut if mem_rules else 0.2

    # -- step timing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _step(self, name: str, ref: torch.Tensor) -> Iterator[None]:
        """Add the wall time of the block to ``self.timings[name]`` when timing is on, waiting
        for the device before and after (so GPU work is charged to the step that queued it)."""
        if self.timings is None:
            yield
            return
        _sync(ref.device)
        t0 = time.perf_counter()
        yield
        _sync(ref.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def step_times(self) -> Iterator[dict[str, float]]:
        """Time each step of the forward passes run inside the block::

            with scorer.step_times() as t:
                scorer(tiles)
            # t: {"deconvolve": s, "detect": s, "rays": s, "typing": s, "compartments": s, ...}

        Steps: ``deconvolve`` (OD maps), ``detect`` (LoG and peaks), ``rays`` (ray sampling and
        nucleus features), ``typing`` (cell-type regression and the kept cells' neighbours),
        ``compartments`` (cell edges, cytoplasm and membrane), ``counts`` (the marker rule and the
        per-tile counts). Device synchronisation per step makes timed passes slightly slower.
        """
        self.timings = {}
        try:
            yield self.timings
        finally:
            self.timings = None

    # -- stages ------------------------------------------------------------------------------
    def stain_maps(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 2, h, w) haematoxylin and DAB OD at the measuring resolution (a view of stain-major
        storage: ``maps[:, 0]`` is contiguous)."""
        conc = deconvolve(tiles, torch.as_tensor(self.log_i0), torch.as_tensor(self.unmix))
        if self.meas_factor > 1:
            # Pool the stain-major (k, N, H, W) storage, keeping that layout (see ``deconvolve``).
            conc = mean_pool(conc.transpose(0, 1), self.meas_factor).transpose(0, 1)
        return conc

    def detect(
        self, maps: torch.Tensor, tile_hw: tuple[int, int] | None = None
    ) -> tuple[Rays, torch.Tensor, torch.Tensor]:
        """Nuclei and their ray features: (rays, LoG response, LoG radius).

        With ``tile_hw`` (the input tiles' height and width), only cells that may end up centred
        in the core get DAB rays (the others are neighbours only: their nucleus features are the
        same, ``Rays.dab_rays`` refuses them); default: every cell.
        """
        with self._step("detect", maps):
            det = mean_pool(maps[:, :1], self.det_factor)
            if self.marker.detection == "haematoxylin+dab":
                # Plus the DAB, with the gaps between a positive nucleus's stained clumps
                # closed (see DAB_CLOSING_UM), on the detection grid.
                dab = mean_pool(maps[:, 1].clamp_min(0), self.det_factor)
                det = det + grey_closing(dab, round(DAB_CLOSING_UM / self.det_mpp)).unsqueeze(1)
            peaks = detect_nuclei(det, self.det_mpp)
        with self._step("rays", maps):
            dab_cells = None
            if tile_hw is not None:
                # The outline centre moves at most MAX_CENTRE_SHIFT_UM from the detected one.
                margin = MAX_CENTRE_SHIFT_UM + 0.5
                dab_cells = self.in_core(peaks.yx_um, *tile_hw, margin_um=margin)
            # Nuclei are outlined on the map they are found on (see ``sample_rays``).
            rays = sample_rays(
                maps,
                self.meas_mpp,
                peaks.tile,
                peaks.yx_um,
                peaks.radius_um,
                dab_cells,
                nucleus_dab=self.marker.detection == "haematoxylin+dab",
            )
        return rays, peaks.response, peaks.radius_um

    def classify(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tmean, tscale, tw, tb = (
            torch.as_tensor(b) for b in (self.tmean, self.tscale, self.tw, self.tb)
        )
        z = torch.nan_to_num((feats - tmean) / tscale, nan=0.0)  # NaN: not read
        if self.thw is not None and self.thb is not None:
            z = torch.tanh(z @ torch.as_tensor(self.thw).T + torch.as_tensor(self.thb))
        z = z @ tw.T + tb
        p = torch.softmax(z, dim=1)
        prob, cls = p.max(dim=1)
        return cls, prob

    def type_cells(
        self, rays: Rays, response: torch.Tensor, radius: torch.Tensor, n_tiles: int
    ) -> tuple[Rays, torch.Tensor, torch.Tensor]:
        """Type every detection of :meth:`detect`: (rays, class (K,), its probability (K,)).

        A second detection of a nucleus (:func:`duplicate_nuclei`) is typed ``none`` and taken out
        of the other cells' neighbours and density first (the typing features read them), so the
        returned ``rays`` are those the features were computed on. ``none`` (class 4) marks what
        is neither counted nor measured.
        """
        dup = duplicate_nuclei(rays, response)
        if bool(dup.any()):
            rays = _drop_neighbours(rays, dup, n_tiles)
        feats = cell_features(rays, response, radius, self.stains.h_scale)
        cls, prob = self.classify(feats)
        return rays, cls.masked_fill(dup, NONE), prob

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tiles: torch.Tensor) -> ScoredBatch:
        """Score a batch of tiles.

        Parameters
        ----------
        tiles : Tensor (N, 3, H, W) uint8
            RGB tiles at ``self.mpp``, including ``halo_px`` of context on every side.
        """
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(
                f"tiles must be (N, 3, H, W) uint8, got {tuple(tiles.shape)} {tiles.dtype}"
            )
        n, _, hh, ww = tiles.shape
        with self._step("deconvolve", tiles):
            maps = self.stain_maps(tiles)
        rays, response, radius = self.detect(maps, (hh, ww))
        with self._step("typing", tiles):
            rays, cls, prob = self.type_cells(rays, response, radius, n)
            keep = (cls != NONE).nonzero(as_tuple=True)[0]
            rays = _neighbours_among(rays, keep, n)
        with self._step("compartments", tiles):
            body = torch.full_like(rays.area_um2, TUMOR_BODY_UM)
            mean_r = rays.edge_um.mean(1)
            body = torch.where(cls == LYMPHOCYTE, mean_r + THIN_RIM_UM, body)
            body = torch.where(cls == MACROPHAGE, torch.full_like(body, MACROPHAGE_BODY_UM), body)
            body = torch.where(cls == FIBROBLAST, mean_r + THIN_RIM_UM, body)
            # Only the kept cells centred in the core are reported, so only they are measured;
            # the halo's cells still shape their edges as neighbours.
            core = keep[self.in_core(rays.centre_um[keep], hh, ww)]
            comp = measure_compartments(
                rays,
                body,
                self.membrane_cut,
                maps,
                self.meas_mpp,
                typical_size=(cls == TUMOR) | (cls == MACROPHAGE),
                cells=core,
            )
        with self._step("counts", tiles):
            return self._score(n, rays, cls, prob, comp, core)

    def in_core(
        self, yx_um: torch.Tensor, hh: int, ww: int, margin_um: float = 0.0
    ) -> torch.Tensor:
        """Cells (K, 2 um) centred in the core ``[halo, H - halo)`` of an (hh, ww) input tile,
        grown by ``margin_um`` on every side."""
        halo = self.halo_px - margin_um / self.mpp
        y = yx_um[:, 0] / self.mpp - 0.5
        x = yx_um[:, 1] / self.mpp - 0.5
        return (y >= halo - 0.5) & (y < hh - halo - 0.5) & (x >= halo - 0.5) & (x < ww - halo - 0.5)

    def _rule(
        self, group: str, comp: Compartments, sel: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, scored value) of every cell under the marker's rule for ``group``."""
        rule = self.marker.cells.get(group)
        k = sel.numel()
        if rule is None:
            return torch.zeros(k, dtype=torch.bool, device=sel.device), torch.zeros(
                k, device=sel.device
            )
        pos_list, val_list = [], []
        for c in rule.compartments:
            if c == "nucleus":
                v = comp.nucleus
                p = v >= rule.cut
            elif c == "cytoplasm":
                v = comp.cytoplasm
                p = v >= rule.cut
            else:
                p = comp.membrane_coverage >= max(rule.min_membrane_coverage, 1e-6)
                v = torch.where(p, comp.membrane_stained, comp.membrane)
            pos_list.append(p)
            val_list.append(v)
        pos = torch.stack(pos_list, 1)
        val = torch.stack(val_list, 1)
        if rule.combine == "all":
            return pos.all(1), val.amin(1)
        return pos.any(1), val.amax(1)

    def _score(
        self,
        n: int,
        rays: Rays,
        cls: torch.Tensor,
        prob: torch.Tensor,
        comp: Compartments,
        core: torch.Tensor,
    ) -> ScoredBatch:
        """Counts and records of the core cells ``core`` (indices into ``rays``; ``comp`` holds
        their compartments, in that order)."""
        dev = cls.device
        halo = self.halo_px
        cls, prob = cls[core], prob[core]
        tile = rays.tile[core]
        y = rays.centre_um[core, 0] / self.mpp - 0.5
        x = rays.centre_um[core, 1] / self.mpp - 0.5
        tum_pos, tum_val = self._rule("tumor", comp, cls)
        imm_pos, imm_val = self._rule("immune", comp, cls)
        is_t = cls == TUMOR
        is_i = (cls == LYMPHOCYTE) | (cls == MACROPHAGE)
        positive = torch.where(is_t, tum_pos, torch.where(is_i, imm_pos, torch.zeros_like(tum_pos)))
        scored = torch.where(is_t, tum_val, torch.where(is_i, imm_val, torch.zeros_like(tum_val)))
        edges = torch.tensor(self.marker.intensity_bins, device=dev)
        ibin = torch.bucketize(scored, edges, right=True)
        cols = [
            is_t,
            is_t & positive,
            is_i,
            is_i & positive,
            cls == LYMPHOCYTE,
            cls == MACROPHAGE,
            cls == FIBROBLAST,
            is_t & (ibin == 0),
            is_t & (ibin == 1),
            is_t & (ibin == 2),
            is_t & (ibin == 3),
            # Immune cells that stain as a positive tumour cell would (the slide QC flag
            # ``stained_immune``: on p16, likely positive tumour cells typed immune).
            is_i & tum_pos,
        ]
        counts = torch.zeros((n, len(cols)), dtype=torch.int64, device=dev)
        for j, m in enumerate(cols):
            counts[:, j] = torch.bincount(tile[m], minlength=n)
        cells = {
            "tile": tile,
            "x": x - halo,
            "y": y - halo,
            "type": cls.clamp(max=FIBROBLAST),
            "type_prob": prob,
            "nucleus_dab": comp.nucleus,
            "cytoplasm_dab": comp.cytoplasm,
            "membrane_dab": torch.where(
                comp.membrane_coverage > 0,
                comp.membrane_stained,
                comp.membrane,
            ),
            "membrane_coverage": comp.membrane_coverage,
            "scored_dab": scored,
            "intensity_bin": ibin,
            "positive": positive,
            "nucleus_area_um2": rays.area_um2[core],
        }
        return ScoredBatch(counts=counts, cells=cells)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Two detections are one nucleus when their outline centres lie closer than this fraction of
#: their mean outline radius (sqrt(area / pi)). Peak suppression runs on LoG peaks, before the
#: outlines: a vesicular nucleus, or a clump off its centre, can keep two peaks, and both outlines
#: then trace the whole nucleus, so their centroids meet. On the synthetic accuracy slides all 57
#: detections this drops lie in the same true nucleus as the one kept; on DeepLIIF 7 of 8 do (one
#: on unlabelled stroma), while pairs in two labelled nuclei (touching pale nuclei with both peaks
#: near the shared border, 22_2) start at 0.5: keep below that (model card, 2026-11-24).
DUPLICATE_FRACTION = 0.45


def duplicate_nuclei(rays: Rays, response: torch.Tensor) -> torch.Tensor:
    """(K,) bool: detections that are a second find of a nucleus another detection of the tile
    holds with a stronger LoG response (see :data:`DUPLICATE_FRACTION`)."""
    k = response.numel()
    nb = rays.nb_index
    j = nb.clamp_min(0)
    d = (rays.centre_um.unsqueeze(1) - rays.centre_um[j]).norm(dim=2)  # (K, N_NEIGHBOURS)
    r = (rays.area_um2 / math.pi).sqrt()
    same = (nb >= 0) & (d < DUPLICATE_FRACTION * 0.5 * (r.unsqueeze(1) + r[j]))
    mine, theirs = response.unsqueeze(1), response[j]
    idx = torch.arange(k, device=response.device).unsqueeze(1)
    stronger = (theirs > mine) | ((theirs == mine) & (j < idx))
    return (same & stronger).any(1)


def _drop_neighbours(rays: Rays, drop: torch.Tensor, n_tiles: int) -> Rays:
    """``rays`` with the cells ``drop`` (K,) bool taken out of every cell's neighbour list (the
    rest keep their order by distance) and out of its density count. Cheaper than recomputing the
    neighbours, and the same for the nearest ones the features read unless more of a cell's
    ``N_NEIGHBOURS`` are dropped than it has to spare."""
    nb = rays.nb_index
    gone = (nb >= 0) & drop[nb.clamp_min(0)]
    dist, order = rays.nb_dist_um.masked_fill(gone, math.inf).sort(dim=1, stable=True)
    nb = nb.masked_fill(gone, -1).gather(1, order)
    # Density: dropped cells of the same tile within DENSITY_RADIUS_UM, by the detected centres
    # the neighbours were found on (per tile, padded: few cells are dropped).
    idx = drop.nonzero(as_tuple=True)[0]
    _, pos, dmax = tile_slots(rays.tile[idx], n_tiles)
    pad = torch.full((n_tiles, dmax, 2), math.inf, device=nb.device)
    pad[rays.tile[idx], pos] = rays.yx_um[idx]
    d = (rays.yx_um.unsqueeze(1) - pad[rays.tile]).norm(dim=2)  # (K, dmax)
    near = (d < DENSITY_RADIUS_UM).sum(1).to(rays.density.dtype)
    density = (rays.density - near).clamp_min(0)  # a dropped cell's own row counts itself
    return replace(rays, nb_index=nb, nb_dist_um=dist, density=density)


def _neighbours_among(rays: Rays, keep: torch.Tensor, n_tiles: int) -> Rays:
    """``rays`` with each kept cell's neighbours and density recomputed among the kept cells
    ``keep`` only (indices into ``rays``; other cells' rows: no neighbours). The ray samples are
    not copied."""
    nb, dist, density = _neighbours(rays.tile[keep], rays.centre_um[keep], n_tiles)
    k = rays.tile.numel()
    nb_index = torch.full((k, nb.shape[1]), -1, dtype=nb.dtype, device=nb.device)
    nb_index[keep] = torch.where(nb >= 0, keep[nb.clamp_min(0)], nb)
    nb_dist = torch.full((k, dist.shape[1]), math.inf, dtype=dist.dtype, device=dist.device)
    nb_dist[keep] = dist
    dens = torch.zeros(k, dtype=density.dtype, device=density.device)
    dens[keep] = density
    return replace(rays, nb_index=nb_index, nb_dist_um=nb_dist, density=dens)


def mean_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor`` x ``factor`` mean pooling of (..., H, W), dropping a remainder row or column as
    ``avg_pool2d`` does (equal to it up to float rounding).

    Powers of two pool by halving: adjacent columns, then adjacent rows, each a sum of two views
    of contiguous memory, five times faster than ``avg_pool2d`` with stride 2 on the CPU.
    """
    if factor == 1:
        return x
    if factor & (factor - 1):
        lead = x.shape[:-2]
        pooled = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), factor)
        return pooled.view(*lead, *pooled.shape[-2:])
    while factor > 1:
        lead, (h, w) = x.shape[:-2], x.shape[-2:]
        h2, w2 = h // 2, w // 2
        cols = x[..., : 2 * h2, : 2 * w2].reshape(-1, 2 * h2, w2, 2)
        pairs = (cols[..., 0] + cols[..., 1]).view(-1, h2, 2, w2)
        x = (pairs[:, :, 0] + pairs[:, :, 1]).mul_(0.25).view(*lead, h2, w2)
        factor //= 2
    return x


def halo_for(mpp: float) -> int:
    """Context border (pixels at ``mpp``) that covers a tumour cell's radius plus the LoG support."""
    return math.ceil(16.0 / mpp)
