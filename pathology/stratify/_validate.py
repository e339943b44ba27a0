"""Load the slide, map and clinical tables and check every cell, collecting all problems.

Nothing here raises on bad data: each check appends a :class:`Problem` naming the file, the row,
the column and the value, and the caller decides (``_api.stratify`` stops when any problem is an
``error``). What is fatal and what is a warning:

error (the analysis cannot be trusted)
    a missing required column; an empty ``patient_id`` or ``slide_id``; an unknown response code;
    a PFS time that is empty, not a number, infinite or negative; a PFS event other than 0/1; a
    patient on two clinical rows; a p16 or PD-L1 call outside the vocabulary; an evaluable PD-L1
    slide without a CPS in 0-100; a percentage outside 0-100; a slide_id twice with different
    values; a slide with no patient (not in the map, or no ``patient_id``); a slide whose patient
    is not in the clinical table; a map that gives one slide two patients, or disagrees with the
    ``patient_id`` column of the slides table; a row with the wrong number of cells.
warning (reported, the analysis runs)
    a patient in the clinical table with no slides (kept, with empty marker values); a slide
    listed twice with identical values (counted once); a map row for a slide in no slides table;
    a PD-L1 call that does not match its CPS (the call is used); a clinical column whose name
    clashes with an output column (carried as ``clinical_<name>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pathology.stratify._problems import Problem
from pathology.stratify._slides import SlideRecord, check_slides
from pathology.stratify._table import Table, missing_columns, number, read_table
from pathology.stratify._vocab import CLINICAL_REQUIRED, MAP_REQUIRED, PATIENT_COLUMNS, RESPONSES

__all__ = ["ClinicalRecord", "Inputs", "SlideRecord", "load_inputs"]

PathLike = str | os.PathLike[str]

# A carried clinical column must not overwrite an output column of patients.csv.
_OUTPUT_COLUMN = re.compile(r"^(?:\w+_slides|\w+_positive_pct)$")


@dataclass(frozen=True)
class ClinicalRecord:
    """One valid clinical row; ``extra`` holds the carried columns in file order."""

    patient_id: str
    best_response: str
    pfs_months: float
    pfs_event: int
    extra: tuple[tuple[str, str], ...]
    file: str
    row: int


@dataclass(frozen=True)
class Inputs:
    """Everything read from the input tables.

    When ``problems`` holds an error, ``slides`` and ``clinical`` are incomplete (invalid rows are
    left out) and must not be analysed.
    """

    slides: tuple[SlideRecord, ...]
    clinical: tuple[ClinicalRecord, ...]
    extra_columns: tuple[str, ...]
    problems: tuple[Problem, ...]
    files: tuple[Path, ...]


def load_inputs(
    slides: Sequence[PathLike], clinical: PathLike, map_path: PathLike | None
) -> Inputs:
    """Read and check all input tables; see the module docstring for what is checked.

    Parameters
    ----------
    slides : sequence of path-like
        One or more ``slides.csv`` files (concatenated).
    clinical : path-like
        The clinical table.
    map_path : path-like or None
        ``slide_id, patient_id`` table; without it the slides tables need ``patient_id``.

    Returns
    -------
    Inputs
    """
    problems: list[Problem] = []
    slide_tables = [read_table(p, "slides", problems) for p in slides]
    map_table = read_table(map_path, "map", problems) if map_path is not None else None
    clin_table = read_table(clinical, "clinical", problems)
    slide_to_patient = _check_map(map_table, problems) if map_table is not None else None
    clinical_rows, extra, clinical_ids = _check_clinical(clin_table, problems)
    records = check_slides(slide_tables, slide_to_patient, map_table, clinical_ids, problems)
    # A file that cannot be read or lacks a column breaks the join; "no slides" warnings would
    # then only repeat that error once per patient.
    joined = not any(p.row is None and p.severity == "error" for p in problems)
    if joined and not any(t.rows for t in slide_tables):
        problems.append(
            Problem(slide_tables[0].name, None, "", "", "no slide rows in any slides table")
        )
        joined = False
    if joined and map_table is not None and slide_to_patient is not None:
        known = {s.slide_id for s in records} | _all_slide_ids(slide_tables)
        for sid, (_, line) in slide_to_patient.items():
            if sid not in known:
                problems.append(
                    Problem(
                        map_table.name,
                        line,
                        "slide_id",
                        sid,
                        "slide is in no slides table; map row ignored",
                        "warning",
                    )
                )
    with_slides = {s.patient_id for s in records}
    for c in clinical_rows if joined else []:
        if c.patient_id not in with_slides:
            problems.append(
                Problem(
                    c.file,
                    c.row,
                    "patient_id",
                    c.patient_id,
                    "patient has no slides; kept in patients.csv without marker values and "
                    "left out of every marker analysis",
                    "warning",
                )
            )
    files = [t.path for t in slide_tables] + [clin_table.path]
    if map_table is not None:
        files.append(map_table.path)
    return Inputs(tuple(records), tuple(clinical_rows), extra, tuple(problems), tuple(files))


def _all_slide_ids(tables: Sequence[Table]) -> set[str]:
    return {r.get("slide_id", "") for t in tables for r in t.rows}


def _check_map(table: Table, problems: list[Problem]) -> dict[str, tuple[str, int]] | None:
    """``slide_id -> (patient_id, line)`` from the map (None when it lacks a required column).

    One slide mapped to two patients is an error; a repeated identical row a warning.
    """
    out: dict[str, tuple[str, int]] = {}
    if missing_columns(table, MAP_REQUIRED, problems):
        return None
    for row, line in zip(table.rows, table.lines, strict=True):
        sid, pid = row["slide_id"], row["patient_id"]
        for col, val in (("slide_id", sid), ("patient_id", pid)):
            if not val:
                problems.append(Problem(table.name, line, col, "", f"empty {col}"))
        if not sid or not pid:
            continue
        if sid in out:
            first_pid, first_line = out[sid]
            if first_pid == pid:
                problems.append(
                    Problem(
                        table.name,
                        line,
                        "slide_id",
                        sid,
                        f"repeats row {first_line} (same patient); counted once",
                        "warning",
                    )
                )
            else:
                problems.append(
                    Problem(
                        table.name,
                        line,
                        "patient_id",
                        pid,
                        f"slide {sid} is mapped to patient {first_pid} on row {first_line} "
                        "and to another patient here; a slide belongs to one patient",
                    )
                )
            continue
        out[sid] = (pid, line)
    return out


def _check_clinical(
    table: Table, problems: list[Problem]
) -> tuple[list[ClinicalRecord], tuple[str, ...], set[str]]:
    """Valid clinical records, carried column names, and every patient_id seen (valid or not)."""
    missing = missing_columns(table, CLINICAL_REQUIRED, problems)
    extra_cols = [c for c in table.columns if c not in CLINICAL_REQUIRED]
    carried: list[str] = []
    for col in extra_cols:
        clash = col in PATIENT_COLUMNS or _OUTPUT_COLUMN.match(col)
        name = f"clinical_{col}" if clash else col
        if name != col:
            problems.append(
                Problem(
                    table.name,
                    1,
                    col,
                    col,
                    f"clinical column clashes with an output column; carried as {name!r}",
                    "warning",
                )
            )
        carried.append(name)
    if table.columns and not table.rows:
        problems.append(Problem(table.name, None, "", "", "no patient rows under the header"))
    rows_of: dict[str, list[int]] = {}
    records: list[ClinicalRecord] = []
    for row, line in zip(table.rows, table.lines, strict=True):
        pid = row.get("patient_id", "")
        if pid:
            rows_of.setdefault(pid, []).append(line)
        values = _clinical_values(table, row, line, missing, problems)
        if values is not None:
            extra = tuple((n, row[c]) for n, c in zip(carried, extra_cols, strict=True))
            records.append(ClinicalRecord(pid, *values, extra, table.name, line))
    for pid, lines in rows_of.items():
        if len(lines) > 1:
            where = ", ".join(map(str, lines))
            for line in lines:
                problems.append(
                    Problem(
                        table.name,
                        line,
                        "patient_id",
                        pid,
                        f"patient appears on rows {where}; keep one row per patient",
                    )
                )
    dupes = {pid for pid, lines in rows_of.items() if len(lines) > 1}
    records = [r for r in records if r.patient_id not in dupes]
    return records, tuple(carried), set(rows_of)


def _clinical_values(
    table: Table, row: dict[str, str], line: int, missing: set[str], problems: list[Problem]
) -> tuple[str, float, int] | None:
    """``(best_response, pfs_months, pfs_event)`` of a clinical row, or None when any is bad."""
    n_before = len(problems)

    def bad(col: str, problem: str) -> None:
        problems.append(Problem(table.name, line, col, row.get(col, ""), problem))

    if "patient_id" not in missing and not row["patient_id"]:
        bad("patient_id", "empty patient_id")
    response = row.get("best_response", "").upper()
    if "best_response" not in missing and response not in RESPONSES:
        bad(
            "best_response",
            f"unknown response code; expected one of {', '.join(RESPONSES)} "
            "(RECIST 1.1; NE = not evaluable)",
        )
    pfs = number(row.get("pfs_months", ""))
    if "pfs_months" not in missing and (pfs is None or pfs < 0):
        what = "negative" if pfs is not None else "not a finite number"
        bad("pfs_months", f"PFS time is {what}; expected months >= 0")
    event = number(row.get("pfs_event", ""))
    if "pfs_event" not in missing and event not in (0.0, 1.0):
        bad("pfs_event", "expected 1 (progression or death) or 0 (censored)")
    if missing or len(problems) > n_before or pfs is None or event is None:
        return None
    return response, pfs, int(event)
