"""``pathology score``: synthetic slides with known truth through the whole batch path.

One batch (a manifest of seven synthetic slides and five bad inputs) is scored once per module; the
tests then check calls and values against the synthetic truth, the output contract, the failure
reports, reruns, a changed setting, and a run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pathology.cli import main

SIZE = 2048  # px at 0.5 um/px: ~1,000 tumour cells, 45 tissue tiles, one shard
SLIDES = {  # slide_id -> (synth preset, seed)
    "p16-pos": ("p16_positive", 11),
    "p16-equiv": ("p16_equivocal", 12),
    "p16-neg": ("p16_negative", 13),
    "p16-weak": ("p16_weak_diffuse", 18),  # 15 % positive but 70 % weak: equivocal (CAP 2025)
    "pdl1-lt1": ("pdl1_cps_lt1", 14),
    "pdl1-1-19": ("pdl1_cps_1_19", 15),
    "pdl1-ge20": ("pdl1_cps_ge20", 16),
    "pdl1-few": ("pdl1_few_tumor", 17),
    # This seed's stains are jittered (haematoxylin 6 degrees off the reference). Until
    # 2026-11-24 its DAB vector was estimated from a slide with almost no DAB: 4.2 degrees off
    # the true one (the reference is 1.8 off), ~15 negative lymphocytes read PD-L1 positive and
    # CPS read 2.4 (1-19) for a truth of 0.55 (< 1). A slide with clear DAB in under 10 % of its
    # stained pixels now keeps the reference DAB vector (``MIN_DAB_SHARE``): CPS 0.66, < 1.
    "pdl1-lt1-jitter": ("pdl1_cps_lt1", 15),
}
#: slide_id -> why it is expected to miss its truth (strict xfails). Empty since 2026-11-24: see
#: "pdl1-lt1-jitter" below.
KNOWN_GAPS: dict[str, str] = {}
REQUIRED = (
    "slide_id,path,marker,call,tumor_cells,tumor_positive,immune_cells,immune_positive,"
    "positive_pct,cps,tps,h_score,evaluable,qc_flags,device,model,version,seconds"
).split(",")


def _synth(folder: Path, slide_id: str, preset: str, seed: int, **more: Any) -> Path:
    from pathology.synth import SynthParams, synthesize_slide

    params = SynthParams.preset(preset, width=SIZE, height=SIZE, mpp=0.5, seed=seed, **more)
    path = folder / f"{slide_id}.svs"
    synthesize_slide(params, path, overwrite=True)
    return path


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from PIL import Image

    from pathology.synth import load_truth

    root = tmp_path_factory.mktemp("batch")
    slides = root / "slides"
    slides.mkdir()
    truth = {}
    for sid, (preset, seed) in SLIDES.items():
        path = _synth(slides, sid, preset, seed)
        truth[sid] = load_truth(path.with_suffix(".truth.json"))
    # Bad inputs: a text file named .svs, a truncated slide, an image without a pixel size,
    # a file that is not there, an unknown marker.
    (slides / "notes.svs").write_text("not a slide\n")
    data = (slides / "p16-pos.svs").read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.full((512, 512, 3), 200, np.uint8)).save(slides / "nompp.png")
    manifest = root / "manifest.csv"
    lines = ["path,marker,slide_id,patient_id"]
    for sid in SLIDES:
        lines.append(f"slides/{sid}.svs,{truth[sid].marker},{sid},P-{sid}")
    lines += [
        "slides/notes.svs,p16,notes,",
        "slides/truncated.svs,p16,truncated,",
        "slides/nompp.png,pdl1,nompp,",
        "slides/missing.svs,pdl1,missing,",
        "slides/p16-pos.svs,her2,unknown-marker,",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = root / "out"
    argv = ["score", "--manifest", str(manifest), "--out", str(out), "--workers", "1"]
    rc = main(argv)
    return {"root": root, "out": out, "argv": argv, "rc": rc, "truth": truth, "slides": slides}


@pytest.mark.parametrize(
    "sid",
    [
        pytest.param(sid, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[sid]))
        if sid in KNOWN_GAPS
        else sid
        for sid in SLIDES
    ],
)
def test_call_and_value_match_truth(batch: dict[str, Any], sid: str) -> None:
    row = _rows(batch["out"] / "slides.csv")[sid]
    v = batch["truth"][sid].values
    assert row["call"] == v.call, (row, v)
    assert row["evaluable"] == ("true" if v.evaluable else "false")
    assert row["patient_id"] == f"P-{sid}"
    if not v.evaluable:
        assert row["call"] == "not_evaluable" and "few_tumor_cells" in row["qc_flags"]
        assert int(row["tumor_cells"]) < 100
        return
    assert abs(int(row["tumor_cells"]) - v.tumor_cells) <= 0.10 * v.tumor_cells
    assert abs(int(row["immune_cells"]) - v.immune_cells) <= 0.15 * v.immune_cells
    if v.p16_positive_pct is not None:
        assert row["marker"] == "p16" and row["cps"] == "" and row["tps"] == ""
        assert abs(float(row["positive_pct"]) - v.p16_positive_pct) <= 3.0
        assert row["p16_positive_pct"] == row["positive_pct"]
    if v.cps is not None:
        assert row["marker"] == "pdl1" and row["positive_pct"] == ""
        cps, tps = float(row["cps"]), float(row["tps"])
        if v.cps >= 1:
            assert abs(cps - v.cps) <= 0.10 * v.cps, (cps, v.cps)
        else:
            assert cps < 1
        assert abs(tps - v.tps) <= 5.0
        # Summed counts, never averaged tile scores.
        expected = min(
            100.0,
            100
            * (int(row["tumor_positive"]) + int(row["immune_positive"]))
            / int(row["tumor_cells"]),
        )
        assert cps == pytest.approx(expected, abs=0.006)


def test_output_contract(batch: dict[str, Any]) -> None:
    import pandas as pd

    from pathology.tiling import TileStore

    out = batch["out"]
    with (out / "slides.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[: len(REQUIRED)] == REQUIRED
    rows = _rows(out / "slides.csv")
    assert sorted(rows) == sorted(SLIDES)
    row = rows["p16-pos"]
    # The batch fixture runs with the default device, auto: CUDA where a GPU is visible.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert (row["device"], row["model"]) == (device, "physics-v1") and row["version"]
    sdir = out / "p16-pos"
    tiles = pd.read_parquet(sdir / "tiles.parquet")
    assert {"row", "col", "l0_x", "l0_y", "tumor_cells", "tumor_positive"} <= set(tiles.columns)
    assert int(tiles["tumor_cells"].sum()) == int(row["tumor_cells"])
    assert int(tiles["tumor_positive"].sum()) == int(row["tumor_positive"])
    assert len(tiles) == int(row["tissue_tiles"]) > 30
    # Provenance travels with every output.
    assert tiles.attrs["provenance"]["marker_sha256"] == row["marker_sha256"]
    from PIL import Image

    with Image.open(sdir / "heatmap.png") as png:
        assert png.text["pathology:model"] == "physics-v1"
    # Per-tile counts are also in the store, beside the tiles.
    store = TileStore.open(sdir / "tiles.zarr")
    counts = np.asarray(store.group["scores/p16/counts"][...])
    assert counts.shape[0] == len(tiles)
    assert counts[:, 0].sum() == int(row["tumor_cells"])
    cells = pd.read_parquet(sdir / "cells.parquet")
    assert int((cells["type"] == "tumor").sum()) == int(row["tumor_cells"])
    assert int((cells["type"] == "tumor").mul(cells["positive"]).sum()) == int(
        row["tumor_positive"]
    )
    assert cells["x_l0"].between(0, SIZE).all() and cells["y_l0"].between(0, SIZE).all()
    geo = json.loads((sdir / "cells.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(cells)
    assert geo["features"][0]["properties"]["objectType"] == "detection"
    assert (sdir / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((sdir / "slide.json").read_text())
    assert record["provenance"]["marker_sha256"] == row["marker_sha256"]
    assert not (sdir / "work").exists()
    report = (out / "report.html").read_text()
    assert "p16-pos" in report and "data:image/png;base64," in report


def test_bad_inputs_fail_alone_with_one_line_each(batch: dict[str, Any]) -> None:
    assert batch["rc"] == 1
    with (batch["out"] / "failures.csv").open(newline="") as fh:
        failures = {r["slide_id"]: r["error"] for r in csv.DictReader(fh)}
    assert sorted(failures) == ["missing", "nompp", "notes", "truncated", "unknown-marker"]
    for error in failures.values():
        assert "\n" not in error and "Traceback" not in error
    assert "missing.svs" in failures["missing"] and "no such file" in failures["missing"]
    assert "notes.svs" in failures["notes"] and "not a slide" in failures["notes"]
    assert "truncated.svs" in failures["truncated"]
    assert "nompp.png" in failures["nompp"] and "--slide-mpp" in failures["nompp"]
    assert "her2" in failures["unknown-marker"]
    for sid in failures:  # nothing written for a slide that cannot be opened
        assert not (batch["out"] / sid).exists()


def test_rerun_skips_finished_and_refuses_changed_settings(
    batch: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = batch["out"]
    before = (out / "slides.csv").read_text()
    stamps = {sid: (out / sid / "slide.json").stat().st_mtime_ns for sid in SLIDES}
    capsys.readouterr()
    assert main(batch["argv"]) == 1  # the bad inputs still fail
    assert (out / "slides.csv").read_text() == before
    assert {sid: (out / sid / "slide.json").stat().st_mtime_ns for sid in SLIDES} == stamps
    err = capsys.readouterr().err
    assert err.count("pathology score: error:") == 5

    # Another setting for a finished slide: refused, its results untouched.
    slide = batch["slides"] / "p16-pos.svs"
    argv = ["score", str(slide), "--marker", "p16", "--out", str(out), "--min-tissue", "0.5"]
    assert main([*argv, "--workers", "1"]) == 1
    assert "other settings (min_tissue was 0.25, now 0.5)" in capsys.readouterr().err
    assert (out / "p16-pos" / "slide.json").stat().st_mtime_ns == stamps["p16-pos"]

    # A refitted model or a changed scoring engine: the old results are stale, never reused.
    import pathology.scoring._api as api

    monkeypatch.setattr(api, "_fingerprint", lambda files: "0" * 64)
    argv = ["score", str(slide), "--marker", "p16", "--out", str(out), "--workers", "1"]
    assert main(argv) == 1
    assert "the model or scoring engine changed: model_sha256 was " in capsys.readouterr().err
    assert (out / "p16-pos" / "slide.json").stat().st_mtime_ns == stamps["p16-pos"]


def test_model_fingerprint_follows_the_fitted_parameters(tmp_path: Path) -> None:
    import shutil

    from pathology.scoring import model_dir, model_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(model_dir(), a)
    shutil.copytree(model_dir(), b)
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint()
    # Documentation is not a result's input: editing the card, or adding notes, keeps it.
    (b / "MODEL_CARD.md").write_text("# rewritten\n")
    (b / "NOTES.md").write_text("reviewed\n")
    assert model_fingerprint(b) == model_fingerprint(a)
    params = b / "cell_types.json"
    params.write_text(params.read_text().replace("0", "1", 1))
    assert model_fingerprint(b) != model_fingerprint(a)
    (a / "extra_weights.json").write_text("{}")
    assert model_fingerprint(a) != model_fingerprint()
    assert len(model_fingerprint(a)) == 64


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "x.svs", "--out", str(tmp_path)]) == 2
    assert "--marker is required" in capsys.readouterr().err
    bad = tmp_path / "m.csv"
    bad.write_text("file,marker\na.svs,p16\n")
    assert main(["score", "--manifest", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "lacks column(s) path" in capsys.readouterr().err
    dup = tmp_path / "d.csv"
    dup.write_text("path,marker\na/s1.svs,p16\nb/s1.svs,p16\n")
    assert main(["score", "--manifest", str(dup), "--out", str(tmp_path / "o")]) == 2
    assert "slide_id 's1' is also used" in capsys.readouterr().err


def test_kill_9_then_rerun_gives_the_same_numbers(tmp_path: Path) -> None:
    """SIGKILL a real ``pathology score`` process mid-scoring, rerun it, compare with a clean run."""
    from pathology.synth import SynthParams, synthesize_slide

    params = SynthParams.preset("p16_equivocal", width=4096, height=4096, mpp=0.5, seed=5)
    slide = synthesize_slide(params, tmp_path / "big.svs", overwrite=True).svs_path
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "pathology", "score", str(slide), "--marker", "p16",
                "--out", str(out), "--workers", "1", "--no-geojson"]  # fmt: skip

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert subprocess.run(cmd(clean), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parts = killed / "big" / "work" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(parts.glob("shard-*.npz")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(parts.glob("shard-*.npz")), "the run was not killed while scoring"
    assert not (killed / "big" / "slide.json").exists()
    assert subprocess.run(cmd(killed), env=env, capture_output=True).returncode == 0
    a, b = _rows(clean / "slides.csv")["big"], _rows(killed / "slides.csv")["big"]
    keys = ("call", "tumor_cells", "tumor_positive", "immune_cells", "positive_pct", "h_score")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    record = json.loads((killed / "big" / "slide.json").read_text())
    assert record["shards"]["resumed"] >= 1


def test_slides_csv_feeds_stratify(batch: dict[str, Any], tmp_path: Path) -> None:
    """The translational path: `pathology score` output straight into `pathology stratify`."""
    import pandas as pd

    clinical = tmp_path / "clinical.csv"
    codes = ["PR", "PD", "SD", "CR", "PD", "PR", "SD", "PD", "SD"]
    lines = ["patient_id,best_response,pfs_months,pfs_event"]
    for k, sid in enumerate(SLIDES):
        lines.append(f"P-{sid},{codes[k]},{3.0 + k},{k % 2}")
    clinical.write_text("\n".join(lines) + "\n")
    out = tmp_path / "strat"
    assert (
        main(
            [
                "stratify",
                str(batch["out"] / "slides.csv"),
                "--clinical",
                str(clinical),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    patients = pd.read_csv(out / "patients.csv").set_index("patient_id")
    assert patients.loc["P-p16-pos", "p16_call"] == "positive"
    assert patients.loc["P-pdl1-ge20", "cps_bin"] == ">=20"
    assert patients.loc["P-pdl1-lt1", "cps_bin"] == "<1"


OS2 = "openslide-os2-ki67-crops"


@pytest.fixture(scope="module")
def os2_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Real Ki-67 IHC: the same osteosarcoma field scanned by Hamamatsu (0.227 um/px) and Olympus
    (0.346 um/px), read as big-endian OME-TIFF crops, scored through `pathology score`."""
    from conftest import shared_file

    paths = [shared_file(f"{OS2}/OS-2-ndpi.ome.tif"), shared_file(f"{OS2}/OS-2-vsi.ome.tif")]
    out = tmp_path_factory.mktemp("os2") / "out"
    argv = ["score", *map(str, paths), "--marker", "ki67", "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    return _rows(out / "slides.csv")


@pytest.mark.realdata
def test_real_ki67_scans_run_through_the_batch(os2_batch: dict[str, dict[str, str]]) -> None:
    for sid in ("OS-2-ndpi", "OS-2-vsi"):
        row = os2_batch[sid]
        assert row["marker"] == "ki67" and row["call"] == "" and row["evaluable"] == "true"
        assert float(row["mpp"]) == pytest.approx(0.5, abs=0.01)
        assert int(row["tumor_cells"]) >= 100 and 0 < float(row["positive_pct"]) < 100
    # Ki-67 counts any nuclear staining, so the index survives the scanners' different tone
    # curves (measured 2026-11-24: 25.2 / 22.8 %); the intensity readouts do not (below).
    ndpi, vsi = (float(os2_batch[s]["positive_pct"]) for s in ("OS-2-ndpi", "OS-2-vsi"))
    assert abs(ndpi - vsi) <= 5


@pytest.mark.realdata
@pytest.mark.xfail(
    strict=True,
    reason="(2026-11-24, fifteenth session) the Olympus file stores every OD at 0.47 x the "
    "Hamamatsu one (scripts/compare_scans.py), so its positive tumour nuclei read ~2.1 x less "
    "DAB: H-score 65.8 against 39.3 here (at their own mpp, `score_image`: 3+ 18.1 against 0.3 % "
    "of tumour cells). Intensity cuts are absolute OD; nothing calibrates them per scanner yet",
)
def test_real_ki67_scan_intensity_agreement(os2_batch: dict[str, dict[str, str]]) -> None:
    """Same glass, two scanners: the H-score (intensity bins 0.2 / 0.4 / 0.6 OD) within 15 points,
    about a quarter of the Hamamatsu value. The same bins carry p16's moderate-to-strong cut
    (0.4 OD) and the EGFR example's H-score."""
    ndpi, vsi = (float(os2_batch[s]["h_score"]) for s in ("OS-2-ndpi", "OS-2-vsi"))
    assert abs(ndpi - vsi) <= 15, (ndpi, vsi)


@pytest.mark.realdata
@pytest.mark.xfail(
    strict=True,
    reason="(2026-11-24, Ki-67 nuclei outlined on the larger of haematoxylin and DAB, darkness of "
    "DAB-masked nuclei unread, second detections of a nucleus dropped) the Olympus scan yields "
    "863 tumour + immune cells, under the 900 asked (QuPath: 1,353), and its tumour index reads "
    "22.8 % against QuPath's 13.5 % of all cells; Hamamatsu 991 cells, 25.2 % (QuPath 16.6 %). "
    "The scanners agree within 2.4 points (880 / 1,020 cells, 22.1 / 24.3 % before duplicates "
    "were dropped: those were blue nuclei found twice)",
)
def test_real_ki67_cross_scanner_agreement(os2_batch: dict[str, dict[str, str]]) -> None:
    """Same tissue, two scanners: Ki-67 index within 5 points of each other and of QuPath's
    reference (16.6 % / 13.5 % positive at DAB 0.2, the shared folder's TSVs); >= 900 cells.

    Measured (physics-v1, haematoxylin scaled to the training slides' median 99th percentile, cell
    types refitted with look variety, Ki-67 nuclei outlined on haematoxylin + DAB and the DAB of
    the detection map closed over 2 um, 2026-11-24): 1,020 / 887 tumour + immune cells (QuPath
    1,323 / 1,353), 21.9 / 21.0 % of tumour cells positive on the Hamamatsu / Olympus scans (22.2
    / 22.7 % before the closing). Later that day (outline on the larger of haematoxylin and DAB,
    darkness of DAB-masked nuclei unread): 1,020 / 880 cells, 24.3 / 22.1 %; the Hamamatsu
    scan's positive nuclei typed lymphocyte or macrophage fell from 38 to 6 (``score_image``),
    so its index rose most. The outline change types positive nuclei tumour
    that read lymphocyte before (1,026 / 866 cells, 20.6 / 18.8 % with haematoxylin outlines;
    over all tumour + immune cells 21.4 / 21.4 % then). Before the refit: 974 / 840 cells,
    17.4 / 16.4 %, but then a third of the nuclei were typed macrophage; over all tumour + immune
    cells the index was 22.0 / 22.4 %, so the earlier agreement with QuPath came partly from which
    cells were typed tumour.
    The index is over tumour cells while QuPath's counts every cell, and both scans still find
    fewer cells than QuPath (pale negative nuclei are lost).
    """
    ndpi, vsi = (os2_batch[s] for s in ("OS-2-ndpi", "OS-2-vsi"))
    a, b = float(ndpi["positive_pct"]), float(vsi["positive_pct"])
    assert abs(a - b) <= 5 and abs(a - 16.6) <= 5 and abs(b - 13.5) <= 5
    for row in (ndpi, vsi):
        assert int(row["tumor_cells"]) + int(row["immune_cells"]) >= 900
