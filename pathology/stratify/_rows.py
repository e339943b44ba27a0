"""Shared pieces of the statistics modules: patient groups and the rows of ``tests.csv``.

A comparison whose groups are too small (fewer than :data:`MIN_GROUP` patients, or no event)
still gets its row, with NaN values and a ``note`` saying why; a library failure (a Cox model
that does not converge) and library warnings become notes too, so one degenerate stratum never
stops the report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from pathology.stratify._vocab import CPS_BINS, P16_CALLS

__all__ = [
    "MIN_GROUP",
    "TEST_COLUMNS",
    "factor_groups",
    "group_sizes",
    "guarded",
    "guarded_rows",
    "join_note",
    "kept_groups",
    "make_row",
    "too_small",
]

#: Fewest patients a group needs to enter a test or a model.
MIN_GROUP = 2

TEST_COLUMNS = (
    "factor",
    "test",
    "statistic",
    "p_value",
    "effect",
    "effect_ci_low",
    "effect_ci_high",
    "effect_type",
    "comparison",
    "n",
    "events",
    "note",
)


def factor_groups(strata: Sequence[str]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """``(factor, patients.csv column, groups in order)`` for p16, CPS bin and stratum."""
    return (
        ("p16", "p16_call", P16_CALLS),
        ("cps_bin", "cps_bin", CPS_BINS),
        ("stratum", "stratum", tuple(strata)),
    )


def make_row(factor: str, test: str, comparison: str, n: int, **values: Any) -> dict[str, Any]:
    """A ``tests.csv`` row: NaN statistics, empty note, then ``values`` on top."""
    row: dict[str, Any] = dict.fromkeys(TEST_COLUMNS, math.nan)
    row.update(factor=factor, test=test, comparison=comparison, n=n, effect_type="", note="")
    row.update(values)
    return row


def guarded(row: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a library call for one row (see :func:`guarded_rows`)."""
    return guarded_rows([row], lambda: [compute()])[0]


def guarded_rows(
    rows: list[dict[str, Any]], compute: Callable[[], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Fill ``rows`` from one library call; warnings go into the notes, a failure leaves NaN."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for row, values in zip(rows, compute(), strict=True):
                row.update(values)
        except Exception as exc:  # a degenerate group must not stop the report
            for row in rows:
                row["note"] = join_note(
                    row["note"], f"not computed: {type(exc).__name__}: {squash(exc)}"
                )
    for msg in dict.fromkeys(squash(w.message) for w in caught):
        for row in rows:
            row["note"] = join_note(row["note"], msg)
    return rows


def squash(message: object) -> str:
    """A message on one line, at most 200 characters (for the note column)."""
    return " ".join(str(message).split())[:200]


def join_note(note: str, more: str) -> str:
    """``note; more`` (or ``more`` alone)."""
    return f"{note}; {more}" if note else more


def group_sizes(patients: pd.DataFrame, column: str, groups: Sequence[str]) -> dict[str, int]:
    """Patients per group of ``patients[column]``."""
    return {g: int((patients[column] == g).sum()) for g in groups}


def too_small(sizes: dict[str, int], groups_needed: int | None = None) -> str:
    """Why a comparison was not computed: ``groups_needed`` None = every group must qualify."""
    got = ", ".join(f"{g} n={n}" for g, n in sizes.items())
    if groups_needed is None:
        return f"not computed: needs {MIN_GROUP}+ patients in each group ({got})"
    return f"not computed: needs {groups_needed}+ groups of {MIN_GROUP}+ patients ({got})"


def kept_groups(
    patients: pd.DataFrame, column: str, groups: Sequence[str]
) -> tuple[list[str], dict[str, int], str]:
    """Groups with at least MIN_GROUP patients, all sizes, and a note on those left out."""
    sizes = group_sizes(patients, column, groups)
    kept = [g for g in groups if sizes[g] >= MIN_GROUP]
    out = [f"{g} (n={sizes[g]})" for g in groups if g not in kept]
    note = f"left out, fewer than {MIN_GROUP} patients: {', '.join(out)}" if out else ""
    return kept, sizes, note
