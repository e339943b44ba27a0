"""Patient-level values from slide calls: the multi-slide rules and the stratum.

Rules (also in ``docs_stratify_section.md``). Only evaluable slides count: a slide is evaluable
when its ``evaluable`` column is not false and its call is not ``not_evaluable``.

p16, several slides
    All evaluable p16 slides agree -> that call. They disagree -> ``equivocal`` and the flag
    ``p16_discordant`` (plus a warning row). Equivocal is the conservative choice for this trial:
    a discordant patient is neither confirmed p16-negative (= HPV-negative, the trial population)
    nor confirmed positive, and CAP sends equivocal p16 to HPV-specific testing.
    ``p16_positive_pct`` is the highest % over the evaluable p16 slides.
PD-L1 CPS, several slides
    ``cps`` is the highest CPS over the evaluable PD-L1 slides and ``cps_bin`` the highest bin
    among their calls (any positive block qualifies a patient, as in clinical practice); slides
    in different bins add the flag ``pdl1_heterogeneous``.
not evaluable, missing
    Non-evaluable slides are ignored unless all of a patient's slides of that marker are
    non-evaluable: then the call is ``not_evaluable`` and the flag ``p16_not_evaluable`` or
    ``pdl1_not_evaluable``. No slide of the marker: empty call, flag ``no_p16_slide`` or
    ``no_pdl1_slide``. Either way the patient is left out of that marker's analyses (with a
    warning row), never dropped from ``patients.csv``.
other markers
    Carried, not stratified: ``<marker>_slides`` (count) and ``<marker>_positive_pct`` (highest
    over evaluable slides).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pandas as pd

from pathology.stratify._config import StrataConfig
from pathology.stratify._problems import Problem
from pathology.stratify._validate import ClinicalRecord, Inputs, SlideRecord
from pathology.stratify._vocab import CPS_BINS, NOT_EVALUABLE, PATIENT_COLUMNS, RESPONDERS

__all__ = ["build_patients"]


def _max(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return max(present) if present else math.nan


def _p16(
    c: ClinicalRecord, slides: list[SlideRecord], flags: list[str], warn: list[Problem]
) -> tuple[str, float]:
    """Patient p16 call and % (see the module docstring)."""
    if not slides:
        flags.append("no_p16_slide")
        warn.append(_warning(c, "no p16 slide; left out of the p16 and stratum analyses"))
        return "", math.nan
    ok = [s for s in slides if s.evaluable]
    if not ok:
        flags.append("p16_not_evaluable")
        warn.append(
            _warning(
                c,
                f"no evaluable p16 slide ({_ids(slides)}); left out of the p16 and stratum "
                "analyses",
            )
        )
        return NOT_EVALUABLE, math.nan
    calls = {s.call for s in ok}
    pct = _max([s.positive_pct for s in ok])
    if len(calls) == 1:
        return calls.pop(), pct
    flags.append("p16_discordant")
    detail = ", ".join(f"{s.slide_id}: {s.call}" for s in ok)
    warn.append(_warning(c, f"p16 slides disagree ({detail}); patient call set to equivocal"))
    return "equivocal", pct


def _pdl1(
    c: ClinicalRecord, slides: list[SlideRecord], flags: list[str], warn: list[Problem]
) -> tuple[str, float]:
    """Patient CPS bin and CPS (see the module docstring)."""
    if not slides:
        flags.append("no_pdl1_slide")
        warn.append(_warning(c, "no PD-L1 slide; left out of the CPS and stratum analyses"))
        return "", math.nan
    ok = [s for s in slides if s.evaluable]
    if not ok:
        flags.append("pdl1_not_evaluable")
        warn.append(
            _warning(
                c,
                f"no evaluable PD-L1 slide ({_ids(slides)}); left out of the CPS and stratum "
                "analyses",
            )
        )
        return NOT_EVALUABLE, math.nan
    bins = {s.call for s in ok}
    if len(bins) > 1:
        flags.append("pdl1_heterogeneous")
    return max(bins, key=CPS_BINS.index), _max([s.cps for s in ok])


def _ids(slides: list[SlideRecord]) -> str:
    return ", ".join(s.slide_id for s in slides)


def _warning(c: ClinicalRecord, text: str) -> Problem:
    return Problem(c.file, c.row, "patient_id", c.patient_id, text, "warning")


def build_patients(inputs: Inputs, config: StrataConfig) -> tuple[pd.DataFrame, list[Problem]]:
    """One row per clinical patient with marker values, stratum, response and PFS.

    Parameters
    ----------
    inputs : Inputs
        Validated inputs without errors.
    config : StrataConfig

    Returns
    -------
    patients : DataFrame
        Columns ``PATIENT_COLUMNS``, then ``<marker>_slides`` and ``<marker>_positive_pct`` per
        other marker, then the carried clinical columns; rows in clinical-table order.
        ``p16_positive_pct``, ``cps`` float (NaN when missing); ``responder`` and ``pfs_event``
        int 0/1; ``flags`` and ``slide_ids`` ``;``-separated.
    warnings : list of Problem
        One per patient-level rule that left a patient out of an analysis or changed a call.
    """
    by_patient: dict[str, dict[str, list[SlideRecord]]] = defaultdict(lambda: defaultdict(list))
    for s in inputs.slides:
        by_patient[s.patient_id][s.marker].append(s)
    others = sorted({s.marker for s in inputs.slides} - {"p16", "pdl1"})
    rows: list[dict[str, object]] = []
    warn: list[Problem] = []
    for c in inputs.clinical:
        slides = by_patient.get(c.patient_id, {})
        flags: list[str] = []
        n_warn = len(warn)
        if slides:
            p16_call, p16_pct = _p16(c, slides.get("p16", []), flags, warn)
            cps_bin, cps = _pdl1(c, slides.get("pdl1", []), flags, warn)
        else:
            flags.append("no_slides")  # the validation already wrote the warning row
            p16_call, p16_pct, cps_bin, cps = "", math.nan, "", math.nan
        stratum = config.assign(p16_call, cps_bin)
        if not stratum:
            flags.append("no_stratum")
            if slides and len(warn) == n_warn:
                warn.append(_warning(c, f"no stratum of {config.source} admits this patient"))
        row: dict[str, object] = {
            "patient_id": c.patient_id,
            "stratum": stratum,
            "p16_call": p16_call,
            "hpv_negative": {"negative": "true", "positive": "false"}.get(p16_call, ""),
            "p16_positive_pct": p16_pct,
            "p16_slides": len(slides.get("p16", [])),
            "cps": cps,
            "cps_bin": cps_bin,
            "pdl1_slides": len(slides.get("pdl1", [])),
            "best_response": c.best_response,
            "responder": int(c.best_response in RESPONDERS),
            "pfs_months": c.pfs_months,
            "pfs_event": c.pfs_event,
            "flags": ";".join(flags),
            "slide_ids": ";".join(sorted(s.slide_id for m in slides.values() for s in m)),
        }
        for m in others:
            ms = slides.get(m, [])
            row[f"{m}_slides"] = len(ms)
            row[f"{m}_positive_pct"] = _max([s.positive_pct for s in ms if s.evaluable])
        row.update(dict(c.extra))
        rows.append(row)
    columns = [
        *PATIENT_COLUMNS,
        *(f"{m}_{k}" for m in others for k in ("slides", "positive_pct")),
        *inputs.extra_columns,
    ]
    return pd.DataFrame(rows, columns=columns), warn
