"""Per-cell DAB amounts by compartment: the marker's staining pattern, with exact counts.

Positive counts are exact (``round(fraction * cells)`` chosen by permutation) so a preset's slide
values do not wander with the seed. Every scored value stays at least :data:`MARGIN` OD away from
the bin edges 0.2 / 0.4 / 0.6 unless ``borderline_fraction`` asks for cells at the cut, so a
detector that measures DAB to within a few hundredths of an OD can reproduce the truth exactly.

Compartments (OD along the unit DAB vector, what colour deconvolution measures):

- ``nucleus``: uniform over the nucleus.
- ``cytoplasm``: uniform over the body outside nucleus and membrane ring.
- ``membrane``: on the stained arc of the ~0.75 um ring inside the cell boundary; ``coverage`` is the
  arc's fraction of the circumference, starting at angle ``arc_start``. The rest of the ring has
  ``ring_off`` (the cytoplasm value, or an unstained ring for PD-L1 decoys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pathology.synth._params import SynthParams
from pathology.synth._shapes import FIBROBLAST, LYMPHOCYTE, MACROPHAGE, TUMOR

__all__ = ["BIN_EDGES", "MARGIN", "POSITIVE_CUT", "Staining", "assign_staining"]

#: QuPath-style intensity bin edges (1+, 2+, 3+) on mean DAB OD.
BIN_EDGES = (0.2, 0.4, 0.6)
#: Distance every non-borderline scored value keeps from each bin edge, OD.
MARGIN = 0.05
#: Positivity cut of each marker's scored compartment(s), OD.
POSITIVE_CUT = {"p16": 0.4, "pdl1": 0.2, "ki67": 0.2}

_NEG = (0.0, 0.10)  # unstained: faint background DAB only
_CAT = ((0.0, 0.10), (0.25, 0.35), (0.45, 0.55), (0.65, 1.20))  # categories 0, 1+, 2+, 3+

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Staining:
    """DAB OD per cell and compartment; arrays (N,) float32 aligned with the layout's cells."""

    nucleus: F32
    cytoplasm: F32
    membrane: F32
    coverage: F32
    ring_off: F32
    arc_start: F32


def keep_clear(v: NDArray[np.floating], margin: float = MARGIN) -> NDArray[np.float32]:
    """Push values within ``margin`` of a bin edge to the nearer side of ``edge +- margin``."""
    out = np.asarray(v, np.float64).copy()
    for e in BIN_EDGES:
        near = np.abs(out - e) < margin
        out[near] = np.where(out[near] < e, e - margin, e + margin)
    return out.astype(np.float32)


def _positive_levels(n: int, params: SynthParams, rng: np.random.Generator, floor: float) -> F32:
    """Scored DAB OD of ``n`` positive cells around the requested intensity, >= ``floor + MARGIN``."""
    if n == 0:
        return np.zeros(0, np.float32)
    # Real positive populations are heterogeneous: a minority sits one bin off the main one.
    mix = {"strong": (3, 2, 0.2), "moderate": (2, 3, 0.15), "weak": (1, 2, 0.15)}
    if isinstance(params.intensity, str):
        main, other, p_other = mix[params.intensity]
        cat = np.where(rng.random(n) < p_other, other, main)
        lo = np.array([_CAT[c][0] for c in cat])
        hi = np.array([_CAT[c][1] for c in cat])
        centre = np.where(cat == 3, 0.80, (lo + hi) / 2)
        sd = np.where(cat == 3, 0.10, (hi - lo) / 4)
        v = np.clip(rng.normal(centre, sd), lo, hi)
    else:
        x = float(params.intensity)
        v = rng.normal(x, 0.04 + 0.05 * x, n)
    out = keep_clear(np.clip(v, floor + MARGIN, 1.6))
    return np.maximum(out, floor + MARGIN).astype(np.float32)


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> F32:
    return rng.uniform(lo, hi, n).astype(np.float32)


def _borderline(
    values: F32,
    pos_idx: NDArray[np.intp],
    neg_idx: NDArray[np.intp],
    frac: float,
    cut: float,
    rng: np.random.Generator,
) -> NDArray[np.intp]:
    """Move ``frac`` of positives and of negatives to just above / below ``cut`` (in place).

    Returns the indices moved.
    """
    kp = round(frac * len(pos_idx))
    kn = round(frac * len(neg_idx))
    if kp:
        values[pos_idx[:kp]] = cut + rng.uniform(0.002, 0.03, kp)
    if kn:
        values[neg_idx[:kn]] = cut - rng.uniform(0.005, 0.03, kn)
    return np.concatenate([pos_idx[:kp], neg_idx[:kn]]).astype(np.intp)


