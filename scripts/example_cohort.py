"""Example cohort analysis: make up a trial cohort, then run ``pathology stratify`` end to end.

    python scripts/example_cohort.py OUTDIR [--patients 80] [--seed 7] [--overwrite]

Writes ``OUTDIR/inputs/`` (``slides.csv`` as ``pathology score`` writes it, ``map.csv``,
``clinical.csv``) and ``OUTDIR/results/`` (patients, response, tests, PFS tables, Kaplan-Meier
plots and ``report.html``). Without OUTDIR a temporary folder is used and kept.

The cohort is made up (no real patient): p16 and PD-L1 slides per patient, some patients with
two blocks, some slides not evaluable, a Ki-67 slide that is carried along, and responses and
PFS that depend on the strata (p16-negative and high-CPS patients do better), so the tests have
something to find.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pathology.batch import REQUIRED_SLIDE_COLUMNS as SLIDE_COLUMNS

SITES = ("oral cavity", "oropharynx", "larynx", "hypopharynx")


def _p16_call(pct: float) -> str:
    return "positive" if pct >= 70 else "equivocal" if pct >= 50 else "negative"


def _cps_call(cps: float) -> str:
    return "<1" if cps < 1 else "1-19" if cps < 20 else ">=20"


def _slide(rng: np.random.Generator, slide_id: str, marker: str, level: float) -> dict[str, object]:
    """One made-up slide row: ``level`` is the p16 % or the CPS the block shows."""
    tumor = int(rng.integers(2_000, 20_000))
    few = rng.random() < 0.06  # a block with too few tumour cells: not evaluable
    if few:
        tumor = int(rng.integers(20, 99))
    immune = int(tumor * rng.uniform(0.1, 0.4))
    row: dict[str, object] = dict.fromkeys(SLIDE_COLUMNS, "")
    row.update(
        slide_id=slide_id,
        path=f"slides/{slide_id}.svs",
        marker=marker,
        tumor_cells=tumor,
        immune_cells=immune,
        evaluable="false" if few else "true",
        qc_flags="few_tumor_cells" if few else "",
        device="cuda",
        model="example-v1",
        version="0.1.0",
        seconds=round(float(rng.uniform(20, 60)), 1),
    )
    if marker == "p16":
        pos = round(tumor * level / 100)
        row.update(
            tumor_positive=pos,
            immune_positive=0,
            positive_pct=round(100 * pos / tumor, 2),
            h_score=round(2.4 * level, 1),
            call="not_evaluable" if few else _p16_call(100 * pos / tumor),
        )
    elif marker == "pdl1":
        tps = min(level * 0.6, 100.0)
        tpos = round(tumor * tps / 100)
        ipos = min(immune, max(0, round(tumor * level / 100) - tpos))
        cps = min(100.0, 100 * (tpos + ipos) / tumor)
        row.update(
            tumor_positive=tpos,
            immune_positive=ipos,
            cps=round(cps, 2),
            tps=round(100 * tpos / tumor, 2),
            h_score=round(1.5 * tps, 1),
            call="not_evaluable" if few else _cps_call(round(cps, 2)),
        )
    else:  # ki67: carried along, not stratified
        pos = round(tumor * level / 100)
        row.update(tumor_positive=pos, positive_pct=round(100 * pos / tumor, 2), call="")
    return row


def make_cohort(out_dir: Path, n_patients: int = 80, seed: int = 7) -> dict[str, Path]:
    """Write ``slides.csv``, ``map.csv`` and ``clinical.csv`` of a made-up cohort into ``out_dir``.

    Returns
    -------
    dict
        ``{"slides": ..., "map": ..., "clinical": ...}`` paths.
    """
    rng = np.random.default_rng(seed)
    slides: list[dict[str, object]] = []
    mapping: list[tuple[str, str]] = []
    clinical: list[dict[str, object]] = []
    for i in range(1, n_patients + 1):
        pid = f"HN{i:03d}"
        site = SITES[int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))]
        # p16: mostly negative outside the oropharynx; 2 blocks for one patient in eight.
        p_pos = 0.7 if site == "oropharynx" else 0.12
        u = rng.random()
        p16_pct = (
            rng.uniform(75, 98)
            if u < p_pos
            else rng.uniform(50, 69)
            if u < p_pos + 0.06
            else rng.uniform(0, 30)
        )
        cps = float(min(100.0, rng.lognormal(mean=1.8, sigma=1.6)))
        if rng.random() < 0.15:
            cps = float(rng.uniform(0, 0.9))
        blocks = 2 if rng.random() < 0.125 else 1
        for b in range(blocks):
            sid = f"{pid}-p16-{b + 1}"
            slides.append(
                _slide(rng, sid, "p16", float(np.clip(p16_pct + rng.normal(0, 3), 0, 100)))
            )
            mapping.append((sid, pid))
        for b in range(2 if rng.random() < 0.25 else 1):
            sid = f"{pid}-pdl1-{b + 1}"
            level = cps if b == 0 else cps * rng.uniform(0.3, 1.5)
            slides.append(_slide(rng, sid, "pdl1", float(level)))
            mapping.append((sid, pid))
        if rng.random() < 0.5:
            sid = f"{pid}-ki67-1"
            slides.append(_slide(rng, sid, "ki67", float(rng.uniform(5, 80))))
            mapping.append((sid, pid))
        # Outcome model: p16-negative and higher CPS respond more and progress later.
        p16_negative = p16_pct < 50
        logit = -1.6 + 1.1 * p16_negative + 0.9 * (cps >= 20) + 0.4 * (1 <= cps < 20)
        responder = rng.random() < 1 / (1 + math.exp(-logit))
        response = (
            ("CR" if rng.random() < 0.15 else "PR")
            if responder
            else str(rng.choice(["SD", "PD", "NE"], p=[0.45, 0.48, 0.07]))
        )
        hazard = 0.18 * math.exp(-0.5 * p16_negative - 0.5 * (cps >= 20) - 0.7 * responder)
        t_event = float(rng.exponential(1 / hazard))
        t_censor = float(rng.uniform(6, 30))
        clinical.append(
            {
                "patient_id": pid,
                "best_response": response,
                "pfs_months": round(min(t_event, t_censor), 2),
                "pfs_event": int(t_event <= t_censor),
                "age": int(rng.integers(38, 82)),
                "site": site,
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {n: out_dir / f"{n}.csv" for n in ("slides", "map", "clinical")}
    with paths["slides"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SLIDE_COLUMNS)
        w.writeheader()
        w.writerows(slides)
    with paths["map"].open("w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "patient_id"), *mapping])
    with paths["clinical"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(clinical[0]))
        w.writeheader()
        w.writerows(clinical)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Make the cohort and run the analysis; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="output folder (default: a new temporary folder)")
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from pathology.stratify import stratify

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="stratify-example-"))
    inputs = make_cohort(out / "inputs", args.patients, args.seed)
    result = stratify(
        inputs["slides"],
        inputs["clinical"],
        map=inputs["map"],
        out=out / "results",
        overwrite=args.overwrite,
    )
    print(result.response.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    cols = ["factor", "test", "comparison", "p_value", "effect", "effect_ci_low", "effect_ci_high"]
    print(result.tests[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"{len(result.problems)} warnings; report: {result.paths['report.html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
