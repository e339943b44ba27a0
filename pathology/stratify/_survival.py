"""Progression-free survival: Kaplan-Meier medians, log-rank tests and Cox models (lifelines).

* ``logrank``: two groups with ``lifelines.statistics.logrank_test``, more with
  ``multivariate_logrank_test``; ``statistic`` is the chi-squared statistic.
* ``cox``: univariable ``lifelines.CoxPHFitter`` (Efron ties); ``statistic`` is the Wald z,
  ``effect`` the hazard ratio with its Wald 95% CI. p16 is negative vs positive (reference),
  CPS is modelled per :data:`CPS_STEP` points, CPS bins as indicators against the lowest bin
  analysed.
* ``pfs.csv``: Kaplan-Meier median PFS with the 95% CI of ``lifelines.utils.median_survival_times``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pathology.stratify._rows import (
    MIN_GROUP,
    factor_groups,
    group_sizes,
    guarded,
    guarded_rows,
    join_note,
    kept_groups,
    make_row,
    too_small,
)
from pathology.stratify._vocab import CPS_BINS

__all__ = ["CPS_STEP", "PFS_COLUMNS", "cox_rows", "logrank_row", "pfs_table"]

#: Hazard ratios for continuous CPS are per this many CPS points.
CPS_STEP = 10.0
PFS_COLUMNS = ("factor", "group", "n", "events", "median_pfs", "median_ci_low", "median_ci_high")


def pfs_table(patients: pd.DataFrame, strata: Sequence[str]) -> pd.DataFrame:
    """Kaplan-Meier median PFS (months) with its 95% CI per group (NaN when not reached)."""
    from lifelines import KaplanMeierFitter
    from lifelines.utils import median_survival_times

    rows = []
    for factor, column, groups in factor_groups(strata):
        for group in groups:
            sub = patients[patients[column] == group]
            med = lo = hi = math.nan
            if len(sub):
                kmf = KaplanMeierFitter().fit(sub["pfs_months"], sub["pfs_event"])
                ci = median_survival_times(kmf.confidence_interval_)
                med = float(kmf.median_survival_time_)
                lo, hi = (float(v) for v in np.asarray(ci, dtype=float).ravel()[:2])
            rows.append(
                (factor, group, len(sub), int(sub["pfs_event"].sum()), *_finite(med, lo, hi))
            )
    return pd.DataFrame(rows, columns=list(PFS_COLUMNS))


def _finite(*values: float) -> tuple[float, ...]:
    # lifelines reports "not reached" as inf; NaN reads better in a CSV and means the same here.
    return tuple(v if math.isfinite(v) else math.nan for v in values)


def logrank_row(
    patients: pd.DataFrame, factor: str, column: str, groups: Sequence[str]
) -> dict[str, Any]:
    """The log-rank row of ``tests.csv`` comparing PFS across ``groups`` of ``column``.

    Groups with fewer than ``MIN_GROUP`` patients are left out (named in the note); two groups
    use the two-sample test, more the k-sample test.
    """
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    kept, sizes, note = kept_groups(patients, column, groups)
    sub = patients[patients[column].isin(kept)]
    events = int(sub["pfs_event"].sum())
    label = " vs ".join(groups) if len(groups) == 2 else f"PFS across {len(kept)} groups"
    row = make_row(factor, "logrank", label, len(sub), events=events, note=note)
    if len(kept) < 2:
        row["note"] = too_small(sizes) if len(groups) == 2 else too_small(sizes, 2)
        return row
    if events == 0:
        row["note"] = join_note(row["note"], "not computed: no PFS event in the groups compared")
        return row

    def compute() -> dict[str, Any]:
        if len(kept) == 2:
            a, b = (sub[sub[column] == g] for g in kept)
            res = logrank_test(a["pfs_months"], b["pfs_months"], a["pfs_event"], b["pfs_event"])
        else:
            res = multivariate_logrank_test(sub["pfs_months"], sub[column], sub["pfs_event"])
        return {"statistic": float(res.test_statistic), "p_value": float(res.p_value)}

    return guarded(row, compute)


def _cox(data: pd.DataFrame, covariates: Sequence[str]) -> list[dict[str, Any]]:
    """Fit a Cox model of PFS on ``covariates``; one result dict per covariate."""
    from lifelines import CoxPHFitter

    cph = CoxPHFitter()
    cph.fit(data[["pfs_months", "pfs_event", *covariates]], "pfs_months", "pfs_event")
    s = cph.summary
    return [
        {
            "statistic": float(s.loc[c, "z"]),
            "p_value": float(s.loc[c, "p"]),
            "effect": float(s.loc[c, "exp(coef)"]),
            "effect_ci_low": float(s.loc[c, "exp(coef) lower 95%"]),
            "effect_ci_high": float(s.loc[c, "exp(coef) upper 95%"]),
        }
        for c in covariates
    ]


def _cox_p16(patients: pd.DataFrame) -> dict[str, Any]:
    groups = ("negative", "positive")
    sizes = group_sizes(patients, "p16_call", groups)
    sub = patients[patients["p16_call"].isin(groups)]
    events = int(sub["pfs_event"].sum())
    row = make_row(
        "p16",
        "cox",
        "negative vs positive (reference)",
        len(sub),
        events=events,
        effect_type="hazard_ratio",
    )
    if min(sizes.values()) < MIN_GROUP:
        row["note"] = too_small(sizes)
        return row
    if events == 0:
        row["note"] = "not computed: no PFS event"
        return row
    data = sub.assign(p16_negative=(sub["p16_call"] == "negative").astype(int))
    return guarded(row, lambda: _cox(data, ["p16_negative"])[0])


def _cox_cps(patients: pd.DataFrame) -> dict[str, Any]:
    sub = patients[patients["cps"].notna()]
    events = int(sub["pfs_event"].sum())
    row = make_row(
        "cps",
        "cox",
        f"per {CPS_STEP:g} CPS points",
        len(sub),
        events=events,
        effect_type="hazard_ratio",
    )
    if len(sub) < 2 * MIN_GROUP or sub["cps"].nunique() < 2:
        row["note"] = f"not computed: needs {2 * MIN_GROUP}+ patients with 2+ different CPS values"
        return row
    if events == 0:
        row["note"] = "not computed: no PFS event"
        return row
    data = sub.assign(cps_per_step=sub["cps"] / CPS_STEP)
    return guarded(row, lambda: _cox(data, ["cps_per_step"])[0])


def _cox_cps_bin(patients: pd.DataFrame) -> list[dict[str, Any]]:
    kept, sizes, note = kept_groups(patients, "cps_bin", CPS_BINS)
    sub = patients[patients["cps_bin"].isin(kept)]
    events = int(sub["pfs_event"].sum())
    if len(kept) < 2:
        return [
            make_row(
                "cps_bin",
                "cox",
                f"{g} vs {CPS_BINS[0]} (reference)",
                len(sub),
                events=events,
                effect_type="hazard_ratio",
                note=too_small(sizes, 2),
            )
            for g in CPS_BINS[1:]
        ]
    ref, others = kept[0], kept[1:]
    rows = [
        make_row(
            "cps_bin",
            "cox",
            f"{g} vs {ref} (reference)",
            len(sub),
            events=events,
            effect_type="hazard_ratio",
            note=note,
        )
        for g in others
    ]
    if events == 0:
        for r in rows:
            r["note"] = join_note(r["note"], "not computed: no PFS event")
        return rows
    names = [f"cps_bin_{i}" for i in range(len(others))]
    data = sub.assign(
        **{n: (sub["cps_bin"] == g).astype(int) for n, g in zip(names, others, strict=True)}
    )
    return guarded_rows(rows, lambda: _cox(data, names))


def cox_rows(patients: pd.DataFrame) -> list[dict[str, Any]]:
    """The Cox rows of ``tests.csv``: p16, CPS per :data:`CPS_STEP` points, CPS bins."""
    return [_cox_p16(patients), _cox_cps(patients), *_cox_cps_bin(patients)]
