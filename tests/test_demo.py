"""``pathology demo``: the quick start's end-to-end path on synthetic slides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathology.cli import main


def test_demo_runs_reuses_and_guards_foreign_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "2048x1536"]) == 0
    printed = capsys.readouterr().out
    assert "demo-p16" in printed and "demo-pdl1" in printed
    assert "2 of 2 calls agree with the synthetic truth" in printed
    results = {r["slide_id"]: r for r in json.loads((out / "demo.json").read_text())}
    p16, pdl1 = results["demo-p16"], results["demo-pdl1"]
    assert (p16["marker"], p16["vendor"], p16["width"], p16["height"]) == (
        "p16",
        "aperio",
        2048,
        1536,
    )
    assert p16["truth_call"] == "positive" and p16["truth_p16_positive_pct"] >= 70
    assert pdl1["truth_call"] == ">=20" and pdl1["truth_cps"] >= 20
    # The demo runs the whole scoring path and writes what `pathology score` writes.
    assert (p16["call"], pdl1["call"]) == ("positive", ">=20")
    assert abs(p16["positive_pct"] - p16["truth_p16_positive_pct"]) <= 3
    assert abs(pdl1["cps"] - pdl1["truth_cps"]) <= 0.1 * pdl1["truth_cps"]
    slides_csv = (out / "slides.csv").read_text().splitlines()
    assert slides_csv[0].startswith("slide_id,path,marker,call,") and len(slides_csv) == 3
    assert (out / "report.html").exists()
    for r in results.values():
        assert r["tissue_iou"] >= 0.9, r
        assert (out / r["slide_id"] / "tissue.png").exists()
        assert (
            r["tissue_tiles"] > 10 and (out / r["slide_id"] / "tiles.zarr" / "zarr.json").exists()
        )
        for name in ("tiles.parquet", "cells.parquet", "cells.geojson", "heatmap.png"):
            assert (out / r["slide_id"] / name).exists(), name

    # A rerun reuses the slides it made instead of synthesising them again.
    svs = out / "demo-p16.svs"
    before = svs.stat().st_mtime_ns, (out / "demo-p16" / "slide.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--size", "2048x1536"]) == 0
    assert (svs.stat().st_mtime_ns, (out / "demo-p16" / "slide.json").stat().st_mtime_ns) == before

    # A folder with someone else's files is not written into.
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "slides.csv").write_text("slide_id\nP01\n")
    assert main(["demo", "--out", str(foreign)]) == 2
    assert "not made by 'pathology demo'" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["slides.csv"]
