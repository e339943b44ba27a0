"""Batch outputs: ``cells.geojson`` (QuPath detections), ``heatmap.png`` and ``report.html``.

Expected values are computed here from the inputs (polygon areas with the shoelace formula,
overlay colours from matplotlib's colour map and the documented alpha), never read back from the
writers' own helpers.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pathology.batch import _geojson
from pathology.batch._geojson import write_cells_geojson
from pathology.batch._heatmap import heatmap_array, heatmap_png, write_heatmap
from pathology.batch._report import write_batch_report

L0_MPP = 0.25
PROVENANCE = {
    "software": "pathology 0.1.0",
    "model": "default",
    "marker": "pdl1",
    "marker_sha256": "ab" * 32,
}


def _cells() -> pd.DataFrame:
    """Five cells, one per kind, with distinct measurements (level-0 px, µm²)."""
    return pd.DataFrame(
        {
            "x_l0": np.array([1000.0, 2000.25, 3000.0, 4000.0, 0.5]),
            "y_l0": np.array([500.0, 600.0, 700.0, 800.0, 900.0]),
            "type": ["tumor", "lymphocyte", "macrophage", "other", "tumor"],
            "type_prob": np.array([0.9, 0.8, 0.7, 0.6, 0.95], dtype=np.float32),
            "positive": [True, False, True, False, False],
            "intensity_bin": np.array([3, 0, 2, 0, 1], dtype=np.int8),
            "nucleus_dab": np.array([0.61, 0.05, 0.45, 0.02, 0.3], dtype=np.float32),
            "cytoplasm_dab": np.array([0.52, 0.04, 0.41, 0.01, 0.2], dtype=np.float32),
            "membrane_dab": np.array([0.7, 0.03, 0.5, 0.0, np.nan], dtype=np.float32),
            "membrane_coverage": np.array([0.8, 0.0, 0.6, 0.0, 0.1], dtype=np.float32),
            "scored_dab": np.array([0.7, 0.0, 0.5, 0.0, 0.25], dtype=np.float32),
            "nucleus_area_um2": np.array([40.0, 20.0, 30.0, 25.0, 36.0], dtype=np.float32),
        }
    )


def _strict_load(path: Path) -> Any:
    """json.load that rejects NaN/Infinity (not JSON; QuPath's reader need not accept them)."""

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    with path.open(encoding="utf-8") as fh:
        return json.load(fh, parse_constant=reject)


def _shoelace(ring: list[list[float]]) -> float:
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:-1, 0], xy[:-1, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# --- cells.geojson ---------------------------------------------------------------------------


def test_geojson_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    cells = _cells()
    n = write_cells_geojson(path, cells, l0_mpp=L0_MPP, marker="pdl1", provenance=PROVENANCE)
    doc = _strict_load(path)

    assert n == 5
    assert doc["type"] == "FeatureCollection"
    assert doc["provenance"] == PROVENANCE
    assert doc["frame"]["l0_mpp"] == L0_MPP
    feats = doc["features"]
    assert len(feats) == 5
    classes = [f["properties"]["classification"]["name"] for f in feats]
    # PD-L1 scores immune cells, so they carry Positive / Negative like tumour cells.
    assert classes == [
        "Tumor: Positive",
        "Immune cells: Negative",
        "Immune cells: Positive",
        "Other",
        "Tumor: Negative",
    ]
    assert [f["properties"].get("name") for f in feats] == [
        None,
        "Lymphocyte",
        "Macrophage",
        None,
        None,
    ]
    colours = {
        c: tuple(f["properties"]["classification"]["color"])
        for c, f in zip(classes, feats, strict=True)
    }
    assert len(set(colours.values())) == len(colours) == 5  # distinct colour per class
    assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in colours.values())

    first = feats[0]
    assert first["type"] == "Feature"
    assert first["properties"]["objectType"] == "detection"
    m = first["properties"]["measurements"]
    assert m["Intensity bin (0-3)"] == 3
    assert m["Type probability"] == pytest.approx(0.9, abs=1e-3)
    assert m["Nucleus: DAB OD mean"] == pytest.approx(0.61, abs=1e-4)
    assert m["Cytoplasm: DAB OD mean"] == pytest.approx(0.52, abs=1e-4)
    assert m["Membrane: DAB OD mean"] == pytest.approx(0.7, abs=1e-4)
    assert m["Membrane: stained fraction"] == pytest.approx(0.8, abs=1e-3)
    assert m["Scored DAB OD"] == pytest.approx(0.7, abs=1e-4)
    assert m["Nucleus: Area \u00b5m^2"] == pytest.approx(40.0, abs=0.01)

    for f, (x, y, area_um2) in zip(
        feats, cells[["x_l0", "y_l0", "nucleus_area_um2"]].to_numpy(np.float64), strict=True
    ):
        assert f["geometry"]["type"] == "Polygon"
        (ring,) = f["geometry"]["coordinates"]
        assert len(ring) == 13 and ring[0] == ring[-1]  # 12 vertices, closed
        area_px = area_um2 / L0_MPP**2
        assert _shoelace(ring) == pytest.approx(area_px, rel=0.02)  # + : counter-clockwise
        centre = np.asarray(ring[:-1]).mean(0)
        np.testing.assert_allclose(centre, [x, y], atol=0.1)
        # coordinates are rounded to 0.1 px
        assert all(abs(v * 10 - round(v * 10)) < 1e-6 for xy in ring for v in xy)

    # A nucleus at the slide's left edge has negative vertices; they must stay numbers.
    (edge_ring,) = feats[4]["geometry"]["coordinates"]
    assert min(v[0] for v in edge_ring) < 0
    # NaN measurements are left out (JSON has no NaN), the others kept.
    assert "Membrane: DAB OD mean" not in feats[4]["properties"]["measurements"]
    assert feats[4]["properties"]["measurements"]["Scored DAB OD"] == pytest.approx(0.25)


