"""Row-level problems found in the input tables, and the error that carries them.

Validation never stops at the first bad value: every check appends a :class:`Problem` to a list,
and only when all inputs have been read does :func:`raise_if_errors` decide. ``error`` problems
make the analysis untrustworthy (the run stops with :class:`ClinicalDataError`); ``warning``
problems are reported in ``problems.csv`` and in the HTML report but do not stop the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pathology.errors import PathologyError

__all__ = [
    "PROBLEM_COLUMNS",
    "ClinicalDataError",
    "InputNotFoundError",
    "Problem",
    "errors_of",
    "summary_line",
]

Severity = Literal["error", "warning"]

#: Columns of ``problems.csv``, in order.
PROBLEM_COLUMNS = ("file", "row", "column", "value", "problem", "severity")


@dataclass(frozen=True)
class Problem:
    """One problem in one cell (or row, or file) of an input table.

    Parameters
    ----------
    file : str
        The input file as the user named it.
    row : int or None
        Line number in the file as a text editor or spreadsheet shows it (the header is row 1,
        the first data row is row 2); ``None`` for a problem of the whole file (a missing column).
    column : str
        The column concerned; empty when the problem is the whole row.
    value : str
        The offending value as written in the file (empty cells are ``""``).
    problem : str
        What is wrong and, where there is one, the fix.
    severity : {"error", "warning"}
        ``error``: the analysis cannot be trusted and does not run. ``warning``: reported, the
        analysis runs.
    """

    file: str
    row: int | None
    column: str
    value: str
    problem: str
    severity: Severity = "error"

    def as_row(self) -> dict[str, object]:
        """The problem as a ``problems.csv`` record (``row`` empty for file-level problems)."""
        return {
            "file": self.file,
            "row": "" if self.row is None else self.row,
            "column": self.column,
            "value": self.value,
            "problem": self.problem,
            "severity": self.severity,
        }


def errors_of(problems: Iterable[Problem]) -> list[Problem]:
    """The problems of severity ``error``, in order."""
    return [p for p in problems if p.severity == "error"]


def summary_line(problems: Sequence[Problem], problems_path: Path | None) -> str:
    """One line: how many errors in which files, and where the full list is.

    Examples
    --------
    ``"3 problems in clinical.csv, 1 in slides.csv; see out/problems.csv"``
    """
    counts: dict[str, int] = {}
    for p in errors_of(problems):
        counts[p.file] = counts.get(p.file, 0) + 1
    # "3 problems in clinical.csv, 1 in slides.csv": the noun only once, after the first count.
    parts = [
        f"{n} problem{'' if n == 1 else 's'} in {file}" if i == 0 else f"{n} in {file}"
        for i, (file, n) in enumerate(counts.items())
    ]
    where = (
        f"see {problems_path}"
        if problems_path is not None
        else "see the .problems attribute of this error"
    )
    warnings = len(problems) - sum(counts.values())
    more = f" ({warnings} warning{'s' if warnings != 1 else ''} too)" if warnings else ""
    return f"{', '.join(parts)}; {where}{more}; the analysis was not run"


class ClinicalDataError(PathologyError, ValueError):
    """The slide, map or clinical tables have problems that make the analysis untrustworthy.

    Attributes
    ----------
    problems : tuple of Problem
        Every problem found (errors and warnings), in the order found.
    problems_path : Path or None
        Where ``problems.csv`` was written (``None`` when no output folder was given).
    """

    def __init__(self, problems: Sequence[Problem], problems_path: Path | None) -> None:
        self.problems = tuple(problems)
        self.problems_path = problems_path
        super().__init__(summary_line(self.problems, problems_path))


class InputNotFoundError(PathologyError, FileNotFoundError):
    """An input table (slides, map, clinical or strata file) does not exist."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {what} file not found; check the path")
