"""Read a CSV input table as text, keeping every row's line number for problem reports.

The standard library's :mod:`csv` reader is used rather than pandas on purpose: nothing is
converted behind our back (``"NA"`` stays ``"NA"``, ``"007"`` stays ``"007"``), blank lines do not
shift the row numbers, and a row with too many or too few cells is reported instead of being
silently realigned. Values are converted and checked later, cell by cell, by ``_validate``.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pathology.stratify._problems import InputNotFoundError, Problem

__all__ = ["Table", "missing_columns", "number", "read_table"]


@dataclass(frozen=True)
class Table:
    """A CSV file as stripped text cells.

    Parameters
    ----------
    name : str
        The path as the user gave it (used in problem reports).
    path : Path
    columns : tuple of str
        Header names, stripped, in file order.
    rows : tuple of dict
        One ``{column: stripped text}`` per non-blank data row.
    lines : tuple of int
        The line number of each row in the file (header = 1).
    """

    name: str
    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    lines: tuple[int, ...]


def read_table(path: str | os.PathLike[str], what: str, problems: list[Problem]) -> Table:
    """Read ``path`` as a CSV table; problems of the file's shape are appended to ``problems``.

    Parameters
    ----------
    path : path-like
    what : str
        ``"slides"``, ``"map"`` or ``"clinical"``, for the not-found message.
    problems : list of Problem
        Appended to: unreadable file, duplicate or empty header names, rows with the wrong number
        of cells (such rows are kept, padded or cut to the header, so later checks still see them).

    Returns
    -------
    Table
        Empty (no columns, no rows) when the file cannot be decoded or has no header.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist or is a folder.
    """
    name = os.fspath(path)
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(path, what)
    empty = Table(name, p, (), (), ())
    try:
        # utf-8-sig: spreadsheet programs often prepend a byte-order mark.
        with p.open(newline="", encoding="utf-8-sig") as fh:
            records = _records(fh)
    except (UnicodeDecodeError, csv.Error) as exc:
        problems.append(Problem(name, None, "", "", f"cannot read as UTF-8 CSV: {exc}"))
        return empty
    if not records:
        problems.append(Problem(name, None, "", "", "file is empty; expected a header row"))
        return empty
    header, _ = records[0]
    columns = [h.strip() for h in header]
    keep: list[int] = []
    seen: set[str] = set()
    for j, col in enumerate(columns):
        if not col:
            # Spreadsheets export trailing empty columns; they only matter if they hold data.
            if any(j < len(r) and r[j].strip() for r, _ in records[1:]):
                problems.append(
                    Problem(name, 1, f"(column {j + 1})", "", "column has values but no name")
                )
            continue
        if col in seen:
            problems.append(
                Problem(name, 1, col, col, "column name appears twice; rename one of them")
            )
            continue
        seen.add(col)
        keep.append(j)
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    width = len(header)
    for record, line in records[1:]:
        if len(record) != width:
            problems.append(
                Problem(
                    name,
                    line,
                    "",
                    ",".join(record)[:80],
                    f"row has {len(record)} cells, the header has {width}; "
                    "a shifted row cannot be trusted",
                )
            )
            record = (record + [""] * width)[:width]
        rows.append({columns[j]: record[j].strip() for j in keep})
        lines.append(line)
    return Table(name, p, tuple(columns[j] for j in keep), tuple(rows), tuple(lines))


def _records(fh: TextIO) -> list[tuple[list[str], int]]:
    """Non-blank records with the line number each ends on (blank and all-empty rows skipped)."""
    reader = csv.reader(fh)
    out = []
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue
        out.append((record, reader.line_num))
    return out


def missing_columns(table: Table, required: tuple[str, ...], problems: list[Problem]) -> set[str]:
    """Append one problem per required column the table lacks; return the missing names.

    The message suggests a close existing name (``Patient_ID`` for ``patient_id``), the most
    common cause.
    """
    missing = {c for c in required if c not in table.columns}
    if not table.columns:
        return missing  # empty or unreadable file: already reported once, not once per column
    for col in required:
        if col not in missing:
            continue
        close = difflib.get_close_matches(col, table.columns, n=1, cutoff=0.6) or [
            c for c in table.columns if c.lower() == col.lower()
        ]
        hint = f"; found {close[0]!r}: rename it to {col!r}" if close else ""
        problems.append(
            Problem(
                table.name,
                None,
                col,
                "",
                f"missing required column {col!r} (columns: {', '.join(table.columns) or 'none'}){hint}",
            )
        )
    return missing


def number(text: str) -> float | None:
    """``text`` as a finite float, or ``None`` when it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
