"""``pathology stratify``: every number against SciPy/lifelines computed here, and bad inputs.

The main cohort is generated below with its truth (each patient's p16 call, CPS, stratum,
response and PFS, following the documented multi-slide rules); the expected response rates,
tests and medians are computed in this file straight from that truth with SciPy and lifelines,
never through ``pathology.stratify``.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from lifelines.utils import median_survival_times
from scipy import stats
from scipy.stats.contingency import association, odds_ratio

from pathology.batch import REQUIRED_SLIDE_COLUMNS
from pathology.cli import main
from pathology.errors import ConfigError, OutputExistsError, PathologyError
from pathology.stratify import (
    ClinicalDataError,
    InputNotFoundError,
    StrataConfig,
    load_strata,
    stratify,
)

ROOT = Path(__file__).resolve().parents[1]
P16 = ("negative", "equivocal", "positive")
BINS = ("<1", "1-19", ">=20")
LABEL = {"negative": "p16-", "equivocal": "p16 equivocal", "positive": "p16+"}
SLIDE_COLUMNS = list(REQUIRED_SLIDE_COLUMNS[:14])  # the calls; no device/model/version
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- cohort generation


def _bin(cps: float) -> str:
    return "<1" if cps < 1 else "1-19" if cps < 20 else ">=20"


def _pct_for(rng: np.random.Generator, call: str) -> float:
    lo, hi = {"negative": (0, 45), "equivocal": (50, 69), "positive": (70, 99)}[call]
    return round(float(rng.uniform(lo, hi)), 2)


def _cps_for(rng: np.random.Generator, b: str) -> float:
    lo, hi = {"<1": (0, 0.95), "1-19": (1, 19.5), ">=20": (20, 100)}[b]
    return round(float(rng.uniform(lo, hi)), 2)


def _slide(sid: str, marker: str, call: str, *, pct: Any = "", cps: Any = "", ev: bool = True):
    return {
        "slide_id": sid,
        "path": f"slides/{sid}.svs",
        "marker": marker,
        "call": call,
        "tumor_cells": 5000 if ev else 40,
        "tumor_positive": 100,
        "immune_cells": 800,
        "immune_positive": 10,
        "positive_pct": pct,
        "cps": cps,
        "tps": "",
        "h_score": 50,
        "evaluable": "true" if ev else "false",
        "qc_flags": "" if ev else "few_tumor_cells",
    }


def make_cohort(n: int = 60, seed: int = 11) -> tuple[pd.DataFrame, list[dict], list[tuple]]:
    """Truth per patient, slide rows and map rows of a made-up cohort.

    Patterns by ``i % 10``: 3 = two discordant p16 slides (truth: equivocal), 5 = two concordant
    p16 slides (truth: that call, highest %), 7 = two evaluable PD-L1 slides (truth: max CPS),
    8 = a non-evaluable PD-L1 slide beside an evaluable one (truth: the evaluable one).
    """
    rng = np.random.default_rng(seed)
    truth, slides, mapping = [], [], []
    for i in range(n):
        pid = f"PT{i:03d}"
        kind = i % 10
        call = str(rng.choice(P16, p=[0.55, 0.12, 0.33]))
        if kind == 3:
            call = "equivocal"
            pcts = [
                ("negative", _pct_for(rng, "negative")),
                ("positive", _pct_for(rng, "positive")),
            ]
        elif kind == 5:
            pcts = [(call, _pct_for(rng, call)), (call, _pct_for(rng, call))]
        else:
            pcts = [(call, _pct_for(rng, call))]
        for j, (c, pct) in enumerate(pcts):
            slides.append(_slide(f"{pid}-p16-{j}", "p16", c, pct=pct))
        b = str(rng.choice(BINS, p=[0.3, 0.4, 0.3]))
        cps_values = [_cps_for(rng, b)]
        if kind == 7:
            cps_values.append(_cps_for(rng, str(rng.choice(BINS))))
        for j, v in enumerate(cps_values):
            slides.append(_slide(f"{pid}-pdl1-{j}", "pdl1", _bin(v), cps=v))
        if kind == 8:
            slides.append(_slide(f"{pid}-pdl1-ne", "pdl1", "not_evaluable", cps=99.0, ev=False))
        if i % 4 == 0:
            slides.append(
                _slide(f"{pid}-ki67-0", "ki67", "", pct=round(float(rng.uniform(5, 60)), 1))
            )
        cps = max(cps_values)
        b = _bin(cps)
        neg, high = call == "negative", b == ">=20"
        responder = rng.random() < 0.15 + 0.35 * neg + 0.2 * high
        response = (
            str(rng.choice(["CR", "PR"]))
            if responder
            else str(rng.choice(["SD", "PD", "NE"], p=[0.45, 0.45, 0.1]))
        )
        t_event = rng.exponential(1 / (0.15 * math.exp(-0.7 * neg - 0.4 * high)))
        t_censor = rng.uniform(4, 30)
        truth.append(
            {
                "patient_id": pid,
                "p16_call": call,
                "p16_positive_pct": max(p for c, p in pcts),
                "cps": cps,
                "cps_bin": b,
                "stratum": f"{LABEL[call]} / CPS {b}",
                "best_response": response,
                "responder": int(response in ("CR", "PR")),
                "pfs_months": round(float(min(t_event, t_censor)), 2),
                "pfs_event": int(t_event <= t_censor),
                "arm": "<b>A&B</b>" if i == 0 else "A",
            }
        )
        mapping += [(s["slide_id"], pid) for s in slides if s["slide_id"].startswith(pid + "-")]
    return pd.DataFrame(truth), slides, mapping


def write_inputs(folder: Path, truth: pd.DataFrame, slides: list[dict], mapping: list[tuple]):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(slides, columns=SLIDE_COLUMNS).to_csv(folder / "slides.csv", index=False)
    pd.DataFrame(mapping, columns=["slide_id", "patient_id"]).to_csv(
        folder / "map.csv", index=False
    )
    cols = ["patient_id", "best_response", "pfs_months", "pfs_event", "arm"]
    truth[cols].to_csv(folder / "clinical.csv", index=False)
    return folder / "slides.csv", folder / "map.csv", folder / "clinical.csv"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The main cohort, analysed once through the API and once through the CLI."""
    base = tmp_path_factory.mktemp("cohort")
    truth, slides, mapping = make_cohort()
    s, m, c = write_inputs(base / "in", truth, slides, mapping)
    result = stratify(s, c, map=m, out=base / "api")
    rc = main(
        [
            "-q",
            "stratify",
            str(s),
            "--map",
            str(m),
            "--clinical",
            str(c),
            "--out",
            str(base / "cli"),
        ]
    )
    return {"truth": truth, "result": result, "rc": rc, "base": base, "inputs": (s, m, c)}


