"""``stratify()``: slide calls + clinical table -> strata, response and PFS tables, plots, report."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pathology.stratify._config import StrataConfig, load_strata
from pathology.stratify._problems import (
    PROBLEM_COLUMNS,
    ClinicalDataError,
    InputNotFoundError,
    Problem,
    errors_of,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["StratifyResult", "stratify"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class StratifyResult:
    """What :func:`stratify` computed and wrote.

    Attributes
    ----------
    patients : DataFrame
        One row per clinical patient (``patients.csv``).
    response : DataFrame
        ORR with exact 95% CI by p16 call, CPS bin and stratum (``response.csv``).
    tests : DataFrame
        Fisher, Fisher-Freeman-Halton, log-rank and Cox results (``tests.csv``).
    pfs : DataFrame
        Kaplan-Meier median PFS by group (``pfs.csv``).
    problems : tuple of Problem
        Warnings (a run with errors raises :class:`ClinicalDataError` instead).
    paths : mapping of str to Path
        Every file written, by name (``"report.html"`` ...); empty when ``out`` was None.
    strata : StrataConfig
        The strata used.
    """

    patients: pd.DataFrame
    response: pd.DataFrame
    tests: pd.DataFrame
    pfs: pd.DataFrame
    problems: tuple[Problem, ...]
    paths: Mapping[str, Path] = field(default_factory=dict)
    strata: StrataConfig = field(default_factory=StrataConfig.default)


def _as_list(slides: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(slides, (str, os.PathLike)):
        return [slides]
    return list(slides)


def stratify(
    slides: PathLike | Sequence[PathLike],
    clinical: PathLike,
    *,
    map: PathLike | None = None,
    out: PathLike | None = None,
    strata: PathLike | StrataConfig | None = None,
    overwrite: bool = False,
) -> StratifyResult:
    """Stratify a cohort's patients by p16 and PD-L1 CPS and relate strata to response and PFS.

    Parameters
    ----------
    slides : path-like or sequence of path-like
        One or more ``slides.csv`` files written by ``pathology score`` (concatenated).
    clinical : path-like
        Clinical table with ``patient_id, best_response, pfs_months, pfs_event``; other
        columns are carried into ``patients.csv``.
    map : path-like, optional
        ``slide_id, patient_id`` table. Without it the slides tables need a ``patient_id``
        column.
    out : path-like, optional
        Output folder for ``patients.csv``, ``response.csv``, ``tests.csv``, ``pfs.csv``,
        ``problems.csv``, the PNG figures and ``report.html``. ``None``: compute only, write
        nothing (no figures are drawn).
    strata : path-like or StrataConfig, optional
        Strata YAML (see ``configs/strata.yaml``) or a config; default p16 call x CPS bin.
    overwrite : bool
        Replace the outputs of an earlier run in ``out`` (only files this function writes).

    Returns
    -------
    StratifyResult

    Raises
    ------
    ClinicalDataError
        The inputs have problems that make the analysis untrustworthy. Every problem (errors
        and warnings) is in ``.problems`` and, when ``out`` is given, in ``out/problems.csv``,
        written before raising; no other output is written.
    OutputExistsError
        ``out`` holds outputs of an earlier run and ``overwrite`` is false.
    InputNotFoundError
        An input file does not exist.
    ConfigError
        The strata file is invalid.
    """
    from pathology.stratify._io import claim_out_dir, write_csv
    from pathology.stratify._patients import build_patients
    from pathology.stratify._stats import association_tests, response_table
    from pathology.stratify._survival import pfs_table
    from pathology.stratify._validate import load_inputs

    slide_paths = _as_list(slides)
    if not slide_paths:
        raise ValueError("stratify needs at least one slides table")
    if isinstance(strata, StrataConfig):
        config = strata
    else:
        config = load_strata(strata) if strata is not None else StrataConfig.default()
    for what, path in _input_files(slide_paths, clinical, map, None):
        if not path.is_file():
            raise InputNotFoundError(path, what)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        claim_out_dir(out_dir, overwrite)

    inputs = load_inputs(slide_paths, clinical, map)
    problems = list(inputs.problems)
    if errors_of(problems):
        written = _write_problems(out_dir, problems) if out_dir is not None else None
        raise ClinicalDataError(problems, written)

    patients, warnings = build_patients(inputs, config)
    problems += warnings
    response = response_table(patients, config.names)
    tests = association_tests(patients, config.names)
    pfs = pfs_table(patients, config.names)
    paths: dict[str, Path] = {}
    if out_dir is not None:
        for name, frame in (
            ("patients.csv", patients),
            ("response.csv", response),
            ("tests.csv", tests),
            ("pfs.csv", pfs),
        ):
            paths[name] = write_csv(out_dir / name, frame)
        paths["problems.csv"] = _write_problems(out_dir, problems)
        paths.update(
            _write_figures_and_report(
                out_dir,
                patients=patients,
                response=response,
                tests=tests,
                pfs=pfs,
                problems=problems,
                config=config,
                input_files=_input_files(slide_paths, clinical, map, strata),
                n_slides=len(inputs.slides),
            )
        )
    return StratifyResult(patients, response, tests, pfs, tuple(problems), paths, config)


def _write_problems(out_dir: Path, problems: Sequence[Problem]) -> Path:
    import pandas as pd

    from pathology.stratify._io import write_csv

    frame = pd.DataFrame([p.as_row() for p in problems], columns=list(PROBLEM_COLUMNS))
    return write_csv(out_dir / "problems.csv", frame)


def _input_files(
    slides: Sequence[PathLike],
    clinical: PathLike,
    map_path: PathLike | None,
    strata: PathLike | StrataConfig | None,
) -> list[tuple[str, Path]]:
    files = [("slides", Path(p)) for p in slides] + [("clinical", Path(clinical))]
    if map_path is not None:
        files.append(("map", Path(map_path)))
    if strata is not None and not isinstance(strata, StrataConfig):
        files.append(("strata", Path(strata)))
    return files


def _write_figures_and_report(
    out_dir: Path,
    *,
    patients: pd.DataFrame,
    response: pd.DataFrame,
    tests: pd.DataFrame,
    pfs: pd.DataFrame,
    problems: Sequence[Problem],
    config: StrataConfig,
    input_files: Sequence[tuple[str, Path]],
    n_slides: int,
) -> dict[str, Path]:
    from pathology.stratify._io import sha256, write_bytes, write_text
    from pathology.stratify._plots import km_png, response_png
    from pathology.stratify._report import InputFile, render_report
    from pathology.stratify._vocab import CPS_BINS, P16_CALLS

    def logrank_p(factor: str) -> str:
        row = tests[(tests["factor"] == factor) & (tests["test"] == "logrank")]
        p = float(row["p_value"].iloc[0]) if len(row) else float("nan")
        comparison = str(row["comparison"].iloc[0]) if len(row) else ""
        return f"log-rank p = {p:.3g} ({comparison})" if p == p else "log-rank test not computed"

    figures = {
        "km_p16.png": km_png(patients, "p16_call", P16_CALLS, "PFS by p16 call", logrank_p("p16")),
        "km_cps.png": km_png(
            patients, "cps_bin", CPS_BINS, "PFS by PD-L1 CPS bin", logrank_p("cps_bin")
        ),
        "km_stratum.png": km_png(
            patients, "stratum", config.names, "PFS by stratum", logrank_p("stratum")
        ),
        "response.png": response_png(response),
    }
    paths = {name: write_bytes(out_dir / name, png) for name, png in figures.items()}
    inputs = [InputFile(role, os.fspath(p), p.stat().st_size, sha256(p)) for role, p in input_files]
    text = render_report(
        patients=patients,
        response=response,
        tests=tests,
        pfs=pfs,
        problems=problems,
        figures=figures,
        config=config,
        inputs=inputs,
        n_slides=n_slides,
    )
    paths["report.html"] = write_text(out_dir / "report.html", text)
    return paths
