"""Objective response by p16 call, CPS bin and stratum, and the response tests of ``tests.csv``.

All statistics come from SciPy; this module only selects patients, builds the tables SciPy
takes and writes its results into rows (survival is in ``_survival``). Tests (the effect of the
two-group row is for p16-negative vs p16-positive):

* response rate: exact Clopper-Pearson 95% CI, ``scipy.stats.binomtest(...).proportion_ci``.
* ``fisher_exact`` (p16): Fisher's exact test on the 2x2 table p16 negative/positive x
  responder/non-responder; ``statistic`` is SciPy's sample odds ratio, ``effect`` the conditional
  maximum-likelihood odds ratio with its exact 95% CI (``scipy.stats.contingency.odds_ratio``),
  the same estimate as R's ``fisher.test``.
* ``fisher_freeman_halton`` (cps_bin): the r x 2 extension of Fisher's test across CPS bins,
  ``scipy.stats.fisher_exact`` with a Monte Carlo p-value from :data:`FFH_RESAMPLES` random tables
  with fixed margins and a fixed seed (reproducible; standard error below 0.002). ``statistic``
  is the probability of the observed table, ``effect`` Cramer's V
  (``scipy.stats.contingency.association``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pathology.stratify._rows import (
    MIN_GROUP,
    TEST_COLUMNS,
    factor_groups,
    group_sizes,
    guarded,
    kept_groups,
    make_row,
    too_small,
)
from pathology.stratify._survival import cox_rows, logrank_row
from pathology.stratify._vocab import CPS_BINS

__all__ = ["FFH_RESAMPLES", "FFH_SEED", "RESPONSE_COLUMNS", "association_tests", "response_table"]

#: Monte Carlo tables and seed of the Fisher-Freeman-Halton p-value.
FFH_RESAMPLES = 100_000
FFH_SEED = 20_240_601

RESPONSE_COLUMNS = ("factor", "group", "n", "responders", "orr", "orr_ci_low", "orr_ci_high")


def response_table(patients: pd.DataFrame, strata: Sequence[str]) -> pd.DataFrame:
    """Objective response rate with its exact Clopper-Pearson 95% CI per group.

    Parameters
    ----------
    patients : DataFrame
        ``patients.csv`` rows (``responder`` 0/1).
    strata : sequence of str
        Stratum names in report order.

    Returns
    -------
    DataFrame
        ``RESPONSE_COLUMNS``; every group appears, an empty one with n = 0 and NaN rates.
    """
    from scipy.stats import binomtest

    rows = []
    for factor, column, groups in factor_groups(strata):
        for group in groups:
            sub = patients[patients[column] == group]
            n, k = len(sub), int(sub["responder"].sum())
            orr = lo = hi = math.nan
            if n:
                ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
                orr, lo, hi = k / n, float(ci.low), float(ci.high)
            rows.append((factor, group, n, k, orr, lo, hi))
    return pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))


def association_tests(patients: pd.DataFrame, strata: Sequence[str]) -> pd.DataFrame:
    """Every row of ``tests.csv`` (see the module docstring for the tests).

    Parameters
    ----------
    patients : DataFrame
        ``patients.csv`` rows.
    strata : sequence of str
        Stratum names (for the log-rank test across strata).

    Returns
    -------
    DataFrame
        ``TEST_COLUMNS``, one row per test (two for the binned-CPS Cox model).
    """
    rows = [_fisher_p16(patients), _ffh_cps(patients)]
    rows.append(logrank_row(patients, "p16", "p16_call", ("negative", "positive")))
    rows.append(logrank_row(patients, "cps_bin", "cps_bin", CPS_BINS))
    rows.append(logrank_row(patients, "stratum", "stratum", tuple(strata)))
    rows.extend(cox_rows(patients))
    frame = pd.DataFrame(rows, columns=list(TEST_COLUMNS))
    # Counts stay integers in the CSV; "events" is empty (NA) for the response tests.
    return frame.astype({"n": "Int64", "events": "Int64"})


def _fisher_p16(patients: pd.DataFrame) -> dict[str, Any]:
    from scipy.stats import fisher_exact
    from scipy.stats.contingency import odds_ratio

    groups = ("negative", "positive")
    sizes = group_sizes(patients, "p16_call", groups)
    row = make_row(
        "p16",
        "fisher_exact",
        "negative vs positive: odds of response",
        sum(sizes.values()),
        effect_type="odds_ratio",
    )
    if min(sizes.values()) < MIN_GROUP:
        row["note"] = too_small(sizes)
        return row
    table = [
        [k := int(patients.loc[patients["p16_call"] == g, "responder"].sum()), sizes[g] - k]
        for g in groups
    ]

    def compute() -> dict[str, Any]:
        res = fisher_exact(table)
        ratio = odds_ratio(table, kind="conditional")
        ci = ratio.confidence_interval(confidence_level=0.95)
        return {
            "statistic": float(res.statistic),
            "p_value": float(res.pvalue),
            "effect": float(ratio.statistic),
            "effect_ci_low": float(ci.low),
            "effect_ci_high": float(ci.high),
        }

    return guarded(row, compute)


def _ffh_cps(patients: pd.DataFrame) -> dict[str, Any]:
    from scipy.stats import MonteCarloMethod, fisher_exact
    from scipy.stats.contingency import association

    kept, sizes, note = kept_groups(patients, "cps_bin", CPS_BINS)
    row = make_row(
        "cps_bin",
        "fisher_freeman_halton",
        "response across CPS bins" + (f" {', '.join(kept)}" if len(kept) > 1 else ""),
        sum(sizes[g] for g in kept),
        effect_type="cramers_v",
        note=note,
    )
    if len(kept) < 2:
        row["note"] = too_small(sizes, 2)
        return row
    table = np.array(
        [
            [k := int(patients.loc[patients["cps_bin"] == g, "responder"].sum()), sizes[g] - k]
            for g in kept
        ]
    )

    def compute() -> dict[str, Any]:
        method = MonteCarloMethod(n_resamples=FFH_RESAMPLES, rng=np.random.default_rng(FFH_SEED))
        res = fisher_exact(table, method=method)
        out = {"statistic": float(res.statistic), "p_value": float(res.pvalue)}
        if table.sum(axis=0).min() > 0:  # Cramer's V is undefined without both outcomes
            out["effect"] = float(association(table, method="cramer"))
        return out

    return guarded(row, compute)
