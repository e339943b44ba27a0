"""Synthetic IHC slides: the SVS container, determinism, the truth and its agreement with the pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from pathology.cli import main
from pathology.errors import ConfigError, OutputExistsError
from pathology.slide import open_slide
from pathology.stain import DAB, HAEMATOXYLIN, StainMatrix, rgb_to_od
from pathology.synth import (
    FAKE_PHI,
    PRESETS,
    SynthParams,
    load_truth,
    render_region,
    synthesize_region,
    synthesize_slide,
    synthesize_truth,
)

BIN_EDGES = (0.2, 0.4, 0.6)


@pytest.fixture(scope="module")
def p16_slide(tmp_path_factory: pytest.TempPathFactory):
    """A 2048 x 1536 p16-positive slide at 0.25 um/px with pen, dust and border artifacts."""
    out = tmp_path_factory.mktemp("synth") / "p16.svs"
    params = SynthParams.preset("p16_positive", width=2048, height=1536, artifacts=True, seed=1)
    return params, synthesize_slide(params, out)


def _unmix(rgb: np.ndarray, truth) -> np.ndarray:
    """(h, w, 3) stain amounts with the slide's own vectors and glass colour."""
    m = StainMatrix(("h", "dab"), (truth.stains["haematoxylin"], truth.stains["dab"]))
    return m.unmix(rgb_to_od(rgb, truth.background_rgb))


# --- the SVS container --------------------------------------------------------------------


def test_svs_is_an_aperio_pyramid(p16_slide) -> None:
    _, slide = p16_slide
    osr = openslide.OpenSlide(str(slide.svs_path))
    try:
        props = osr.properties
        assert props["openslide.vendor"] == "aperio"
        assert osr.level_count == 3 == slide.levels
        assert osr.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.25)
        assert props["openslide.objective-power"] == "40"
        assert props["openslide.level[0].tile-width"] == "256"
        assert set(osr.associated_images) == {"label", "macro", "thumbnail"}
        region = np.asarray(osr.read_region((1024, 768), 0, (256, 256)))
        assert region[..., 3].min() == 255  # inside the image: opaque, not padding
    finally:
        osr.close()
    with tifffile.TiffFile(slide.svs_path) as tif:
        pages = list(tif.pages)
        assert [p.is_tiled for p in pages] == [True, False, True, True, False, False]
        assert all(not p.subifds for p in pages)  # every level is its own top-level page
        assert pages[0].compression == tifffile.COMPRESSION.JPEG
        assert pages[0].photometric == tifffile.PHOTOMETRIC.YCBCR  # 4:2:0 like scanners
        assert pages[0].description.startswith("Aperio Image Library")
        assert "label" in pages[4].description and "macro" in pages[5].description


