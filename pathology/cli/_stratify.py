"""``pathology stratify SLIDES_CSV... --clinical CLINICAL.csv --out DIR``: strata, ORR and PFS."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stratify",
        help="patient strata (p16 x PD-L1 CPS), response rates and PFS from slide calls",
        description=(
            "Join slide calls (slides.csv from 'pathology score'; several files are concatenated) "
            "to a clinical table (patient_id, best_response, pfs_months, pfs_event), combine each "
            "patient's slides into one p16 call and CPS, assign strata, and write patients.csv, "
            "response.csv (ORR, exact 95% CI), tests.csv (Fisher, log-rank, Cox), pfs.csv, "
            "problems.csv, Kaplan-Meier plots and report.html into DIR. Exits 2 when the inputs "
            "have problems that make the analysis untrustworthy (listed in DIR/problems.csv)."
        ),
    )
    p.add_argument("slides", nargs="+", metavar="SLIDES_CSV", help="slides.csv file(s)")
    p.add_argument("--clinical", required=True, metavar="CLINICAL.csv", help="one row per patient")
    p.add_argument(
        "--map",
        metavar="MAP.csv",
        help="slide_id,patient_id table (default: the patient_id column of the slides files)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--strata",
        metavar="STRATA.yaml",
        help="strata definition (default: p16 call x CPS bin; see configs/strata.yaml)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    p.set_defaults(func=run)


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if v != v else f"{v:.{digits}g}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pathology.stratify import ClinicalDataError, stratify

    try:
        result = stratify(
            args.slides,
            args.clinical,
            map=args.map,
            out=args.out,
            strata=args.strata,
            overwrite=args.overwrite,
        )
    except ClinicalDataError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        table = Table(title=f"input problems (first {min(len(errors), 20)} of {len(errors)})")
        for col in ("file", "row", "column", "value", "problem"):
            table.add_column(col, overflow="fold")
        for p in errors[:20]:
            table.add_row(p.file, "" if p.row is None else str(p.row), p.column, p.value, p.problem)
        Console(stderr=True).print(table)
        raise
    if not args.quiet:
        console = Console()
        resp = Table(title="objective response (CR + PR), exact 95% CI")
        for col in ("factor", "group", "n", "responders", "ORR", "95% CI"):
            resp.add_column(col)
        for r in result.response.itertuples(index=False):
            ci = f"{_fmt(r.orr_ci_low, 2)}-{_fmt(r.orr_ci_high, 2)}" if r.n else ""
            resp.add_row(r.factor, r.group, str(r.n), str(r.responders), _fmt(r.orr, 2), ci)
        console.print(resp)
        tests = Table(title="tests (details and notes in tests.csv)")
        for col in ("factor", "test", "comparison", "n", "p", "effect", "95% CI"):
            tests.add_column(col)
        for r in result.tests.itertuples(index=False):
            computed = r.p_value == r.p_value
            ci = f"{_fmt(r.effect_ci_low)}-{_fmt(r.effect_ci_high)}" if computed else ""
            tests.add_row(
                r.factor,
                r.test,
                r.comparison,
                str(r.n),
                _fmt(r.p_value) if computed else "n/a",
                _fmt(r.effect) if computed else "",
                ci if r.effect_ci_low == r.effect_ci_low else "",
            )
        console.print(tests)
    n_warn = len(result.problems)
    warn = f"; {n_warn} warning(s) in {result.paths['problems.csv']}" if n_warn else ""
    print(f"{len(result.patients)} patients; wrote {result.paths['report.html']}{warn}")
    return 0
