"""Checks of the slides tables (``slides.csv`` from ``pathology score``), row by row.

Part of the input validation (see ``_validate`` for what is fatal and what is a warning): known
calls per marker, CPS and percentages in 0-100, one patient per slide, repeated slide_ids across
files, and slides whose patient is not in the clinical table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pathology.stratify._problems import Problem, Severity
from pathology.stratify._table import Table, missing_columns, number
from pathology.stratify._vocab import CPS_BINS, NOT_EVALUABLE, P16_CALLS, SLIDES_REQUIRED

__all__ = ["SlideRecord", "check_slides", "cps_bin"]

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
# Columns that legitimately differ between two identical scorings of one slide (where and how
# long it ran, where the file sat); every other shared column must agree for a repeated slide_id.
_BOOKKEEPING = {"path", "seconds", "device"}
_PCT_COLUMNS = ("p16_positive_pct", "positive_pct")


@dataclass(frozen=True)
class SlideRecord:
    """One valid slide row with its patient resolved.

    ``marker`` is normalised (``PD-L1`` -> ``pdl1``); ``evaluable`` is false when the
    ``evaluable`` column says so or the call is ``not_evaluable``; ``cps`` and
    ``positive_pct`` are 0-100 or ``None``.
    """

    slide_id: str
    marker: str
    call: str
    evaluable: bool
    cps: float | None
    positive_pct: float | None
    patient_id: str
    file: str
    row: int


def cps_bin(cps: float) -> str:
    """The 22C3 bin of a CPS value: ``<1``, ``1-19`` (1 <= CPS < 20) or ``>=20``."""
    return CPS_BINS[0] if cps < 1 else CPS_BINS[1] if cps < 20 else CPS_BINS[2]


def _marker(text: str) -> str:
    return re.sub(r"[\s_-]", "", text.lower())


def check_slides(
    tables: Sequence[Table],
    slide_to_patient: dict[str, tuple[str, int]] | None,
    map_table: Table | None,
    clinical_ids: set[str],
    problems: list[Problem],
) -> list[SlideRecord]:
    """Valid, de-duplicated slide records with their patient; problems appended."""
    need = SLIDES_REQUIRED if map_table is not None else (*SLIDES_REQUIRED, "patient_id")
    first: dict[str, tuple[Table, int, dict[str, str]]] = {}
    records: list[SlideRecord] = []
    for table in tables:
        missing = missing_columns(table, need, problems)
        if {"slide_id", "marker", "call"} & missing:
            continue
        for row, line in zip(table.rows, table.lines, strict=True):
            sid = row["slide_id"]
            if not sid:
                problems.append(Problem(table.name, line, "slide_id", "", "empty slide_id"))
                continue
            if sid in first:
                _repeat(sid, table, line, row, first[sid], problems)
                continue
            first[sid] = (table, line, row)
            # DESIGN.md names the column p16_positive_pct, the scorer writes positive_pct: take
            # whichever this row fills.
            pct_col = next((c for c in _PCT_COLUMNS if row.get(c)), "")
            rec = _slide_record(row, table, line, pct_col, problems)
            pid = _patient_of(sid, row, table, line, slide_to_patient, map_table, problems)
            if pid and clinical_ids and pid not in clinical_ids:
                source = (
                    f" (from {map_table.name} row {slide_to_patient[sid][1]})"
                    if map_table is not None and slide_to_patient
                    else ""
                )
                problems.append(
                    Problem(
                        table.name,
                        line,
                        "patient_id",
                        pid,
                        f"patient{source} is not in the clinical table; add the patient or "
                        "remove the slide",
                    )
                )
                continue
            if rec is not None and pid:
                records.append(
                    SlideRecord(sid, rec[0], rec[1], rec[2], rec[3], rec[4], pid, table.name, line)
                )
    return records


def _same(a: str, b: str) -> bool:
    """Cell equality that ignores number formatting (``7.9`` == ``7.90``)."""
    if a == b:
        return True
    x, y = number(a), number(b)
    return x is not None and y is not None and x == y


def _repeat(
    sid: str,
    table: Table,
    line: int,
    row: dict[str, str],
    earlier: tuple[Table, int, dict[str, str]],
    problems: list[Problem],
) -> None:
    t0, line0, row0 = earlier
    shared = [c for c in row if c in row0 and c not in _BOOKKEEPING]
    differ = [c for c in shared if not _same(row[c], row0[c])]
    where = f"{t0.name} row {line0}"
    if differ:
        detail = "; ".join(f"{c}: {row0[c]!r} there, {row[c]!r} here" for c in differ[:4])
        problems.append(
            Problem(
                table.name,
                line,
                differ[0],
                row[differ[0]],
                f"slide {sid} also on {where} with different values ({detail})",
            )
        )
    else:
        problems.append(
            Problem(
                table.name,
                line,
                "slide_id",
                sid,
                f"same slide and values as {where}; counted once",
                "warning",
            )
        )


def _slide_record(
    row: dict[str, str], table: Table, line: int, pct_col: str, problems: list[Problem]
) -> tuple[str, str, bool, float | None, float | None] | None:
    """``(marker, call, evaluable, cps, positive_pct)`` of a row, or None when invalid."""
    n_before = len(problems)

    def bad(col: str, problem: str, severity: Severity = "error") -> None:
        problems.append(Problem(table.name, line, col, row.get(col, ""), problem, severity))

    marker = _marker(row["marker"])
    if not marker:
        bad("marker", "empty marker; expected p16, pdl1 or another marker name")
    call = row["call"].lower().replace(" ", "")
    if marker == "p16" and call not in (*P16_CALLS, NOT_EVALUABLE):
        bad("call", f"unknown p16 call; expected {', '.join(P16_CALLS)} or {NOT_EVALUABLE}")
    if marker == "pdl1" and call not in (*CPS_BINS, NOT_EVALUABLE):
        bad("call", f"unknown PD-L1 call; expected {', '.join(CPS_BINS)} or {NOT_EVALUABLE}")
    flag = row.get("evaluable", "").lower()
    if flag and flag not in _TRUE | _FALSE:
        bad("evaluable", "expected true or false")
    evaluable = flag not in _FALSE and call != NOT_EVALUABLE
    cps: float | None = None
    if marker == "pdl1" and evaluable:
        cps = number(row.get("cps", ""))
        if cps is None or not 0 <= cps <= 100:
            bad("cps", "an evaluable PD-L1 slide needs a CPS between 0 and 100")
            cps = None
        elif call in CPS_BINS and call not in {cps_bin(cps), cps_bin(round(cps))}:
            bad(
                "call",
                f"call does not match CPS {cps:g} (bin {cps_bin(cps)}); the call is used",
                "warning",
            )
    pct: float | None = None
    if pct_col and row.get(pct_col, ""):
        pct = number(row[pct_col])
        if pct is None or not 0 <= pct <= 100:
            bad(pct_col, "expected a percentage between 0 and 100")
            pct = None
    if any(p.severity == "error" for p in problems[n_before:]):
        return None
    return marker, call, evaluable, cps, pct


def _patient_of(
    sid: str,
    row: dict[str, str],
    table: Table,
    line: int,
    slide_to_patient: dict[str, tuple[str, int]] | None,
    map_table: Table | None,
    problems: list[Problem],
) -> str:
    """The slide's patient, or ``""`` (with an error) when it has none."""
    own = row.get("patient_id", "")
    if map_table is None:
        if not own:
            problems.append(
                Problem(
                    table.name, line, "patient_id", "", "slide has no patient (empty patient_id)"
                )
            )
        return own
    if slide_to_patient is None:
        return ""  # the map lacks a required column, already reported; no cascade of "no patient"
    if sid not in slide_to_patient:
        problems.append(
            Problem(
                table.name,
                line,
                "slide_id",
                sid,
                f"slide has no patient: not in {map_table.name}; add it to the map",
            )
        )
        return ""
    pid = slide_to_patient[sid][0]
    if own and own != pid:
        problems.append(
            Problem(
                table.name,
                line,
                "patient_id",
                own,
                f"disagrees with {map_table.name} row {slide_to_patient[sid][1]} "
                f"(patient {pid}); fix one of them",
            )
        )
        return ""
    return pid