# --------------------------------------------------------------------------- expected values


def _close(actual: float, expected: float, rel: float = 1e-7, abs_: float = 1e-12) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return math.isnan(actual)
    return actual == pytest.approx(expected, rel=rel, abs=abs_)


def expected_response(truth: pd.DataFrame) -> pd.DataFrame:
    rows = []
    strata = [f"{LABEL[p]} / CPS {b}" for p in P16 for b in BINS]
    for factor, col, groups in (
        ("p16", "p16_call", P16),
        ("cps_bin", "cps_bin", BINS),
        ("stratum", "stratum", strata),
    ):
        for g in groups:
            sub = truth[truth[col] == g]
            n, k = len(sub), int(sub["responder"].sum())
            if n:
                ci = stats.binomtest(k, n).proportion_ci(method="exact")
                rows.append((factor, g, n, k, k / n, ci.low, ci.high))
            else:
                rows.append((factor, g, 0, 0, math.nan, math.nan, math.nan))
    return pd.DataFrame(
        rows, columns=["factor", "group", "n", "responders", "orr", "orr_ci_low", "orr_ci_high"]
    )


def _resp_table(truth: pd.DataFrame, col: str, groups: tuple[str, ...]) -> np.ndarray:
    return np.array(
        [
            [
                int(truth.loc[truth[col] == g, "responder"].sum()),
                int((truth[col] == g).sum() - truth.loc[truth[col] == g, "responder"].sum()),
            ]
            for g in groups
        ]
    )


def exact_ffh_p(table: np.ndarray) -> tuple[float, float]:
    """Exact Fisher-Freeman-Halton p of an r x 2 table: enumerate every table with its margins."""
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    dist = stats.random_table(rows, cols)
    p_obs = dist.pmf(table)
    total = 0.0
    ranges = [range(0, int(r) + 1) for r in rows[:-1]]
    for first in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(len(ranges), -1).T:
        last = cols[0] - first.sum()
        if not 0 <= last <= rows[-1]:
            continue
        col0 = np.append(first, last)
        t = np.column_stack([col0, rows - col0])
        p = dist.pmf(t)
        if p <= p_obs * (1 + 1e-7):
            total += p
    return float(p_obs), total