@pytest.mark.parametrize(
    ("mpp", "power", "size"), [(0.5, "20", (1000, 777)), (1.0, "10", (1024, 768))]
)
def test_mpp_magnification_and_odd_sizes(
    tmp_path: Path, mpp: float, power: str, size: tuple
) -> None:
    w, h = size
    slide = synthesize_slide(
        SynthParams.preset("ki67", width=w, height=h, mpp=mpp, artifacts=True), tmp_path / "k.svs"
    )
    with open_slide(slide.svs_path) as reader:
        assert reader.info.vendor == "aperio"
        assert reader.mpp == pytest.approx(mpp)
        assert reader.info.objective_power == float(power)
        assert reader.level_dimensions == (
            (w, h),
            (-(-w // 4), -(-h // 4)),
            (-(-w // 16), -(-h // 16)),
        )
        edge = reader.read_region((w - 8, h - 8), 0, (8, 8))
        assert edge.min() < 255  # the last partial tile holds real pixels
    ds = slide.truth.tissue_mask["downsample"]
    assert np.asarray(Image.open(slide.tissue_path)).shape == (-(-h // ds), -(-w // ds))
    assert all(0 <= c.x < w and 0 <= c.y < h for c in slide.truth.cells)


def test_fake_phi_is_in_the_file_and_filtered_by_the_reader(p16_slide) -> None:
    _, slide = p16_slide
    osr = openslide.OpenSlide(str(slide.svs_path))
    try:
        for key in ("Filename", "Date", "Time", "User", "Barcode"):
            assert osr.properties[f"aperio.{key}"] == FAKE_PHI[key]
        label = np.asarray(osr.associated_images["label"])
        assert label.shape[0] > 100 and (label[..., :3] < 60).any()  # text and barcode are drawn
    finally:
        osr.close()
    with open_slide(slide.svs_path) as reader:
        dumped = json.dumps(reader.info.to_dict())
    for key in ("Filename", "User", "Barcode", "Date"):
        assert FAKE_PHI[key] not in dumped


# --- determinism --------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    params = SynthParams.preset("pdl1_cps_1_19", width=1024, height=1024, artifacts=True, seed=5)
    a = synthesize_slide(params, tmp_path / "a.svs", workers=1)
    b = synthesize_slide(params, tmp_path / "b.svs", workers=2)
    c = synthesize_slide(params.replace(seed=6), tmp_path / "c.svs")

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(a.svs_path) == digest(b.svs_path)
    ta, tb = (json.loads(s.truth_path.read_text()) for s in (a, b))
    assert ta["tissue_mask"].pop("file") == "a.tissue.png"  # the only difference: its own name
    tb["tissue_mask"].pop("file")
    assert ta == tb
    assert a.tissue_path.read_bytes() == b.tissue_path.read_bytes()
    pa, pc = tifffile.imread(a.svs_path, key=0), tifffile.imread(c.svs_path, key=0)
    assert pa.shape == pc.shape == (1024, 1024, 3)
    assert np.abs(pa.astype(int) - pc).mean() > 5


def test_region_is_the_slide_before_jpeg(p16_slide) -> None:
    params, slide = p16_slide
    rgb, truth = synthesize_region(params)
    level0 = tifffile.imread(slide.svs_path, key=0)
    assert rgb.shape == level0.shape
    assert np.abs(rgb.astype(int) - level0).mean() < 2.5  # JPEG Q90 error only
    assert truth.values == slide.values


def test_bands_skip_glass_without_changing_a_pixel() -> None:
    """The writer renders only tiles near tissue, ink, dust or border; the rest must be exact glass."""
    from pathology.synth._layout import build_scene
    from pathology.synth._render import active_tiles, build_textures, render_band, render_rgb

    skipped = 0
    for artifacts, seed in ((False, 8), (True, 9)):
        params = SynthParams.preset(
            "pdl1_cps_ge20",
            width=2048,
            height=1024,
            tissue_fraction=0.15,
            artifacts=artifacts,
            seed=seed,
        )
        scene = build_scene(params)
        tex = build_textures(scene)
        full = render_rgb(scene, tex, 0, 1024, 0, 2048)
        for y0 in range(0, 1024, 256):
            skipped += int((~active_tiles(scene, y0, y0 + 256, 0, 8, 256)).sum())
            band = render_band(scene, tex, y0, y0 + 256, 0, 8, 256)
            np.testing.assert_array_equal(band, full[y0 : y0 + 256])
    assert skipped >= 10


# --- the truth ----------------------------------------------------------------------------


def _recount(doc: dict) -> dict:
    """The rules of the truth file, re-implemented from the per-cell list."""
    cells = doc["cells"]
    marker = doc["slide"]["marker"]
    tum = [c for c in cells if c["type"] == "tumor"]
    imm = [c for c in cells if c["type"] in ("lymphocyte", "macrophage")]
    if marker == "p16":
        scored = [min(c["nucleus_dab"], c["cytoplasm_dab"]) for c in tum]
        pos_t = [c for c in tum if c["nucleus_dab"] >= 0.4 and c["cytoplasm_dab"] >= 0.4]
        pos_i: list = []
    elif marker == "ki67":
        scored = [c["nucleus_dab"] for c in tum]
        pos_t = [c for c in tum if c["nucleus_dab"] >= 0.2]
        pos_i = []
    else:
        scored = [c["membrane_dab"] for c in tum]
        pos_t = [c for c in tum if c["membrane_coverage"] > 0 and c["membrane_dab"] >= 0.2]
        pos_i = [c for c in imm if c["membrane_dab"] >= 0.2 or c["cytoplasm_dab"] >= 0.2]
    n = len(tum)
    bins = [sum(v >= e for e in BIN_EDGES) for v in scored]
    out = {
        "tumor_cells": n,
        "tumor_positive": len(pos_t),
        "immune_cells": len(imm),
        "h_score": sum(bins) / n * 100,
        "weak_pct": 100 * sum(b == 1 for b in bins) / n,
        "pos_pct": 100 * len(pos_t) / n,
        "cps": min(100.0, 100 * (len(pos_t) + len(pos_i)) / n),
        "immune_positive": len(pos_i),
    }
    for c in cells:  # the per-cell flag follows the same rule
        if c["type"] == "fibroblast" or (marker != "pdl1" and c["type"] != "tumor"):
            assert c["positive"] is None
        else:
            assert c["positive"] == (any(c is p for p in pos_t) or any(c is p for p in pos_i))
    return out


@pytest.mark.parametrize("preset", ["p16_weak_diffuse", "pdl1_cps_ge20", "ki67"])
def test_slide_values_equal_the_rules_applied_to_the_cells(tmp_path: Path, preset: str) -> None:
    params = SynthParams.preset(preset, width=1536, height=1536, mpp=0.5, seed=2)
    slide = synthesize_slide(params, tmp_path / "s.svs")
    doc = json.loads(slide.truth_path.read_text())
    v, r = doc["values"], _recount(doc)
    assert r["tumor_cells"] > 300
    assert (v["tumor_cells"], v["tumor_positive"], v["immune_cells"]) == (
        r["tumor_cells"],
        r["tumor_positive"],
        r["immune_cells"],
    )
    assert v["h_score"] == pytest.approx(r["h_score"], abs=1e-3)
    if params.marker == "p16":
        assert v["p16_positive_pct"] == pytest.approx(r["pos_pct"], abs=1e-3)
        assert v["p16_weak_pct"] == pytest.approx(r["weak_pct"], abs=1e-3)
        assert v["cps"] is None and v["tps"] is None and v["immune_positive"] is None
    elif params.marker == "pdl1":
        assert v["cps"] == pytest.approx(r["cps"], abs=1e-3)
        assert v["tps"] == pytest.approx(r["pos_pct"], abs=1e-3)
        assert v["immune_positive"] == r["immune_positive"]
        assert v["p16_positive_pct"] is None
    else:
        assert v["ki67_pct"] == pytest.approx(r["pos_pct"], abs=1e-3)
    w, h = params.size
    assert all(0 <= c["x"] < w and 0 <= c["y"] < h for c in doc["cells"])
    assert doc["stains"]["dab"] != list(DAB)  # jittered per slide, and recorded
    assert load_truth(slide.truth_path).values == slide.values


PRESET_CHECKS = {
    "p16_positive": lambda v: v.p16_positive_pct >= 70 and v.call == "positive",
    "p16_equivocal": lambda v: 50 <= v.p16_positive_pct < 70 and v.call == "equivocal",
    "p16_negative": lambda v: (
        v.p16_positive_pct < 50
        and v.p16_positive_pct + v.p16_weak_pct < 70
        and v.call == "negative"
    ),
    "p16_weak_diffuse": lambda v: (
        v.p16_positive_pct < 50 and v.p16_weak_pct >= 60 and v.call == "equivocal"
    ),
    "p16_borderline": lambda v: v.p16_positive_pct >= 70 and v.call == "positive",
    "pdl1_cps_lt1": lambda v: v.cps < 1 and v.call == "<1",
    "pdl1_cps_1_19": lambda v: 1 <= v.cps < 20 and v.call == "1-19",
    "pdl1_cps_ge20": lambda v: v.cps >= 20 and v.call == ">=20",
    "pdl1_few_tumor": lambda v: (
        0 < v.tumor_cells < 100 and not v.evaluable and v.call == "not_evaluable"
    ),
    "ki67": lambda v: abs(v.ki67_pct - 35) < 1,
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(("size", "mpp", "seed"), [(2048, 0.5, 0), (1536, 0.25, 9)])
def test_presets_land_in_their_bins(preset: str, size: int, mpp: float, seed: int) -> None:
    truth = synthesize_truth(SynthParams.preset(preset, width=size, mpp=mpp, seed=seed))
    v = truth.values
    assert PRESET_CHECKS[preset](v), v
    if preset != "pdl1_few_tumor":
        assert v.tumor_cells >= 100
    # Scored values stay clear of the bin edges unless the preset asks for borderline cells.
    tum = [c for c in truth.cells if c.type == "tumor"]
    if truth.marker == "p16":
        scored = np.array([min(c.nucleus_dab, c.cytoplasm_dab) for c in tum])
    elif truth.marker == "pdl1":
        scored = np.array([c.membrane_dab for c in tum])
    else:
        scored = np.array([c.nucleus_dab for c in tum])
    gap = np.min(np.abs(scored[:, None] - np.array(BIN_EDGES)[None, :]), axis=1)
    if preset == "p16_borderline":
        assert np.mean(gap < 0.031) > 0.2
    else:
        assert gap.min() >= 0.0499


def test_pdl1_patterns_partial_complete_and_decoys() -> None:
    truth = synthesize_truth(
        SynthParams.preset("pdl1_cps_ge20", width=2048, mpp=0.5, decoy_fraction=0.05)
    )
    tum = [c for c in truth.cells if c.type == "tumor"]
    pos = [c for c in tum if c.positive]
    complete = [c for c in pos if c.membrane_coverage == 1.0]
    partial = [c for c in pos if 0 < c.membrane_coverage < 1]
    assert len(complete) / len(pos) == pytest.approx(0.6, abs=0.01)
    assert all(0.25 <= c.membrane_coverage <= 0.75 for c in partial)
    decoys = [c for c in tum if c.cytoplasm_dab >= 0.28 and c.membrane_dab < 0.2]
    assert len(decoys) == round(0.05 * len(tum)) and not any(c.positive for c in decoys)


# --- truth against the pixels -------------------------------------------------------------


def test_rendered_dab_matches_the_truth() -> None:
    r = render_region(
        SynthParams.preset("p16_positive", width=1024, height=1024, blur_um=0.2, noise=0.0, seed=4)
    )
    conc = _unmix(r.rgb, r.truth)
    dab = conc[..., 1]
    checked = 0
    for c in r.truth.cells:
        if c.type != "tumor" or not c.positive:
            continue
        nucleus = ndi.binary_erosion(r.nucleus_labels == c.id, iterations=3)
        if nucleus.sum() < 30:
            continue
        assert dab[nucleus].mean() == pytest.approx(c.nucleus_dab, abs=0.1)
        # Also from the truth position alone: a 2 um disc around (x, y) is inside the nucleus.
        yy, xx = np.ogrid[: dab.shape[0], : dab.shape[1]]
        disc = (yy + 0.5 - c.y) ** 2 + (xx + 0.5 - c.x) ** 2 <= (2.0 / 0.25) ** 2
        assert dab[disc].mean() == pytest.approx(c.nucleus_dab, abs=0.1)
        checked += 1
    assert checked >= 20

    r = render_region(
        SynthParams.preset(
            "pdl1_cps_ge20",
            width=1024,
            height=1024,
            blur_um=0.2,
            noise=0.0,
            complete_membrane_fraction=1.0,
            seed=4,
        )
    )
    dab = _unmix(r.rgb, r.truth)[..., 1]
    ring = [c for c in r.truth.cells if c.type == "tumor" and c.positive]
    assert len(ring) >= 10
    for c in ring:
        m = r.membrane & (r.cell_labels == c.id)
        # A ~0.75 um ring loses some OD to the blur, never enough to cross the 0.2 cut.
        assert 0.75 * c.membrane_dab <= dab[m].mean() <= c.membrane_dab + 0.03
        assert dab[m].mean() >= 0.22
    negative = [c for c in r.truth.cells if c.type == "tumor" and not c.positive]
    assert max(dab[r.membrane & (r.cell_labels == c.id)].mean() for c in negative) < 0.15


def test_nucleus_size_is_true_in_microns() -> None:
    """Dark blobs in the haematoxylin channel have the same area in um^2 at 0.25 and 0.5 um/px."""
    medians = {}
    for mpp, size in ((0.25, 2048), (0.5, 1024)):
        rgb, truth = synthesize_region(
            SynthParams.preset("p16_negative", width=size, mpp=mpp, seed=11)
        )
        hema = _unmix(rgb, truth)[..., 0]
        blobs, _ = ndi.label(hema > 0.35)
        sizes = np.bincount(blobs.ravel())
        areas = [
            sizes[blobs[int(c.y), int(c.x)]] * mpp * mpp
            for c in truth.cells
            if c.type == "lymphocyte" and blobs[int(c.y), int(c.x)]
        ]
        assert len(areas) > 30
        medians[mpp] = float(np.median(areas))
        truth_median = np.median(
            [c.nucleus_area_um2 for c in truth.cells if c.type == "lymphocyte"]
        )
        assert medians[mpp] == pytest.approx(truth_median, rel=0.2)
        assert 6.0 <= 2 * np.sqrt(medians[mpp] / np.pi) <= 8.0  # lymphocyte nucleus ~7 um
    assert medians[0.25] == pytest.approx(medians[0.5], rel=0.1)


def test_tissue_mask_excludes_glass_and_artifacts(p16_slide) -> None:
    params, slide = p16_slide
    truth = slide.truth
    mask = np.asarray(Image.open(slide.tissue_path)) > 0
    ds = truth.tissue_mask["downsample"]
    assert ds == 16 and mask.shape == (1536 // ds, 2048 // ds)
    assert mask.mean() == pytest.approx(truth.tissue_mask["tissue_fraction"], abs=1e-3)
    assert 0.25 < mask.mean() < params.tissue_fraction
    rgb = tifffile.imread(slide.svs_path, key=0)
    small = rgb[: mask.shape[0] * ds, : mask.shape[1] * ds].reshape(
        mask.shape[0], ds, mask.shape[1], ds, 3
    )
    small = small.mean(axis=(1, 3))
    od = rgb_to_od(small.astype(np.float32), truth.background_rgb).sum(-1)
    # Glass is clear, the border strip black: both outside the mask. Tissue absorbs, but palely.
    assert np.median(od[mask]) > 0.15
    assert np.percentile(od[~mask], 50) < 0.1
    assert (od[~mask] > 2.0).any()  # the scanner border strip is there and not tissue
    cells = np.array([(c.y, c.x) for c in truth.cells]) / ds
    assert mask[cells[:, 0].astype(int), cells[:, 1].astype(int)].mean() > 0.97


# --- parameters and CLI -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"width": 10}, "width"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"marker": "her2"}, "marker"),
        ({"marker": "p16", "intensity": "weak", "positive_fraction": 0.5}, "weak_fraction"),
        ({"marker": "ki67", "weak_fraction": 0.2}, "weak_fraction"),
        ({"mpp": 0.0}, "mpp"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"stain_vectors": ((1, 0), (0, 1, 0))}, "stain_vectors"),
        ({"colour": "red"}, "unknown synth parameter"),
    ],
)
def test_invalid_params_raise_config_error(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SynthParams.from_dict(kwargs)


def test_variety_changes_the_look_not_the_truth() -> None:
    """``variety`` (for fitting classifiers) keeps every cell, type and DAB amount, and changes the
    look as documented: haematoxylin-soaked cytoplasm, more elongated tumour nuclei, and dense
    DAB whose neutral share unmixes as haematoxylin."""
    p = SynthParams.preset("ki67", width=768, height=768, mpp=0.5, seed=4, intensity=2.0)
    a, b = render_region(p), render_region(p.replace(variety=1.0))

    def cells(r) -> list[tuple]:
        return [(c.x, c.y, c.type, c.nucleus_dab, c.positive) for c in r.truth.cells]

    assert cells(a) == cells(b) and len(cells(a)) > 150
    cyto = (a.cell_labels >= 0) & (a.nucleus_labels < 0) & ~a.membrane
    assert b.od_h[cyto].mean() > a.od_h[cyto].mean() + 0.04  # this seed: + 0.059 OD x counterstain
    pos = np.isin(a.nucleus_labels, [c.id for c in a.truth.cells if c.positive])
    h_a, h_b = _unmix(a.rgb, a.truth)[..., 0], _unmix(b.rgb, b.truth)[..., 0]
    assert h_b[pos].mean() > h_a[pos].mean() + 0.3  # measured 0.32 -> 0.80 OD

    def aspect_p90(r) -> float:
        ratios = []
        for c in r.truth.cells:
            yy, xx = np.nonzero(r.nucleus_labels == c.id)
            if c.type == "tumor" and len(yy) >= 30:
                ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx])))
                ratios.append(np.sqrt(ev[1] / ev[0]))
        return float(np.quantile(ratios, 0.9))

    assert aspect_p90(a) < 1.42 and aspect_p90(b) > 1.47  # measured 1.36 and 1.52
    with pytest.raises(ConfigError, match="variety"):
        p.replace(variety=1.5)


def test_presets_and_explicit_stain_vectors() -> None:
    with pytest.raises(ConfigError, match="unknown synth preset"):
        SynthParams.preset("nope")
    p = SynthParams.preset("p16_positive", width=512, seed=3, stain_jitter=0.0)
    assert p.positive_fraction == 0.85 and p.width == p.height == 512
    t = synthesize_truth(p)
    assert t.stains["dab"] == pytest.approx(np.array(DAB) / np.linalg.norm(DAB), abs=1e-6)
    assert t.stains["haematoxylin"] == pytest.approx(
        np.array(HAEMATOXYLIN) / np.linalg.norm(HAEMATOXYLIN), abs=1e-6
    )
    t2 = synthesize_truth(p.replace(stain_vectors=((0.6, 0.75, 0.3), (0.3, 0.6, 0.75))))
    assert t2.stains["dab"] == pytest.approx(
        np.array([0.3, 0.6, 0.75]) / np.linalg.norm([0.3, 0.6, 0.75]), abs=1e-6
    )


def test_cli_writes_refuses_to_overwrite_and_reports_bad_params(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.svs"
    args = [
        "synth",
        str(out),
        "--preset",
        "pdl1_cps_1_19",
        "--size",
        "1536x1024",
        "--mpp",
        "0.5",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CPS" in printed and "call 1-19" in printed
    assert (
        out.exists()
        and (tmp_path / "cli.truth.json").exists()
        and (tmp_path / "cli.tissue.png").exists()
    )
    before = out.read_bytes()

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == before
    with pytest.raises(OutputExistsError):
        synthesize_slide(SynthParams(width=512), out)

    assert main([*args, "--overwrite", "--seed", "4"]) == 0
    assert out.read_bytes() != before
    capsys.readouterr()

    bad = tmp_path / "bad.svs"
    assert main(["synth", str(bad), "--positive-fraction", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "positive_fraction" in err and "1.5" in err
    assert not bad.exists()
    assert main(["synth", str(bad), "--size", "big"]) == 2
    assert "--size" in capsys.readouterr().err


def test_jpeg_round_trip_is_the_svs_writers_codec() -> None:
    from pathology.synth._svs import jpeg_round_trip

    p = SynthParams.preset("pdl1_cps_ge20", width=512, height=256, mpp=0.5, seed=1)
    rgb = render_region(p).rgb
    out = jpeg_round_trip(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert 0 < diff.mean() < 3.0  # lossy, but q90
    with pytest.raises(ValueError, match="not a whole number of 256 px tiles"):
        jpeg_round_trip(rgb[:200])
