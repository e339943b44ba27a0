"""Patient strata from slide calls, and their relation to response and progression-free survival.

``stratify`` joins the slide calls written by ``pathology score`` (one or more ``slides.csv``) to
a clinical table, one row per patient (``patient_id, best_response, pfs_months, pfs_event``),
through an optional ``slide_id, patient_id`` map. It combines each patient's slides into one p16
call and one CPS (multi-slide rules in ``_patients``), assigns a stratum (default p16 call x CPS
bin, configurable in YAML), and writes response rates with exact CIs, Fisher, log-rank and Cox
results, Kaplan-Meier plots and a self-contained HTML report.

>>> from pathology.stratify import stratify
>>> result = stratify("slides.csv", "clinical.csv", map="map.csv", out="strata")  # doctest: +SKIP
>>> result.response  # doctest: +SKIP

Bad input never disappears silently: every problem row goes to ``problems.csv``; problems that
make the analysis untrustworthy raise :class:`ClinicalDataError` (after writing that file).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathology.stratify._api import StratifyResult, stratify
    from pathology.stratify._config import StrataConfig, Stratum, load_strata
    from pathology.stratify._problems import ClinicalDataError, InputNotFoundError, Problem

__all__ = [
    "ClinicalDataError",
    "InputNotFoundError",
    "Problem",
    "StrataConfig",
    "StratifyResult",
    "Stratum",
    "load_strata",
    "stratify",
]

# Resolved on first use: importing the package (as the CLI's --help does) stays free of pandas,
# scipy, lifelines and matplotlib.
_WHERE = {
    "StratifyResult": "_api",
    "stratify": "_api",
    "StrataConfig": "_config",
    "Stratum": "_config",
    "load_strata": "_config",
    "ClinicalDataError": "_problems",
    "InputNotFoundError": "_problems",
    "Problem": "_problems",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"pathology.stratify.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathology.stratify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