def test_geojson_marker_without_immune_rule(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    write_cells_geojson(path, _cells(), l0_mpp=L0_MPP, marker="p16", provenance={})
    classes = [f["properties"]["classification"]["name"] for f in _strict_load(path)["features"]]
    # p16 scores tumour cells only: immune cells get no Positive / Negative part.
    assert classes[:4] == ["Tumor: Positive", "Immune cells", "Immune cells", "Other"]


def test_geojson_skips_bad_rows_and_keeps_order_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_geojson, "_CHUNK", 2)
    cells = pd.concat([_cells()] * 3, ignore_index=True)
    cells.loc[4, "x_l0"] = np.nan  # no centre: skipped
    cells.loc[5, "nucleus_area_um2"] = np.nan  # no area: drawn with the minimum radius
    path = tmp_path / "cells.geojson"
    n = write_cells_geojson(path, cells, l0_mpp=L0_MPP, marker="pdl1", provenance={})
    feats = _strict_load(path)["features"]
    assert n == len(feats) == 14
    xs = [np.asarray(f["geometry"]["coordinates"][0][:-1]).mean(0)[0] for f in feats]
    expected = cells["x_l0"].dropna().to_numpy()
    np.testing.assert_allclose(xs, expected, atol=0.1)
    (ring,) = feats[4]["geometry"]["coordinates"]  # row 5 (row 4 was skipped)
    assert _shoelace(ring) == pytest.approx(3.0, rel=0.05)  # 12-gon of radius 1 px: area 3
    assert "Nucleus: Area \u00b5m^2" not in feats[4]["properties"]["measurements"]


