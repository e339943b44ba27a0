"""``report.html``: one self-contained page with the tables, the figures and the provenance.

Everything is inline (CSS, PNGs as base64 data URIs), so the file can be mailed or archived with a
trial analysis as it is. Every value from the inputs is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from pathology.stratify._config import StrataConfig
from pathology.stratify._problems import PROBLEM_COLUMNS, Problem
from pathology.stratify._rows import MIN_GROUP
from pathology.stratify._stats import FFH_RESAMPLES
from pathology.stratify._survival import CPS_STEP

__all__ = ["InputFile", "render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;display:block;margin:1em 0}.small{font-size:.85em;color:#555}
code{background:#f5f5f5;padding:0 .2em}
"""


@dataclass(frozen=True)
class InputFile:
    """One input file for the provenance table: its role, path, size and SHA-256."""

    role: str
    path: str
    size: int
    sha256: str


def _table(frame: pd.DataFrame, float_digits: int = 4) -> str:
    return frame.to_html(
        index=False,
        escape=True,
        na_rep="",
        float_format=lambda v: f"{v:.{float_digits}g}",
        border=0,
    )


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("pathology", "numpy", "pandas", "scipy", "lifelines", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _methods() -> list[str]:
    items = [
        "Patient p16: the call all evaluable p16 slides agree on; slides that disagree make the "
        "patient <em>equivocal</em> (flag <code>p16_discordant</code>). p16 % is the highest "
        "over evaluable slides.",
        "Patient CPS: the highest CPS over evaluable PD-L1 slides; the bin is the highest "
        "slide call (any positive block qualifies).",
        "Non-evaluable slides are ignored unless all of a marker's slides are; such patients, "
        "and patients without a slide of a marker, are left out of that marker's analyses "
        "and listed under Problems.",
        "Response: responder = CR or PR (RECIST 1.1); NE counts as non-responder. ORR 95% CI: "
        "exact Clopper-Pearson (scipy.stats.binomtest).",
        "p16 negative vs positive x response: Fisher's exact test (scipy.stats.fisher_exact); "
        "conditional maximum-likelihood odds ratio with exact CI "
        "(scipy.stats.contingency.odds_ratio).",
        "Response across CPS bins: Fisher-Freeman-Halton test (scipy.stats.fisher_exact, "
        f"Monte Carlo p-value, {FFH_RESAMPLES:,} tables, fixed seed); effect: Cramer's V.",
        "PFS: Kaplan-Meier (lifelines), log-rank test for two groups and its k-group "
        "extension for CPS bins and strata; univariable Cox proportional hazards models "
        "(lifelines CoxPHFitter, Efron ties) with Wald 95% CIs.",
    ]
    return ["<h2>Methods</h2>", "<ul>", *(f"<li>{i}</li>" for i in items), "</ul>"]


def render_report(
    *,
    patients: pd.DataFrame,
    response: pd.DataFrame,
    tests: pd.DataFrame,
    pfs: pd.DataFrame,
    problems: Sequence[Problem],
    figures: Mapping[str, bytes],
    config: StrataConfig,
    inputs: Sequence[InputFile],
    n_slides: int,
) -> str:
    """The HTML text of the report.

    Parameters
    ----------
    patients, response, tests, pfs : DataFrame
        The tables written beside the report.
    problems : sequence of Problem
        Warnings of the run (a run with errors writes no report).
    figures : mapping of str to bytes
        PNG bytes by file name (``km_p16.png`` ...), embedded in that order.
    config : StrataConfig
    inputs : sequence of InputFile
    n_slides : int
        Slides used (after removing repeated rows).

    Returns
    -------
    str
    """
    e = html.escape
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    strata_counts = patients["stratum"].replace("", "(none)").value_counts()
    strata_rows = pd.DataFrame(
        [
            {
                "stratum": s.name,
                "p16": ", ".join(s.p16) if s.p16 else "any",
                "cps_bin": ", ".join(s.cps_bin) if s.cps_bin else "any",
                "patients": int(strata_counts.get(s.name, 0)),
            }
            for s in config.strata
        ]
        + [
            {"stratum": "(none)", "p16": "", "cps_bin": "", "patients": int(n)}
            for k, n in strata_counts.items()
            if k == "(none)"
        ]
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>pathology stratify report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Patient strata, response and progression-free survival</h1>",
        f'<p class="small">Generated {e(now)} by <code>pathology stratify</code>. '
        f"{len(patients)} patients, {n_slides} slides, {len(problems)} warnings.</p>",
        "<h2>Strata</h2>",
        f'<p class="small">From {e(config.source)}: {e(config.description.rstrip("."))}. '
        "A patient takes the first stratum that admits it.</p>",
        _table(strata_rows),
        "<h2>Objective response (CR + PR)</h2>",
        '<p class="small">ORR with exact Clopper-Pearson 95% CI; NE counts as non-response.</p>',
        _table(response),
    ]
    if "response.png" in figures:
        parts.append(_img(figures["response.png"], "objective response by group"))
    parts += [
        "<h2>Tests of association</h2>",
        '<p class="small">Odds ratios and hazard ratios are p16-negative vs p16-positive; '
        f"CPS hazard ratios per {CPS_STEP:g} points or against the lowest bin. The "
        f"Fisher-Freeman-Halton p-value is Monte Carlo ({FFH_RESAMPLES:,} tables, fixed seed). "
        f"Groups with fewer than {MIN_GROUP} patients are left out (see note).</p>",
        _table(tests),
        "<h2>Progression-free survival</h2>",
        '<p class="small">Kaplan-Meier median PFS in months with 95% CI (empty: not reached).</p>',
        _table(pfs),
    ]
    for name, png in figures.items():
        if name.startswith("km_"):
            parts.append(_img(png, name))
    parts += _methods()
    parts.append("<h2>Problems (warnings)</h2>")
    if problems:
        frame = pd.DataFrame([p.as_row() for p in problems], columns=list(PROBLEM_COLUMNS))
        parts.append(_table(frame))
    else:
        parts.append("<p>None.</p>")
    parts += [
        "<h2>Patients</h2>",
        f"<details><summary>{len(patients)} patients (patients.csv)</summary>",
        _table(patients),
        "</details>",
        "<h2>Provenance</h2>",
        _table(pd.DataFrame([vars(f) for f in inputs]).rename(columns={"size": "bytes"})),
        _table(pd.DataFrame(list(_versions().items()), columns=["software", "version"])),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
