"""Slide-level calls from summed cell counts: p16, PD-L1 CPS/TPS, percent markers, H-score.

Every value here is computed from counts summed over all of a slide's tiles, never from averaged
tile scores (DESIGN.md section 2), so a new threshold can be applied to stored counts without
re-running the model: ``call_slide(totals, load_marker("p16"))``.

Rules (the marker YAML's ``slide`` section gives the numbers):

- ``p16``: positive when >= ``positive_pct`` (70) % of tumour cells are positive (nucleus AND
  cytoplasm at the cut); equivocal at ``equivocal_pct``-``positive_pct`` (50-70 %) or when positive
  plus weakly stained (1+) tumour cells reach ``weak_diffuse_pct`` (diffuse but weak); negative
  otherwise. CAP 2018 (Lewis et al., Arch Pathol Lab Med 142:559) and the CAP 2025 update.
- ``cps``: CPS = 100 x (positive tumour + positive lymphocytes and macrophages) / tumour cells,
  capped at ``cps_cap``; TPS = 100 x positive tumour / tumour cells; call ``<1``, ``1-19``,
  ``>=20`` (``cps_bins``). 22C3 pharmDx HNSCC interpretation manual.
- ``percent``: the % of positive tumour cells (Ki-67 index); no categorical call.
- ``hscore``: H-score of tumour cells; call ``high`` at ``high_hscore`` or more, else ``low``.
- Every rule: fewer than ``min_tumor_cells`` (100) viable tumour cells -> ``not_evaluable``.

QC flag ``stained_immune`` (markers with ``stained_immune_flag_pct`` > 0: p16): cells typed immune
that meet the tumour cells' positivity rule (``immune_stained``) reach that % of all cells meeting
it, at least :data:`STAINED_IMMUNE_MIN_CELLS`. Immune cells do not take up p16; where they seem to,
strongly stained tumour cells were mistyped (dense DAB read as haematoxylin, model card) and the
positive % reads low.

H-score (any marker) = 1 x %1+ + 2 x %2+ + 3 x %3+ of tumour cells, binned on the scored DAB OD
(the marker's ``intensity_bins``, QuPath defaults 0.2 / 0.4 / 0.6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pathology.scoring._markers import MarkerConfig

__all__ = [
    "NOT_EVALUABLE",
    "QC_FLAGS",
    "STAINED_IMMUNE_MIN_CELLS",
    "SlideCall",
    "SlideQC",
    "call_slide",
]

NOT_EVALUABLE = "not_evaluable"

#: QC flags a slide can carry (``qc_flags`` is a ``;``-joined subset).
QC_FLAGS = {
    "few_tumor_cells": "fewer viable tumour cells than the marker's minimum (call not_evaluable)",
    "little_tissue": "less tissue than the minimum area (default 1 mm^2)",
    "stain_out_of_range": "the estimated stain vectors strayed too far from H-DAB; reference kept",
    "dark_background": "the glass is darker than expected (a tinted slide or a bad white balance)",
    "unreadable_tiles": "some tiles could not be decoded and were left out",
    "stained_immune": "many cells typed immune stain as positive tumour cells do (the marker's "
    "stained_immune_flag_pct); on p16, likely strongly stained tumour cells mistyped: the "
    "positive % may read low, review the slide",
}
#: ``stained_immune`` needs at least this many such cells, so that a few cells on a small region
#: do not raise it.
STAINED_IMMUNE_MIN_CELLS = 20


@dataclass(frozen=True)
class SlideQC:
    """Inputs of the QC flags that do not come from cell counts.

    Attributes
    ----------
    tissue_mm2 : float
        Tissue area scored (sum of tissue tile areas x their tissue fraction).
    stains_in_range : bool
        The per-slide stain estimate stayed within its angle limits.
    background : (float, float, float)
        Glass brightness per RGB channel, 0-255.
    unreadable_tiles : int
        Tiles the reader could not decode.
    min_tissue_mm2 : float
        Below this the slide is flagged ``little_tissue``.
    """

    tissue_mm2: float = float("nan")
    stains_in_range: bool = True
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    unreadable_tiles: int = 0
    min_tissue_mm2: float = 1.0


@dataclass(frozen=True)
class SlideCall:
    """A slide's call and the values behind it (percentages 0-100; None where not applicable).

    Attributes
    ----------
    marker, rule : str
    call : str
        p16: ``positive|equivocal|negative``; cps: ``<1|1-19|>=20``; hscore: ``high|low``;
        percent: ``""``; any rule: ``not_evaluable`` below the tumour-cell minimum.
    evaluable : bool
    tumor_cells, tumor_positive, immune_cells, immune_positive : int
    positive_pct : float or None
        % of tumour cells positive (p16 %, Ki-67 index, EGFR % positive); None for PD-L1 (see tps).
    weak_pct : float or None
        % of tumour cells that are not positive but stain 1+ (the diffuse-weak p16 rule).
    cps, tps : float or None
        PD-L1 only.
    h_score : float or None
        0-300; None without tumour cells.
    qc_flags : tuple of str
        Keys of :data:`QC_FLAGS`.
    """

    marker: str
    rule: str
    call: str
    evaluable: bool
    tumor_cells: int
    tumor_positive: int
    immune_cells: int
    immune_positive: int
    positive_pct: float | None
    weak_pct: float | None
    cps: float | None
    tps: float | None
    h_score: float | None
    qc_flags: tuple[str, ...]


def _pct(num: int, den: int) -> float | None:
    return None if den <= 0 else 100.0 * num / den


def call_slide(
    totals: Mapping[str, int], marker: MarkerConfig, qc: SlideQC | None = None
) -> SlideCall:
    """The slide call of ``marker`` from counts summed over the slide's tiles.

    Parameters
    ----------
    totals : mapping
        Summed per-tile counts (:data:`pathology.scoring.COUNT_NAMES`: ``tumor_cells``,
        ``tumor_positive``, ``immune_cells``, ``immune_positive``, ``tumor_bin0`` .. ``tumor_bin3``,
        ``immune_stained``).
    marker : MarkerConfig
    qc : SlideQC, optional
        Tissue area, stain estimate and read failures, for the QC flags.
    """
    qc = qc or SlideQC()
    rule = marker.slide["rule"]
    n_t = int(totals.get("tumor_cells", 0))
    t_pos = int(totals.get("tumor_positive", 0))
    n_i = int(totals.get("immune_cells", 0))
    i_pos = int(totals.get("immune_positive", 0))
    bins = [int(totals.get(f"tumor_bin{k}", 0)) for k in range(4)]
    min_tumor = float(marker.slide["min_tumor_cells"])
    evaluable = n_t >= min_tumor and n_t > 0

    flags: list[str] = []
    if not evaluable:
        flags.append("few_tumor_cells")
    if qc.tissue_mm2 == qc.tissue_mm2 and qc.tissue_mm2 < qc.min_tissue_mm2:
        flags.append("little_tissue")
    if not qc.stains_in_range:
        flags.append("stain_out_of_range")
    if min(qc.background) < 180.0:
        flags.append("dark_background")
    if qc.unreadable_tiles > 0:
        flags.append("unreadable_tiles")
    i_stained = int(totals.get("immune_stained", 0))
    flag_pct = float(marker.slide.get("stained_immune_flag_pct", 0.0))
    if (
        flag_pct > 0
        and i_stained >= STAINED_IMMUNE_MIN_CELLS
        and 100.0 * i_stained / (i_stained + t_pos) >= flag_pct
    ):
        flags.append("stained_immune")

    bin_total = sum(bins)
    h_score = None if bin_total == 0 else 100.0 * (bins[1] + 2 * bins[2] + 3 * bins[3]) / bin_total
    positive_pct = _pct(t_pos, n_t)
    # Weakly stained = tumour cells at 1+ that the rule did not call positive.
    weak_pct = _pct(max(0, min(bins[1], n_t - t_pos)), n_t)
    cps = tps = None
    call = ""
    if rule == "p16":
        s = marker.slide
        if positive_pct is not None and weak_pct is not None:
            if positive_pct >= s["positive_pct"]:
                call = "positive"
            elif (
                positive_pct >= s["equivocal_pct"]
                or positive_pct + weak_pct >= s["weak_diffuse_pct"]
            ):
                call = "equivocal"
            else:
                call = "negative"
    elif rule == "cps":
        tps = _pct(t_pos, n_t)
        cps = (
            None if n_t == 0 else min(float(marker.slide["cps_cap"]), 100.0 * (t_pos + i_pos) / n_t)
        )
        positive_pct = None
        if cps is not None:
            lo, hi = marker.slide["cps_bins"]
            call = f"<{lo:g}" if cps < lo else (f"{lo:g}-{hi - 1:g}" if cps < hi else f">={hi:g}")
    elif rule == "hscore":
        if h_score is not None:
            call = "high" if h_score >= marker.slide["high_hscore"] else "low"
    if not evaluable:
        call = NOT_EVALUABLE
    return SlideCall(
        marker=marker.name,
        rule=rule,
        call=call,
        evaluable=evaluable,
        tumor_cells=n_t,
        tumor_positive=t_pos,
        immune_cells=n_i,
        immune_positive=i_pos,
        positive_pct=positive_pct,
        weak_pct=weak_pct,
        cps=cps,
        tps=tps,
        h_score=h_score,
        qc_flags=tuple(flags),
    )