def test_geojson_empty(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    empty = pd.DataFrame({c: [] for c in ("x_l0", "y_l0", "type", "positive")})
    assert write_cells_geojson(path, empty, l0_mpp=0.5, marker="p16", provenance={"a": 1}) == 0
    doc = _strict_load(path)
    assert doc["type"] == "FeatureCollection"
    assert doc["features"] == []
    assert doc["provenance"] == {"a": 1}


def test_geojson_rejects_bad_input_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    path.write_text("old")
    bad = _cells()
    bad.loc[1, "type"] = "fibroblast"
    with pytest.raises(ValueError, match="fibroblast"):
        write_cells_geojson(path, bad, l0_mpp=L0_MPP, marker="pdl1", provenance={})
    with pytest.raises(ValueError, match="l0_mpp"):
        write_cells_geojson(path, _cells(), l0_mpp=0.0, marker="pdl1", provenance={})
    with pytest.raises(ValueError, match="positive"):
        write_cells_geojson(
            path, _cells().drop(columns="positive"), l0_mpp=L0_MPP, marker="pdl1", provenance={}
        )
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson"]


def test_geojson_crash_midway_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cells.geojson"
    write_cells_geojson(path, _cells(), l0_mpp=L0_MPP, marker="pdl1", provenance={})
    before = path.read_bytes()

    real = _geojson._format_chunk
    calls = []

    def failing(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        if len(calls) == 2:  # the first chunk is already on disk (in the temporary file)
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(_geojson, "_CHUNK", 2)
    monkeypatch.setattr(_geojson, "_format_chunk", failing)
    bigger = pd.concat([_cells()] * 2, ignore_index=True)
    with pytest.raises(OSError, match="disk full"):
        write_cells_geojson(path, bigger, l0_mpp=L0_MPP, marker="pdl1", provenance={})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.geojson"]  # no partial left


# --- heatmap.png -------------------------------------------------------------------------------


def test_heatmap_array() -> None:
    grid = heatmap_array(np.array([[0, 2], [1, 0]]), np.array([5.0, 7.0]))
    assert grid.shape == (2, 3)
    assert grid[0, 2] == 5.0 and grid[1, 0] == 7.0
    assert np.isnan(grid[[0, 0, 1, 1], [0, 1, 1, 2]]).all()
    with pytest.raises(ValueError, match="one value per tile"):
        heatmap_array(np.array([[0, 0]]), np.array([1.0, 2.0]))


def _colour_count(img: np.ndarray, rgb: np.ndarray, tol: float = 4.0) -> int:
    return int((np.abs(img.astype(np.float64) - rgb).max(-1) <= tol).sum())


def test_heatmap_png(tmp_path: Path) -> None:
    from matplotlib import colormaps
    from PIL import Image

    grey = 200.0
    thumb = np.full((60, 90, 3), int(grey), dtype=np.uint8)  # three 30 px tiles wide, two high
    tiles = np.array([[0, 0], [0, 1], [1, 0]], dtype=np.int64)  # (0, 2), (1, 1), (1, 2) unscored
    values = np.array([100.0, 0.0, 50.0])
    path = write_heatmap(
        tmp_path / "heatmap.png",
        thumb,
        tiles,
        values,
        tile_px_thumb=30.0,
        title="S1 <pdl1>",
        label="positive cells per mm²",
        vmax=100.0,
    )
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        img = np.asarray(im.convert("RGB"))
    assert 500 <= width <= 1200 and 300 <= height <= 1200

    def blended(fraction: float) -> np.ndarray:  # overlay at alpha 0.6 over the thumbnail
        rgb = np.asarray(colormaps["viridis"](fraction)[:3]) * 255.0
        return 0.6 * rgb + 0.4 * grey

    high, low, mid = blended(1.0), blended(0.0), blended(0.5)
    assert np.abs(high - low).max() > 100  # the two tiles really differ
    # Each scored tile is drawn as a block of about (500/90 * 30)^2 ~ 28,000 output pixels.
    for rgb in (high, low, mid):
        assert _colour_count(img, rgb) > 15_000
    assert _colour_count(img, np.full(3, grey)) > 2 * 15_000  # unscored tiles: plain thumbnail

    again = heatmap_png(
        thumb,
        tiles,
        values,
        tile_px_thumb=30.0,
        title="S1 <pdl1>",
        label="positive cells per mm²",
        vmax=100.0,
    )
    assert again == path.read_bytes()  # deterministic


def test_heatmap_default_vmax_is_99th_percentile() -> None:
    from matplotlib import colormaps
    from PIL import Image

    thumb = np.full((40, 40, 3), 255, dtype=np.uint8)
    values = np.array([0.0, 10.0, 20.0, 1000.0])  # 99th percentile 970.9: 1000 is clipped
    tiles = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.int64)
    png = heatmap_png(thumb, tiles, values, tile_px_thumb=20.0, title="t", label="l")
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    top = np.percentile(values, 99)
    for v in values:
        rgb = 0.6 * np.asarray(colormaps["viridis"](min(v / top, 1.0))[:3]) * 255 + 0.4 * 255
        assert _colour_count(img, rgb) > 10_000, v


# --- report.html -------------------------------------------------------------------------------


def test_batch_report(tmp_path: Path) -> None:
    from PIL import Image

    evil = "<script>alert(1)</script>"
    (tmp_path / "s2").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    (tmp_path / "s2" / "heatmap.png").write_bytes(png)
    slides = pd.DataFrame(
        {
            "slide_id": [evil, "s2"],
            "path": ["/x/a.svs", "/x/b.svs"],
            "marker": ["pdl1", "p16"],
            "call": [">=20", "negative"],
            "positive_pct": [np.nan, 12.345],
            "cps": [25.04, np.nan],
            "tps": [10.0, np.nan],
            "h_score": [55.6, 12.0],
            "tumor_cells": [12345, 800],
            "immune_cells": [300, 20],
            "evaluable": ["true", "false"],
            "qc_flags": ["", "few_tumor_cells;stained_immune"],
            "seconds": [61.26, 30.0],
        }
    )
    failures = [("/x/bad<b>.svs", "CorruptSlideError: cannot read level 0\nTraceback ...")]
    provenance = {"software": "pathology 0.1.0", "device": "cpu", "markers": {"p16": "12ab"}}
    out = write_batch_report(
        tmp_path / "report.html",
        slides,
        out_dir=tmp_path,
        failures=failures,
        provenance=provenance,
    )
    text = out.read_text(encoding="utf-8")

    assert text.startswith("<!DOCTYPE html>")
    assert evil not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>" not in text and "/x/bad&lt;b&gt;.svs" in text
    assert "cannot read level 0" in text and "Traceback" not in text  # the reason's first line
    assert "Failed slides (1)" in text
    assert '<span class="call call-positive">&gt;=20</span>' in text
    assert '<span class="call call-negative">negative</span>' in text
    assert "12,345" in text and "25.0" in text and "12.3" in text and "61.3" in text
    assert '<td class="num"></td>' in text  # NaN -> empty cell
    assert "pathology 0.1.0" in text and "&quot;p16&quot;: &quot;12ab&quot;" in text
    embedded = text.split('src="data:image/png;base64,')
    assert len(embedded) == 2  # only s2 has a heatmap; the other is skipped silently
    assert base64.b64decode(embedded[1].split('"', 1)[0]) == png
    assert '<a href="#slide-1">s2</a>' in text and 'href="#slide-0"' not in text
    assert "http://" not in text and "https://" not in text  # nothing external
    # Each QC flag raised in the run is explained once, with its slide count.
    assert "<h2>QC flags</h2>" in text and "<code>stained_immune</code> (1 slide): " in text
    assert "the positive % may read low, review the slide" in text
    assert "<code>few_tumor_cells</code> (1 slide): fewer viable tumour cells" in text


def test_batch_report_without_failures_or_slides(tmp_path: Path) -> None:
    out = write_batch_report(
        tmp_path / "report.html",
        pd.DataFrame({"slide_id": [], "call": []}),
        out_dir=tmp_path,
        failures=[],
        provenance={"software": "pathology 0.1.0", "seconds": math.nan},
    )
    text = out.read_text(encoding="utf-8")
    assert "Failed slides" not in text and "No slide was scored" in text
    assert "QC flags" not in text
    assert "<img" not in text
