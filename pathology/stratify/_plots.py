"""Figures: Kaplan-Meier curves with numbers at risk, and response rates with their CIs.

Each function returns PNG bytes: the caller writes them atomically and embeds the same bytes in
the HTML report. Figures are drawn on matplotlib's Agg backend and always closed.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

__all__ = ["km_png", "response_png"]

_DPI = 110


def _pyplot() -> Any:
    import matplotlib

    # Agg draws without a display (servers, CI). When the caller already uses pyplot (a notebook
    # with its inline backend) we leave their backend alone: we never show, only save and close.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def km_png(
    patients: pd.DataFrame, column: str, groups: Sequence[str], title: str, subtitle: str = ""
) -> bytes:
    """Kaplan-Meier PFS curves of ``groups`` of ``patients[column]`` with a numbers-at-risk table.

    Parameters
    ----------
    patients : DataFrame
        ``patients.csv`` rows (``pfs_months``, ``pfs_event``).
    column : str
        Grouping column (``p16_call``, ``cps_bin``, ``stratum``).
    groups : sequence of str
        Groups to draw, in legend order; empty groups are skipped.
    title, subtitle : str
        Figure title and a second line (e.g. the log-rank p-value).

    Returns
    -------
    bytes
        A PNG image.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    plt = _pyplot()
    present = [g for g in groups if (patients[column] == g).any()]
    fig = plt.figure(figsize=(8.0, 5.2 + 0.28 * len(present)))
    try:
        ax = fig.add_subplot(1, 1, 1)
        fitters = []
        for g in present:
            sub = patients[patients[column] == g]
            kmf = KaplanMeierFitter(label=f"{g} (n={len(sub)})")
            kmf.fit(sub["pfs_months"], sub["pfs_event"])
            kmf.plot_survival_function(ax=ax, ci_show=False, show_censors=True)
            fitters.append(kmf)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("months")
        ax.set_ylabel("progression-free survival")
        ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
        if fitters:
            ax.legend(loc="upper right", fontsize=8, frameon=False)
            add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], fig=fig)
        else:
            ax.text(0.5, 0.5, "no patients in these groups", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def response_png(response: pd.DataFrame) -> bytes:
    """Objective response rate per group with the exact 95% CI, one panel per factor.

    Parameters
    ----------
    response : DataFrame
        ``response.csv`` rows.

    Returns
    -------
    bytes
        A PNG image.
    """
    plt = _pyplot()
    factors = list(dict.fromkeys(response["factor"]))
    heights = [max(1, int((response["factor"] == f).sum())) for f in factors]
    fig = plt.figure(figsize=(8.0, 1.2 + 0.38 * sum(heights) + 0.5 * len(factors)))
    try:
        axes = fig.subplots(len(factors), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, factor in zip(axes[:, 0], factors, strict=True):
            sub = response[response["factor"] == factor].iloc[::-1]
            y = range(len(sub))
            orr = sub["orr"].fillna(0).to_numpy() * 100
            lo = (sub["orr"] - sub["orr_ci_low"]).fillna(0).to_numpy() * 100
            hi = (sub["orr_ci_high"] - sub["orr"]).fillna(0).to_numpy() * 100
            ax.barh(list(y), orr, xerr=[lo, hi], color="#4c72b0", ecolor="#333333", capsize=3)
            ax.set_yticks(list(y))
            ax.set_yticklabels(
                [
                    f"{g}  ({r}/{n})"
                    for g, r, n in zip(sub["group"], sub["responders"], sub["n"], strict=True)
                ],
                fontsize=8,
            )
            for yi, (o, top, n) in enumerate(
                zip(sub["orr"], sub["orr_ci_high"], sub["n"], strict=True)
            ):
                text = "n = 0" if n == 0 or math.isnan(o) else f"{100 * o:.0f}%"
                x = 1.0 if math.isnan(top) else min(100 * top + 1.5, 92.0)
                ax.text(x, yi, text, va="center", fontsize=7, color="#222222")
            ax.set_xlim(0, 100)
            ax.set_title(f"objective response by {factor} (exact 95% CI)", fontsize=10)
        axes[-1, 0].set_xlabel("objective response rate, % (CR + PR)")
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)