def _cox(data: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return (
        CoxPHFitter()
        .fit(data[["pfs_months", "pfs_event", *cols]], "pfs_months", "pfs_event")
        .summary
    )


# --------------------------------------------------------------------------- main cohort


@pytest.mark.parametrize("how", ["api", "cli"])
def test_response_csv_matches_scipy(cohort: dict[str, Any], how: str) -> None:
    assert cohort["rc"] == 0
    got = pd.read_csv(cohort["base"] / how / "response.csv", keep_default_na=False, na_values=[""])
    exp = expected_response(cohort["truth"])
    assert list(got.columns) == [
        "factor",
        "group",
        "n",
        "responders",
        "orr",
        "orr_ci_low",
        "orr_ci_high",
    ]
    assert (
        got[["factor", "group"]].astype(str).values.tolist()
        == exp[["factor", "group"]].values.tolist()
    )
    assert got["n"].tolist() == exp["n"].tolist()
    assert got["responders"].tolist() == exp["responders"].tolist()
    for col in ("orr", "orr_ci_low", "orr_ci_high"):
        for a, e in zip(got[col], exp[col], strict=True):
            assert _close(a, e), (col, a, e)


def _test_row(tests: pd.DataFrame, factor: str, test: str, comparison: str = "") -> pd.Series:
    sub = tests[(tests["factor"] == factor) & (tests["test"] == test)]
    if comparison:
        sub = sub[sub["comparison"].str.startswith(comparison)]
    assert len(sub) == 1, (factor, test, comparison, sub)
    return sub.iloc[0]


@pytest.mark.parametrize("how", ["api", "cli"])
def test_tests_csv_matches_scipy_and_lifelines(cohort: dict[str, Any], how: str) -> None:
    truth: pd.DataFrame = cohort["truth"]
    tests = pd.read_csv(cohort["base"] / how / "tests.csv", keep_default_na=False, na_values=[""])
    assert list(tests.columns)[:7] == [
        "factor",
        "test",
        "statistic",
        "p_value",
        "effect",
        "effect_ci_low",
        "effect_ci_high",
    ]
    assert list(tests.columns)[-1] == "note"

    def check(row: pd.Series, **expected: float) -> None:
        for key, value in expected.items():
            assert _close(float(row[key]), float(value), rel=1e-6), (
                row["factor"],
                row["test"],
                key,
                row[key],
                value,
            )

    # Fisher, p16 negative vs positive x responder
    t = _resp_table(truth, "p16_call", ("negative", "positive"))
    fisher = stats.fisher_exact(t)
    ratio = odds_ratio(t, kind="conditional")
    ci = ratio.confidence_interval(0.95)
    row = _test_row(tests, "p16", "fisher_exact")
    check(
        row,
        statistic=fisher.statistic,
        p_value=fisher.pvalue,
        effect=ratio.statistic,
        effect_ci_low=ci.low,
        effect_ci_high=ci.high,
    )
    assert row["n"] == t.sum()

    # Fisher-Freeman-Halton across CPS bins: Monte Carlo p against the exact p enumerated here
    t = _resp_table(truth, "cps_bin", BINS)
    p_table, p_exact = exact_ffh_p(t)
    row = _test_row(tests, "cps_bin", "fisher_freeman_halton")
    check(row, statistic=p_table, effect=association(t, method="cramer"))
    assert abs(row["p_value"] - p_exact) < 0.01, (row["p_value"], p_exact)

    # log-rank p16 negative vs positive
    a, b = (truth[truth["p16_call"] == g] for g in ("negative", "positive"))
    lr = logrank_test(a["pfs_months"], b["pfs_months"], a["pfs_event"], b["pfs_event"])
    check(_test_row(tests, "p16", "logrank"), statistic=lr.test_statistic, p_value=lr.p_value)

    # log-rank across CPS bins and across strata (strata with 2+ patients)
    lr = multivariate_logrank_test(truth["pfs_months"], truth["cps_bin"], truth["pfs_event"])
    check(_test_row(tests, "cps_bin", "logrank"), statistic=lr.test_statistic, p_value=lr.p_value)
    sizes = truth["stratum"].value_counts()
    big = truth[truth["stratum"].isin(sizes[sizes >= 2].index)]
    lr = multivariate_logrank_test(big["pfs_months"], big["stratum"], big["pfs_event"])
    check(_test_row(tests, "stratum", "logrank"), statistic=lr.test_statistic, p_value=lr.p_value)

    # Cox: p16 negative vs positive, CPS per 10 points, CPS bins against <1
    data = truth[truth["p16_call"].isin(["negative", "positive"])].assign(
        x=lambda d: (d["p16_call"] == "negative").astype(int)
    )
    s = _cox(data, ["x"]).loc["x"]
    check(
        _test_row(tests, "p16", "cox"),
        statistic=s["z"],
        p_value=s["p"],
        effect=s["exp(coef)"],
        effect_ci_low=s["exp(coef) lower 95%"],
        effect_ci_high=s["exp(coef) upper 95%"],
    )
    s = _cox(truth.assign(x=truth["cps"] / 10), ["x"]).loc["x"]
    check(
        _test_row(tests, "cps", "cox"),
        statistic=s["z"],
        p_value=s["p"],
        effect=s["exp(coef)"],
        effect_ci_low=s["exp(coef) lower 95%"],
        effect_ci_high=s["exp(coef) upper 95%"],
    )
    data = truth.assign(
        mid=(truth["cps_bin"] == "1-19").astype(int), high=(truth["cps_bin"] == ">=20").astype(int)
    )
    summary = _cox(data, ["mid", "high"])
    for name, label in (("mid", "1-19 vs <1"), ("high", ">=20 vs <1")):
        s = summary.loc[name]
        check(
            _test_row(tests, "cps_bin", "cox", label),
            statistic=s["z"],
            p_value=s["p"],
            effect=s["exp(coef)"],
            effect_ci_low=s["exp(coef) lower 95%"],
            effect_ci_high=s["exp(coef) upper 95%"],
        )
    # every test was computed on this cohort
    assert tests["p_value"].notna().all(), tests[["factor", "test", "note"]]


def test_patients_follow_the_truth(cohort: dict[str, Any]) -> None:
    truth: pd.DataFrame = cohort["truth"]
    got = pd.read_csv(
        cohort["base"] / "api" / "patients.csv", keep_default_na=False, na_values=[""]
    )
    assert got["patient_id"].tolist() == truth["patient_id"].tolist()
    for col in ("p16_call", "cps_bin", "stratum", "best_response"):
        assert got[col].tolist() == truth[col].tolist(), col
    for col in ("cps", "p16_positive_pct", "pfs_months"):
        np.testing.assert_allclose(got[col], truth[col])
    assert got["responder"].tolist() == truth["responder"].tolist()
    # "nan" for a missing value under pandas 2 and 3 (3 keeps NaN through astype(str)).
    hpv_negative = [("nan" if pd.isna(v) else str(v).lower()) for v in got["hpv_negative"]]
    assert hpv_negative == [
        {"negative": "true", "positive": "false"}.get(c, "nan") for c in truth["p16_call"]
    ]
    discordant = got[got["patient_id"].str[-1] == "3"]
    assert discordant["flags"].str.contains("p16_discordant").all()
    assert (got["ki67_slides"] > 0).sum() == (truth.index % 4 == 0).sum()
    assert got["arm"].iloc[0] == "<b>A&B</b>"  # carried clinical column


def test_pfs_csv_matches_lifelines(cohort: dict[str, Any]) -> None:
    truth: pd.DataFrame = cohort["truth"]
    got = pd.read_csv(cohort["base"] / "api" / "pfs.csv", keep_default_na=False, na_values=[""])
    for row in got.itertuples(index=False):
        col = {"p16": "p16_call", "cps_bin": "cps_bin", "stratum": "stratum"}[row.factor]
        sub = truth[truth[col] == row.group]
        assert row.n == len(sub) and row.events == sub["pfs_event"].sum()
        if not len(sub):
            continue
        kmf = KaplanMeierFitter().fit(sub["pfs_months"], sub["pfs_event"])
        ci = np.asarray(median_survival_times(kmf.confidence_interval_), dtype=float).ravel()
        for a, e in (
            (row.median_pfs, kmf.median_survival_time_),
            (row.median_ci_low, ci[0]),
            (row.median_ci_high, ci[1]),
        ):
            assert _close(a, e if math.isfinite(e) else math.nan), (row, a, e)


def test_plots_and_report(cohort: dict[str, Any]) -> None:
    out = cohort["base"] / "api"
    result = cohort["result"]
    for name in ("km_p16.png", "km_cps.png", "km_stratum.png", "response.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert result.paths[name] == out / name
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4
    assert "<b>A&B</b>" not in report and "&lt;b&gt;A&amp;B&lt;/b&gt;" in report
    for text in (
        "fisher_exact",
        "fisher_freeman_halton",
        "logrank",
        "hazard_ratio",
        "p16- / CPS &gt;=20",
    ):
        assert text in report
    for path in cohort["inputs"]:  # provenance: every input with its sha256
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() in report
    assert not list(out.glob(".*partial"))  # atomic writes leave no temporary files


def test_result_object_and_cli_output_agree(cohort: dict[str, Any]) -> None:
    result = cohort["result"]
    for name in ("patients.csv", "response.csv", "tests.csv", "pfs.csv", "problems.csv"):
        api = (cohort["base"] / "api" / name).read_bytes()
        assert api == (cohort["base"] / "cli" / name).read_bytes(), name
    got = pd.read_csv(cohort["base"] / "api" / "tests.csv")
    np.testing.assert_allclose(got["p_value"], result.tests["p_value"], rtol=1e-12)
    assert len(result.patients) == 60
    assert all(p.severity == "warning" for p in result.problems)


def test_output_exists_refused_then_overwritten(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not an output: never blocks, never removed
    stratify(s, c, map=m, out=out)
    before = (out / "tests.csv").read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        stratify(s, c, map=m, out=out)
    argv = ["-q", "stratify", str(s), "--map", str(m), "--clinical", str(c), "--out", str(out)]
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "tests.csv").read_bytes() == before
    assert (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- small cohorts


def _small(n: int = 8, seed: int = 3) -> tuple[pd.DataFrame, list[dict], list[tuple]]:
    return make_cohort(n, seed)


def _write(
    folder: Path, truth: pd.DataFrame, slides: list[dict], mapping: list[tuple]
) -> tuple[Path, Path, Path]:
    return write_inputs(folder, truth, slides, mapping)


def _edit_csv(path: Path, edit: Callable[[list[list[str]]], None]) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    edit(rows)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _set(row: int, column: str, value: str) -> Callable[[list[list[str]]], None]:
    """Edit: set ``column`` on file row ``row`` (header = row 1)."""

    def edit(rows: list[list[str]]) -> None:
        rows[row - 1][rows[0].index(column)] = value

    return edit


def _problems(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "problems.csv", keep_default_na=False, dtype=str)


BAD_CLINICAL = [
    ("unknown_response", _set(3, "best_response", "PRR"), "3", "best_response", "PRR"),
    ("negative_pfs", _set(4, "pfs_months", "-2.5"), "4", "pfs_months", "-2.5"),
    ("text_pfs", _set(5, "pfs_months", "six"), "5", "pfs_months", "six"),
    ("empty_pfs", _set(2, "pfs_months", ""), "2", "pfs_months", ""),
    ("bad_event", _set(6, "pfs_event", "2"), "6", "pfs_event", "2"),
    ("duplicate_patient", _set(7, "patient_id", "PT001"), "7", "patient_id", "PT001"),
]


@pytest.mark.parametrize(
    ("case", "edit", "row", "column", "value"), BAD_CLINICAL, ids=[b[0] for b in BAD_CLINICAL]
)
def test_bad_clinical_value_is_reported_and_fatal(
    tmp_path: Path, case: str, edit: Callable, row: str, column: str, value: str
) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    _edit_csv(c, edit)
    out = tmp_path / "out"
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m, out=out)
    message = str(exc.value)
    assert "\n" not in message and str(c) in message and str(out / "problems.csv") in message
    assert isinstance(exc.value, PathologyError) and isinstance(exc.value, ValueError)
    probs = _problems(out)
    hit = probs[(probs["file"] == str(c)) & (probs["row"] == row) & (probs["column"] == column)]
    assert len(hit) == 1 and hit["value"].iloc[0] == value and hit["severity"].iloc[0] == "error"
    assert hit["file"].iloc[0] == str(c)
    if case == "duplicate_patient":  # both rows of the duplicated patient are named
        assert set(probs.loc[probs["value"] == "PT001", "row"]) == {"3", "7"}
    # nothing but problems.csv was written
    assert sorted(p.name for p in out.iterdir()) == ["problems.csv"]
    # the CLI exits 2 with the same one-line message
    assert (
        main(
            [
                "-q",
                "stratify",
                str(s),
                "--map",
                str(m),
                "--clinical",
                str(c),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )


def test_missing_clinical_column_and_cli_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    frame = pd.read_csv(c).drop(columns=["pfs_event"]).rename(columns={"patient_id": "Patient_ID"})
    frame.to_csv(c, index=False)
    out = tmp_path / "out"
    rc = main(["stratify", str(s), "--map", str(m), "--clinical", str(c), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("pathology stratify: error: ") and str(c) in last and "problems.csv" in last
    )
    probs = _problems(out)
    missing = probs[probs["row"] == ""]
    assert set(missing["column"]) == {"pfs_event", "patient_id"}
    assert missing["problem"].str.contains("Patient_ID").any()  # the near-miss is named


def test_every_problem_row_is_reported_at_once(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    for edit in (
        _set(2, "best_response", "??"),
        _set(3, "pfs_months", "-1"),
        _set(9, "pfs_event", "yes"),
    ):
        _edit_csv(c, edit)
    _edit_csv(s, _set(2, "call", "strongly positive"))
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m, out=tmp_path / "out")
    errors = [p for p in exc.value.problems if p.severity == "error"]
    assert {(p.file, p.row, p.column) for p in errors} == {
        (str(c), 2, "best_response"),
        (str(c), 3, "pfs_months"),
        (str(c), 9, "pfs_event"),
        (str(s), 2, "call"),
    }
    assert str(exc.value).startswith("3 problems in " + str(c) + ", 1 in " + str(s))


def test_slide_without_patient_is_fatal(tmp_path: Path) -> None:
    truth, slides, mapping = _small()
    s, m, c = _write(tmp_path / "in", truth, slides, mapping[1:])  # first slide unmapped
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m, out=tmp_path / "out")
    (p,) = [p for p in exc.value.problems if p.severity == "error"]
    assert (p.file, p.row, p.column, p.value) == (str(s), 2, "slide_id", slides[0]["slide_id"])
    assert "no patient" in p.problem


def test_slide_of_patient_missing_from_clinical_is_fatal(tmp_path: Path) -> None:
    truth, slides, mapping = _small()
    s, m, c = _write(tmp_path / "in", truth, slides, mapping)
    pd.read_csv(c).iloc[1:].to_csv(c, index=False)  # PT000 has slides but no clinical row
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m)
    errors = [p for p in exc.value.problems if p.severity == "error"]
    assert errors and all(p.value == "PT000" and p.file == str(s) for p in errors)
    assert "see the .problems attribute" in str(exc.value)  # no out folder: nothing written


def test_patient_without_slides_is_a_warning(tmp_path: Path) -> None:
    truth, slides, mapping = _small()
    keep = [s for s in slides if not s["slide_id"].startswith("PT002-")]
    s, m, c = _write(tmp_path / "in", truth, keep, [x for x in mapping if x[1] != "PT002"])
    result = stratify(s, c, map=m, out=tmp_path / "out")
    row = result.patients.set_index("patient_id").loc["PT002"]
    assert row["flags"] == "no_slides;no_stratum" and row["p16_call"] == "" and row["stratum"] == ""
    probs = _problems(tmp_path / "out")
    hit = probs[(probs["value"] == "PT002") & (probs["severity"] == "warning")]
    assert len(hit) == 1 and hit["row"].iloc[0] == "4" and "no slides" in hit["problem"].iloc[0]
    assert result.response.set_index(["factor", "group"])["n"].xs("p16").sum() == 7


def test_several_slide_files_conflicting_and_identical_repeats(tmp_path: Path) -> None:
    truth, slides, mapping = _small()
    s, m, c = _write(tmp_path / "in", truth, slides, mapping)
    second = tmp_path / "in" / "slides2.csv"
    pd.DataFrame([slides[0], slides[1]], columns=SLIDE_COLUMNS).to_csv(second, index=False)
    result = stratify([s, second], c, map=m)  # identical repeats: warnings, counted once
    repeats = [p for p in result.problems if "counted once" in p.problem]
    assert [(p.file, p.row) for p in repeats] == [(str(second), 2), (str(second), 3)]
    first = result.patients.iloc[0]
    assert (first["p16_slides"], first["pdl1_slides"]) == (1, 1)
    _edit_csv(second, _set(3, "cps", "55.5"))  # same slide_id, another CPS
    with pytest.raises(ClinicalDataError) as exc:
        stratify([s, second], c, map=m)
    (p,) = [p for p in exc.value.problems if p.severity == "error"]
    assert (p.file, p.row, p.column, p.value) == (str(second), 3, "cps", "55.5")
    assert f"{s} row 3" in p.problem


def test_map_conflicts_and_patient_id_column(tmp_path: Path) -> None:
    truth, slides, mapping = _small()
    s, m, c = _write(tmp_path / "in", truth, slides, mapping)
    with m.open("a") as fh:
        fh.write(f"{mapping[0][0]},PT005\n")  # same slide, second patient
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m)
    assert any(
        p.file == str(m) and p.column == "patient_id" and p.value == "PT005"
        for p in exc.value.problems
    )
    # without a map, a patient_id column in slides.csv is used (and positive_pct may be named
    # p16_positive_pct, as in DESIGN.md)
    frame = pd.DataFrame(slides, columns=SLIDE_COLUMNS).rename(
        columns={"positive_pct": "p16_positive_pct"}
    )
    frame["patient_id"] = [dict(mapping)[sid] for sid in frame["slide_id"]]
    alone = tmp_path / "slides_pid.csv"
    frame.to_csv(alone, index=False)
    result = stratify(alone, c)
    assert result.patients["p16_call"].tolist() == truth["p16_call"].tolist()
    np.testing.assert_allclose(result.patients["p16_positive_pct"], truth["p16_positive_pct"])


def test_row_numbers_survive_blank_lines_and_bom(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    lines = c.read_text().splitlines()
    lines[4] = lines[4].replace(",", ",X", 1)  # file row 5: bad response code
    c.write_text("\ufeff" + "\n".join([*lines[:3], "", *lines[3:]]) + "\n")  # blank line 4
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m)
    (p,) = [p for p in exc.value.problems if p.severity == "error"]
    assert (p.row, p.column) == (6, "best_response")


def test_broken_files_are_reported_once_without_cascades(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    c.write_text("")
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m)
    assert [(p.file, p.row, p.problem) for p in exc.value.problems] == [
        (str(c), None, "file is empty; expected a header row")
    ]
    _write(tmp_path / "in", *_small())  # restore the clinical table; break the map instead
    m.write_text("slide,patient\nPT000-p16-0,PT000\n")
    with pytest.raises(ClinicalDataError) as exc:
        stratify(s, c, map=m)
    assert {(p.file, p.column, p.severity) for p in exc.value.problems} == {
        (str(m), "slide_id", "error"),
        (str(m), "patient_id", "error"),
    }


# --------------------------------------------------------------------------- multi-slide rules


def _rules_case(tmp_path: Path, p16_slides: list[tuple], pdl1_slides: list[tuple]) -> pd.Series:
    """Analyse one patient of interest (PT000) with the given slides, others as generated."""
    truth, slides, mapping = _small()
    slides = [x for x in slides if not x["slide_id"].startswith("PT000-")]
    mapping = [x for x in mapping if x[1] != "PT000"]
    for j, (call, pct, ev) in enumerate(p16_slides):
        slides.append(_slide(f"PT000-p16-{j}", "p16", call, pct=pct, ev=ev))
    for j, (call, cps, ev) in enumerate(pdl1_slides):
        slides.append(_slide(f"PT000-pdl1-{j}", "pdl1", call, cps=cps, ev=ev))
    mapping += [(x["slide_id"], "PT000") for x in slides if x["slide_id"].startswith("PT000-")]
    s, m, c = _write(tmp_path, truth, slides, mapping)
    result = stratify(s, c, map=m)
    return result.patients.set_index("patient_id").loc["PT000"], result


def test_p16_discordant_slides_make_the_patient_equivocal(tmp_path: Path) -> None:
    row, result = _rules_case(
        tmp_path, [("negative", 10.0, True), ("positive", 80.0, True)], [("1-19", 5.0, True)]
    )
    assert row["p16_call"] == "equivocal" and "p16_discordant" in row["flags"]
    assert row["p16_positive_pct"] == 80.0 and row["stratum"] == "p16 equivocal / CPS 1-19"
    assert any("disagree" in p.problem and p.value == "PT000" for p in result.problems)


def test_p16_concordant_and_non_evaluable_slides(tmp_path: Path) -> None:
    row, _ = _rules_case(
        tmp_path,
        [("negative", 10.0, True), ("negative", 30.0, True), ("positive", 90.0, False)],
        [("<1", 0.5, True)],
    )
    assert row["p16_call"] == "negative" and row["p16_positive_pct"] == 30.0 and row["flags"] == ""
    assert row["hpv_negative"] == "true" and row["stratum"] == "p16- / CPS <1"


def test_all_p16_slides_not_evaluable(tmp_path: Path) -> None:
    row, result = _rules_case(tmp_path, [("not_evaluable", "", False)], [("<1", 0.5, True)])
    assert row["p16_call"] == "not_evaluable" and "p16_not_evaluable" in row["flags"]
    assert row["stratum"] == "" and "no_stratum" in row["flags"]
    assert result.response.set_index(["factor", "group"])["n"].xs("p16").sum() == 7


def test_cps_is_the_max_over_evaluable_slides(tmp_path: Path) -> None:
    row, _ = _rules_case(
        tmp_path,
        [("positive", 90.0, True)],
        [("<1", 0.4, True), (">=20", 35.0, True), ("not_evaluable", 80.0, False)],
    )
    assert row["cps"] == 35.0 and row["cps_bin"] == ">=20" and "pdl1_heterogeneous" in row["flags"]
    assert row["pdl1_slides"] == 3 and row["stratum"] == "p16+ / CPS >=20"


def test_all_pdl1_slides_not_evaluable_and_no_pdl1_slide(tmp_path: Path) -> None:
    row, _ = _rules_case(
        tmp_path / "a", [("positive", 90.0, True)], [("not_evaluable", "", False)] * 2
    )
    assert row["cps_bin"] == "not_evaluable" and math.isnan(row["cps"])
    assert "pdl1_not_evaluable" in row["flags"]
    row, result = _rules_case(tmp_path / "b", [("positive", 90.0, True)], [])
    assert row["cps_bin"] == "" and "no_pdl1_slide" in row["flags"]
    assert any("no PD-L1 slide" in p.problem for p in result.problems)


# --------------------------------------------------------------------------- degenerate groups


def test_tiny_groups_give_nan_rows_with_notes(tmp_path: Path) -> None:
    truth, slides, mapping = make_cohort(6, seed=5)
    # everyone p16-positive, no progression: no two-group test or Cox model is possible
    slides = [
        dict(x, call="positive", positive_pct=90.0) if x["marker"] == "p16" else x for x in slides
    ]
    truth = truth.assign(pfs_event=0)
    s, m, c = _write(tmp_path / "in", truth, slides, mapping)
    result = stratify(s, c, map=m, out=tmp_path / "out")
    fisher = _test_row(result.tests, "p16", "fisher_exact")
    assert math.isnan(fisher["p_value"]) and "negative n=0" in fisher["note"]
    assert _test_row(result.tests, "p16", "logrank")["note"].startswith("not computed")
    assert result.tests.loc[result.tests["test"] == "cox", "p_value"].isna().all()
    assert (result.tests.loc[result.tests["test"] == "cox", "note"] != "").all()
    assert (tmp_path / "out" / "km_p16.png").read_bytes().startswith(PNG_MAGIC)
    eq = result.response[
        (result.response["factor"] == "p16") & (result.response["group"] == "equivocal")
    ]
    assert eq["n"].item() == 0 and math.isnan(eq["orr"].item())


def test_single_patient_cohort_does_not_crash(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *make_cohort(1, seed=2))
    result = stratify(s, c, map=m, out=tmp_path / "out")
    assert result.tests["p_value"].isna().all() and (result.tests["note"] != "").all()
    assert (tmp_path / "out" / "report.html").exists()


# --------------------------------------------------------------------------- config


def test_committed_strata_yaml_is_the_default() -> None:
    assert load_strata(ROOT / "configs" / "strata.yaml") == StrataConfig.default()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("strata:\n  - name: a\n    p16: [neg]\n", r"strata\[0\]\.p16: unknown value 'neg'"),
        ("strata:\n  - name: a\n    cps: ['<1']\n", r"strata\[0\]\.cps: unknown key"),
        ("stratas: []\n", r"unknown key 'stratas'"),
        ("strata:\n  - name: a\n  - name: a\n", "unique"),
        ("strata:\n  - p16: [negative]\n", r"strata\[0\]\.name"),
        ("strata: [\n", "not valid YAML"),
    ],
)
def test_bad_strata_yaml(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "strata.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_strata(path)
    assert str(path) in str(exc.value)


def test_custom_strata(tmp_path: Path) -> None:
    truth, slides, mapping = _small(12)
    s, m, c = _write(tmp_path / "in", truth, slides, mapping)
    yaml_path = tmp_path / "strata.yaml"
    yaml_path.write_text(
        "strata:\n"
        "  - name: HPV-negative, CPS >= 1\n    p16: [negative]\n    cps_bin: ['1-19', '>=20']\n"
        "  - name: other\n"
    )
    result = stratify(s, c, map=m, strata=yaml_path)
    expected = np.where(
        (truth["p16_call"] == "negative") & truth["cps_bin"].isin(["1-19", ">=20"]),
        "HPV-negative, CPS >= 1",
        "other",
    )
    assert result.patients["stratum"].tolist() == expected.tolist()
    groups = result.response.loc[result.response["factor"] == "stratum", "group"].tolist()
    assert groups == ["HPV-negative, CPS >= 1", "other"]


def test_missing_input_file(tmp_path: Path) -> None:
    s, m, c = _write(tmp_path / "in", *_small())
    with pytest.raises(InputNotFoundError, match="clinical file not found"):
        stratify(s, tmp_path / "nope.csv", map=m, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before the output folder is made
    with pytest.raises(FileNotFoundError, match="slides file not found"):
        stratify([s, tmp_path / "none.csv"], c, map=m)


# --------------------------------------------------------------------------- CLI and example


def test_help_stays_light() -> None:
    code = (
        "import sys; from pathology.cli import build_parser; build_parser(); "
        "import pathology.stratify; "
        "print(','.join(m for m in ('pandas', 'scipy', 'lifelines', 'matplotlib', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_example_script_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "example_cohort", ROOT / "scripts" / "example_cohort.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--patients", "40"]) == 0
    assert (tmp_path / "results" / "report.html").exists()
    assert "report:" in capsys.readouterr().out
