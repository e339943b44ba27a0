"""``pathology bench``: one run, the same tiles for every stage, ratios to the decode rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathology.cli import main


def test_bench_reports_rates_and_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--size",
        "2048",
        "--work-dir",
        str(tmp_path),
        "--scheduler",
        "threads",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert (data["width"], data["height"], data["tile_px"], data["mpp"], data["workers"]) == (
        2048,
        2048,
        256,
        0.5,
        2,
    )
    assert (
        data["tiles"] > 0
        and data["tiling_reader"] == "direct-tiff"
        and data["direct_reader"] == "yes"
    )
    for stage in ("decode", "tiling", "direct_decode"):
        assert data[f"{stage}_tiles_per_s"] > 0
        assert data[f"{stage}_mpix_per_s"] == pytest.approx(
            data[f"{stage}_tiles_per_s"] * 256 * 256 / 1e6, rel=0.01
        )
    assert data["tiling_vs_decode"] == pytest.approx(
        data["tiling_tiles_per_s"] / data["decode_tiles_per_s"], rel=0.01
    )
    assert data["peak_rss_mb"] > 0
    assert "tiling" in capsys.readouterr().out
    # The synthetic slide is kept for the next run in the same --work-dir; the store is not.
    assert (tmp_path / "bench-2048.svs").exists() and not (tmp_path / "bench.zarr").exists()