def assign_staining(
    params: SynthParams, types: NDArray[np.integer], rng: np.random.Generator
) -> Staining:
    """DAB amounts of every cell for ``params.marker``.

    Parameters
    ----------
    params : SynthParams
    types : ndarray (N,) int
        Cell type codes (TUMOR, LYMPHOCYTE, MACROPHAGE, FIBROBLAST).
    rng : numpy Generator
        Dedicated stream (the assignment never disturbs the layout's randomness).
    """
    n = len(types)
    nuc = _uniform(rng, 0.0, 0.05, n)
    cyt = _uniform(rng, 0.0, 0.05, n)
    mem = cyt.copy()
    cov = np.zeros(n, np.float32)
    ring = cyt.copy()
    start = _uniform(rng, 0.0, 2 * np.pi, n)

    tum = np.flatnonzero(types == TUMOR)
    perm = tum[rng.permutation(len(tum))]
    nt = len(tum)
    n_pos = min(nt, round(params.positive_fraction * nt))
    pos, rest = perm[:n_pos], perm[n_pos:]
    cut = POSITIVE_CUT[params.marker]
    bl = params.borderline_fraction

    if params.marker == "p16":
        n_weak = min(len(rest), round(params.weak_fraction * nt))
        weak, neg = rest[:n_weak], rest[n_weak:]
        level = np.zeros(n, np.float32)
        level[pos] = _positive_levels(n_pos, params, rng, cut)
        level[weak] = _uniform(rng, *_CAT[1], n_weak)
        level[neg] = _uniform(rng, *_NEG, len(neg))
        moved = _borderline(level, pos, np.concatenate([neg, weak]), bl, cut, rng)
        # Both compartments must reach the cut; the cytoplasm is the limiting (scored) one.
        cyt[tum] = level[tum]
        nuc[tum] = level[tum] + _uniform(rng, 0.0, 0.06, nt)
        clear = np.setdiff1d(tum, moved)  # borderline cells keep their nucleus near the cut
        nuc[clear] = keep_clear(nuc[clear])
        nuc[tum] = np.maximum(nuc[tum], cyt[tum])
        mem[tum] = cyt[tum]
        ring[tum] = cyt[tum]
    elif params.marker == "ki67":
        nuc[pos] = _positive_levels(n_pos, params, rng, cut)
        nuc[rest] = _uniform(rng, *_NEG, len(rest))
        _borderline(nuc, pos, rest, bl, cut, rng)
        # A few proliferating lymphocytes: real Ki-67 slides have them; they are not scored.
        lym = np.flatnonzero(types == LYMPHOCYTE)
        cycling = lym[rng.random(len(lym)) < 0.05]
        nuc[cycling] = _uniform(rng, 0.45, 0.7, len(cycling))
    else:  # pdl1
        n_decoy = min(len(rest), round(params.decoy_fraction * nt))
        decoy, neg = rest[:n_decoy], rest[n_decoy:]
        # Membranes are thin: the default optical blur keeps ~75 % of a ring's OD, so positive
        # rings start at 0.30 (not 0.25) to still read >= 0.2 in a colour-deconvolved ring mean.
        mem[pos] = _positive_levels(n_pos, params, rng, cut + 0.05)
        n_complete = round(params.complete_membrane_fraction * n_pos)
        cov[pos] = 1.0
        cov[pos[n_complete:]] = _uniform(rng, 0.25, 0.75, n_pos - n_complete)
        # Faint cytoplasmic blush in positive cells, kept well under the cut.
        cyt[pos] = np.minimum(mem[pos] * _uniform(rng, 0.0, 0.3, n_pos), 0.12)
        ring[pos] = cyt[pos]
        mem[neg] = _uniform(rng, 0.0, 0.08, len(neg))
        ring[neg] = mem[neg]
        # Cytoplasmic-only decoys: brown cytoplasm, unstained membrane -> negative by 22C3.
        cyt[decoy] = _uniform(rng, 0.28, 0.5, n_decoy)
        mem[decoy] = _uniform(rng, 0.03, 0.10, n_decoy)
        ring[decoy] = mem[decoy]
        if bl > 0:
            _borderline(mem, pos, neg, bl, cut, rng)
            kn = round(bl * len(neg))
            cov[neg[:kn]] = 1.0  # a faint complete ring just under the cut
            ring[neg[:kn]] = cyt[neg[:kn]]

        imm = np.flatnonzero((types == LYMPHOCYTE) | (types == MACROPHAGE))
        iperm = imm[rng.permutation(len(imm))]
        n_ipos = min(len(imm), round(params.immune_positive_fraction * len(imm)))
        ipos, ineg = iperm[:n_ipos], iperm[n_ipos:]
        lv = _positive_levels(n_ipos, params, rng, cut + 0.05)
        mem[ipos] = lv
        cov[ipos] = 1.0
        is_mac = types[ipos] == MACROPHAGE
        # Lymphocyte rim is all membrane; macrophage cytoplasm is granular and a bit paler.
        cyt[ipos] = np.where(is_mac, keep_clear(lv * _uniform(rng, 0.7, 0.9, n_ipos)), lv)
        ring[ipos] = cyt[ipos]
        mem[ineg] = _uniform(rng, 0.0, 0.06, len(ineg))
        cyt[ineg] = _uniform(rng, 0.0, 0.06, len(ineg))
        ring[ineg] = mem[ineg]

    fib = types == FIBROBLAST
    nuc[fib] = np.minimum(nuc[fib], 0.03)
    # Round to what the truth file stores, so the rendered amounts are exactly the recorded ones.
    r4 = [np.round(a, 4).astype(np.float32) for a in (nuc, cyt, mem, cov, ring, start)]
    return Staining(*r4)
