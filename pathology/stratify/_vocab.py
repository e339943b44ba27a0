"""The fixed vocabulary of the stratify stage: response codes, calls, bins and required columns.

These are the trial's definitions, not settings: RECIST 1.1 best overall response codes, the CAP p16
calls and the 22C3 CPS bins of ``DESIGN.md`` section 2. Every other module imports them from here.
"""

from __future__ import annotations

__all__ = [
    "CLINICAL_REQUIRED",
    "CPS_BINS",
    "MAP_REQUIRED",
    "NOT_EVALUABLE",
    "OUTPUT_NAMES",
    "P16_CALLS",
    "PATIENT_COLUMNS",
    "RESPONDERS",
    "RESPONSES",
    "SLIDES_REQUIRED",
]

#: RECIST 1.1 best overall response: complete, partial, stable, progressive, not evaluable.
RESPONSES = ("CR", "PR", "SD", "PD", "NE")
#: Objective response = confirmed CR or PR; NE counts as a non-responder (intention to treat).
RESPONDERS = frozenset({"CR", "PR"})

#: Patient (and slide) p16 calls, least to most HPV-associated. HPV-negative = p16-negative.
P16_CALLS = ("negative", "equivocal", "positive")
#: PD-L1 22C3 combined positive score bins, lowest to highest.
CPS_BINS = ("<1", "1-19", ">=20")
#: The call of a slide (or patient) that cannot be scored.
NOT_EVALUABLE = "not_evaluable"

CLINICAL_REQUIRED = ("patient_id", "best_response", "pfs_months", "pfs_event")
SLIDES_REQUIRED = ("slide_id", "marker", "call")
MAP_REQUIRED = ("slide_id", "patient_id")

#: Every file ``stratify`` writes into its output folder (the overwrite check looks for these).
OUTPUT_NAMES = (
    "patients.csv",
    "response.csv",
    "tests.csv",
    "pfs.csv",
    "problems.csv",
    "km_p16.png",
    "km_cps.png",
    "km_stratum.png",
    "response.png",
    "report.html",
)

#: The fixed leading columns of ``patients.csv``; per-marker columns of other markers
#: (``<marker>_slides``, ``<marker>_positive_pct``) and the carried clinical columns follow.
PATIENT_COLUMNS = (
    "patient_id",
    "stratum",
    "p16_call",
    "hpv_negative",
    "p16_positive_pct",
    "p16_slides",
    "cps",
    "cps_bin",
    "pdl1_slides",
    "best_response",
    "responder",
    "pfs_months",
    "pfs_event",
    "flags",
    "slide_ids",
)
