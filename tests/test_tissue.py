"""Tissue mask: pale IHC kept, glass / ink / dust / border rejected, on synthetic and real images."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, shared_file
from PIL import Image
from scipy import ndimage as ndi

from pathology import open_slide
from pathology.cli import main
from pathology.errors import OutputExistsError
from pathology.slide import ArraySlide, read_downsampled
from pathology.stain import H_DAB, H_E, StainMatrix, rgb_to_od
from pathology.tissue import (
    TissueMask,
    compute_tissue_mask,
    mask_downsample,
    overlay,
    tissue_mask_from_rgb,
)

# Marker inks as transmittance (0-255) over white glass: a green, a blue, a black and a red pen.
INKS = {"green": (50, 130, 90), "blue": (40, 60, 140), "black": (35, 35, 40), "red": (190, 40, 60)}
THUMB_MPP = 8.0  # microns per pixel of the synthetic thumbnails


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _polyline(
    shape: tuple[int, int], points: list[tuple[float, float]], width: float
) -> np.ndarray:
    """Bool mask of a stroke of ``width`` px through ``points`` (row, col)."""
    hit = np.zeros(shape, dtype=bool)
    for (r0, c0), (r1, c1) in itertools.pairwise(points):
        n = int(max(abs(r1 - r0), abs(c1 - c0)) * 2) + 2
        rr = np.clip(np.rint(np.linspace(r0, r1, n)).astype(int), 0, shape[0] - 1)
        cc = np.clip(np.rint(np.linspace(c0, c1, n)).astype(int), 0, shape[1] - 1)
        hit[rr, cc] = True
    return np.asarray(ndi.distance_transform_edt(~hit) <= width / 2)


def synthetic_thumbnail(
    seed: int = 0,
    *,
    shape: tuple[int, int] = (300, 400),
    od_range: tuple[float, float] = (0.05, 0.15),
    dab: float = 0.3,
    stains: StainMatrix = H_DAB,
    glass: tuple[float, float, float] = (232, 228, 238),
    gradient: float = 0.04,
    noise: float = 2.0,
    artifacts: bool = True,
    strokes_through_tissue: bool = False,
) -> dict[str, np.ndarray]:
    """A thumbnail (8 um/px) of pale tissue on tinted, unevenly lit, noisy glass, with its truth.

    Tissue: smooth blobs; counterstain OD ``od_range`` along the first stain with texture, DAB (or
    eosin) patches up to ``dab``. Artifacts: one stroke of each ink (on the glass, or across the
    tissue), grey dust specks on the glass, a black scanner strip along the left edge.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    field = np.zeros(shape)
    for _ in range(5):
        cy, cx = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0.3 * w, 0.7 * w)
        ry, rx = rng.uniform(25, 60, 2)
        field += np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
    wobble = ndi.gaussian_filter(rng.normal(size=shape), 6)
    tissue = ndi.binary_opening(field + 0.18 * wobble / wobble.std() > 0.5, iterations=2)

    texture = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    texture = (texture - texture.min()) / np.ptp(texture)
    counter = od_range[0] + (od_range[1] - od_range[0]) * texture
    patches = ndi.gaussian_filter(rng.normal(size=shape), 8)
    second = dab * np.clip(patches / patches.std() - 0.8, 0, None)
    od = stains.mix(np.stack([counter, second], axis=-1) * tissue[..., None])
    illum = 1.0 - gradient * (xx / w + 0.5 * yy / h)
    img = np.asarray(glass, np.float32) * illum[..., None] * 10.0 ** (-od)

    inks = {name: np.zeros(shape, bool) for name in INKS}
    dust = np.zeros(shape, bool)
    border = np.zeros(shape, bool)
    if artifacts:
        if strokes_through_tissue:
            paths = [
                [(150, 60), (160, 350)],
                [(60, 200), (260, 210)],
                [(80, 80), (230, 330)],
                [(230, 70), (90, 330)],
            ]
        else:
            paths = [
                [(10, 20), (20, 120), (45, 200)],
                [(h - 15, 40), (h - 25, 150)],
                [(30, w - 20), (150, w - 30), (h - 40, w - 15)],
                [(h - 12, w - 200), (h - 10, w - 90)],
            ]
        keep_off = ndi.binary_dilation(tissue, iterations=4)
        for (name, trans), path in zip(INKS.items(), paths, strict=True):
            stroke = _polyline(shape, path, 6 if not strokes_through_tissue else 5)
            if not strokes_through_tissue:
                stroke &= ~keep_off
            cover = ndi.gaussian_filter(stroke.astype(np.float32), 0.7)[..., None]
            img = img * (1 - cover) + img * (np.asarray(trans, np.float32) / 255) * cover
            inks[name] = stroke
        for _ in range(14):
            cy, cx = int(rng.integers(5, h - 5)), int(rng.integers(20, w - 5))
            speck = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(0.8, 2.2) ** 2
            if (speck & keep_off).any():
                continue
            dust |= speck
            img[speck] *= rng.uniform(0.3, 0.6)
        border = xx < 8
        img[border] = 6.0
    img = img + rng.normal(0.0, noise, img.shape)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return {"rgb": rgb, "tissue": tissue, "dust": dust, "border": border, **inks}


# ---------------------------------------------------------------------------------------------
# Synthetic thumbnails: the cases the module exists for


PALE_CASES = {
    "pale-H-DAB": {},
    "very-pale-H-only-green-glass": {
        "od_range": (0.04, 0.08),
        "dab": 0.0,
        "glass": (225, 232, 228),
        "gradient": 0.06,
    },
    "pale-noisy": {"od_range": (0.05, 0.1), "noise": 5.0, "seed": 3},
    "H&E": {"stains": H_E, "od_range": (0.1, 0.4), "seed": 2},
}


@pytest.mark.parametrize("case", sorted(PALE_CASES))
def test_pale_tissue_kept_ink_dust_border_rejected(case: str) -> None:
    kw = dict(PALE_CASES[case])
    s = synthetic_thumbnail(kw.pop("seed", 0), **kw)
    mask = tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP)
    assert mask.dtype == bool and mask.shape == s["tissue"].shape
    assert iou(mask, s["tissue"]) >= 0.9, iou(mask, s["tissue"])
    for ink in INKS:
        assert not (mask & s[ink]).any(), f"{ink} ink in the mask"
    assert not (mask & s["border"]).any()
    # Dust more than a closing radius from tissue must go (dust next to tissue may merge with it).
    far = s["dust"] & ~ndi.binary_dilation(s["tissue"], iterations=6)
    assert far.any() and not (mask & far).any()


def test_otsu_baseline_fails_where_ours_succeeds() -> None:
    """The reason for this module: H&E-tuned Otsu masks lose pale IHC tissue.

    With pen ink and a black border on the slide, Otsu's threshold separates ink from everything
    else. Even on a clean slide, saturation Otsu loses very pale, grey counterstain on tinted glass.
    (Grey Otsu on a clean, evenly lit synthetic slide is fine; real slides are rarely clean.)
    """
    from skimage.color import rgb2gray, rgb2hsv
    from skimage.filters import threshold_otsu

    kw = PALE_CASES["very-pale-H-only-green-glass"]
    for artifacts in (True, False):
        s = synthetic_thumbnail(0, artifacts=artifacts, **kw)
        truth = s["tissue"]
        grey = rgb2gray(s["rgb"])
        sat = rgb2hsv(s["rgb"])[..., 1]
        iou_grey = iou(grey < threshold_otsu(grey), truth)
        iou_sat = iou(sat > threshold_otsu(sat), truth)
        ours = iou(tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP), truth)
        print(
            f"very pale IHC, artifacts={artifacts}: IoU ours {ours:.3f}, "
            f"Otsu grey {iou_grey:.3f}, Otsu saturation {iou_sat:.3f}"
        )
        assert ours >= 0.95
        if artifacts:
            assert ours >= max(iou_grey, iou_sat) + 0.5
        else:
            assert ours >= iou_sat + 0.3 and ours >= iou_grey + 0.05


def test_ink_across_tissue_is_removed_and_the_rest_kept() -> None:
    s = synthetic_thumbnail(5, strokes_through_tissue=True)
    mask = tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP)
    ink = np.logical_or.reduce([s[k] for k in INKS])
    assert (mask & ink).sum() <= 0.02 * ink.sum()
    # The main piece of tissue, away from the strokes, stays (small fragments fall under
    # min_object_um2 by design).
    labels, _ = ndi.label(s["tissue"])
    main_piece = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    away = main_piece & ~ndi.binary_dilation(ink, iterations=8)
    assert (mask & away).sum() >= 0.97 * away.sum()


def test_strongly_uneven_glass() -> None:
    # 18% less light in one corner than the other: OD 0.086 of glass "stain" without the surface fit.
    s = synthetic_thumbnail(7, od_range=(0.05, 0.1), gradient=0.12)
    mask = tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP)
    assert iou(mask, s["tissue"]) >= 0.9


def test_scanner_padding_beside_dim_glass() -> None:
    # OpenSlide paints unscanned tiles pure white; the real glass here is grey (~213).
    s = synthetic_thumbnail(6, glass=(212, 214, 216))
    rgb = s["rgb"].copy()
    pad = np.zeros(rgb.shape[:2], bool)
    pad[:, 330:] = True
    pad[250:, :] = True
    rgb[pad] = 255
    mask = tissue_mask_from_rgb(rgb, mpp=THUMB_MPP)
    assert not (mask & pad).any()
    assert iou(mask, s["tissue"] & ~pad) >= 0.9


def test_glass_saturated_to_white() -> None:
    s = synthetic_thumbnail(8, glass=(262, 262, 262), gradient=0.0, noise=1.0)
    assert (s["rgb"] == 255).all(axis=-1).mean() > 0.5
    assert iou(tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP), s["tissue"]) >= 0.9


def test_field_without_glass_is_all_tissue() -> None:
    s = synthetic_thumbnail(9, shape=(120, 160), od_range=(0.15, 0.4), artifacts=False)
    inner = s["rgb"][40:80, 60:100]  # inside the tissue: no glass anywhere
    assert s["tissue"][40:80, 60:100].all()
    assert tissue_mask_from_rgb(inner, mpp=THUMB_MPP).mean() > 0.99


def test_deterministic_and_validated() -> None:
    s = synthetic_thumbnail(1)
    a = tissue_mask_from_rgb(s["rgb"], mpp=THUMB_MPP)
    b = tissue_mask_from_rgb(s["rgb"].copy(), mpp=THUMB_MPP)
    assert np.array_equal(a, b)
    without_mpp = tissue_mask_from_rgb(s["rgb"])
    assert iou(without_mpp, s["tissue"]) >= 0.85
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask_from_rgb(s["rgb"].astype(np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mpp"):
        tissue_mask_from_rgb(s["rgb"], mpp=0.0)
    with pytest.raises(ValueError, match="min_od"):
        tissue_mask_from_rgb(s["rgb"], min_od=0.0)


# ---------------------------------------------------------------------------------------------
# TissueMask: scale, box fractions, PNG


def test_box_fractions_are_exact_area_fractions() -> None:
    rng = np.random.default_rng(0)
    mask = ndi.binary_opening(rng.random((37, 53)) > 0.4)
    tm = TissueMask(mask, (8.0, 8.0), (53 * 8, 37 * 8), mpp=0.5)
    fine = np.kron(mask, np.ones((8, 8), bool))  # level-0 resolution
    boxes = np.column_stack([rng.integers(-20, 440, 300), rng.integers(-20, 300, 300)])
    sizes = np.column_stack([rng.integers(1, 90, 300), rng.integers(1, 90, 300)])
    got = tm.box_fractions(boxes, sizes)
    for (x, y), (w, h), g in zip(boxes, sizes, got, strict=True):
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, fine.shape[1]), min(y + h, fine.shape[0])
        want = fine[y0:y1, x0:x1].sum() / (w * h) if x1 > x0 and y1 > y0 else 0.0
        assert g == pytest.approx(want, abs=1e-9)
    assert tm.box_fraction((0, 0), (53 * 8, 37 * 8)) == pytest.approx(mask.mean())
    assert tm.fraction() == pytest.approx(mask.mean())
    assert tm.box_fraction((10_000, 10_000), (256, 256)) == 0.0
    assert tm.mask_mpp == pytest.approx(4.0)
    with pytest.raises(ValueError):
        tm.mask[0, 0] = True  # read-only: a frozen result


def test_box_fractions_are_fast() -> None:
    tm = TissueMask(np.ones((2048, 2560), bool), (16.0, 16.0), (40_960, 32_768))
    ys, xs = np.mgrid[0:32_768:512, 0:40_960:512]
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    t0 = time.perf_counter()
    frac = tm.box_fractions(xy, (512, 512))
    assert time.perf_counter() - t0 < 0.5  # 5120 tiles
    assert frac.min() > 0.99


def test_png_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    tm = TissueMask(mask, (16.0, 15.5), (640, 465), mpp=0.25)
    tm.to_png(tmp_path / "m.png")
    back = TissueMask.from_png(tmp_path / "m.png")
    assert np.array_equal(back.mask, mask)
    assert back.downsample_xy == tm.downsample_xy and back.l0_dimensions == (640, 465)
    assert back.mpp == 0.25
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}


def test_read_downsampled_is_an_area_mean() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (101, 67, 3), dtype=np.uint8)
    thumb, ds_xy = read_downsampled(ArraySlide(img), 4)
    assert thumb.shape == (26, 17, 3)
    assert ds_xy == pytest.approx((67 / 17, 101 / 26))
    assert np.array_equal(
        thumb[3, 5], np.floor(img[12:16, 20:24].reshape(-1, 3).mean(0) + 0.5).astype(np.uint8)
    )
    # The partial block at the edge averages its real pixels, not padding.
    assert np.array_equal(
        thumb[25, 16], np.floor(img[100:, 64:].reshape(-1, 3).mean(0) + 0.5).astype(np.uint8)
    )


def test_compute_tissue_mask_scale() -> None:
    s = synthetic_thumbnail(0)
    big = np.repeat(np.repeat(s["rgb"], 4, axis=0), 4, axis=1)  # a "slide" at 2 um/px
    tm = compute_tissue_mask(ArraySlide(big, mpp=2.0))
    assert tm.shape == s["tissue"].shape and tm.downsample_xy == (4.0, 4.0)
    assert tm.l0_dimensions == (1600, 1200) and tm.mpp == 2.0
    assert iou(tm.mask, s["tissue"]) >= 0.9
    # Without mpp the mask size is set by max_size.
    tm2 = compute_tissue_mask(ArraySlide(big), max_size=400)
    assert max(tm2.shape) == 400 and tm2.mpp is None and tm2.mask_mpp is None
    assert mask_downsample(ArraySlide(big), max_size=4096) == 1.0


# ---------------------------------------------------------------------------------------------
# Real images


def _reference_grid_mask(tm: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    """Our mask on another grid over the same slide: cells at least half tissue."""
    h, w = shape
    cw, ch = tm.l0_dimensions[0] / w, tm.l0_dimensions[1] / h
    rows, cols = np.mgrid[0:h, 0:w]
    xy = np.column_stack([cols.ravel() * cw, rows.ravel() * ch])
    return (tm.box_fractions(xy, (cw, ch)) >= 0.5).reshape(h, w)


@pytest.mark.realdata
def test_cmu1_matches_histolab_reference(cmu1_path: Path) -> None:
    reference = np.load(DATA / "histolab" / "tissue-mask-cmu-1-small-region.npy")
    assert reference.shape == (296, 221)
    with open_slide(cmu1_path) as reader:
        t0 = time.perf_counter()
        tm = compute_tissue_mask(reader)
        seconds = time.perf_counter() - t0
    score = iou(_reference_grid_mask(tm, reference.shape), reference)
    print(f"CMU-1-Small-Region: IoU {score:.3f} vs histolab, {tm.shape} mask, {seconds:.2f} s")
    assert score >= 0.8
    assert 0.35 <= tm.fraction() <= 0.55
    assert tm.mask_mpp == pytest.approx(8.0, rel=0.01)


@pytest.mark.realdata
def test_ihc_field_keeps_pale_counterstain_and_dab() -> None:
    rgb = np.asarray(Image.open(DATA / "ihc.png").convert("RGB"))
    mask = tissue_mask_from_rgb(rgb)  # full resolution, no mpp: sizes relative to the image
    conc = H_DAB.unmix(rgb_to_od(rgb))
    dab = conc[..., 1] > 0.35
    nuclei = (conc[..., 0] > 0.35) & (conc[..., 1] < 0.15)
    assert dab.mean() > 0.3 and nuclei.sum() > 500
    assert (mask & dab).sum() >= 0.99 * dab.sum()
    assert (mask & nuclei).sum() >= 0.99 * nuclei.sum()
    # The pale stroma between the glands (OD ~0.05 against the glass) is tissue too.
    stroma = ~dab & ~nuclei & (conc.sum(axis=-1) > 0.08)
    assert (mask & stroma).sum() >= 0.95 * stroma.sum()
    # An H&E-style grey Otsu mask splits DAB from the rest and loses most of that stroma.
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu

    grey = rgb2gray(rgb)
    otsu = grey < threshold_otsu(grey)
    assert (otsu & stroma).sum() <= 0.5 * stroma.sum()
    # Glass at the left edge and the empty lumen at the bottom right: large bright regions.
    lum = ndi.uniform_filter(rgb.astype(np.float32).mean(axis=-1), 9)
    labels, _ = ndi.label(lum >= 232)
    sizes = np.bincount(labels.ravel())
    glass = np.isin(labels, np.nonzero(sizes >= 400)[0][1:])
    assert glass.mean() > 0.01
    assert (mask & glass).sum() <= 0.02 * glass.sum()
    assert 0.9 <= mask.mean() <= 0.99


def _open_glass(img: np.ndarray, mpp: float) -> np.ndarray:
    """Open glass of a real field: bright areas wide enough to hold a 50 um disc."""
    lum = ndi.uniform_filter(img.astype(np.float32).mean(axis=-1), 9)
    bright = lum >= np.percentile(lum, 97) - 6
    radius = 25.0 / mpp
    core = ndi.distance_transform_edt(bright) > radius
    return bright & (ndi.distance_transform_edt(~core) <= radius)


@pytest.mark.realdata
def test_ki67_crops_from_two_scanners() -> None:
    """Real Ki-67 IHC: the same tissue scanned by Hamamatsu and by Olympus (dimmer, greyer glass)."""
    fractions = []
    for name in ("OS-2-ndpi", "OS-2-vsi"):
        path = shared_file(f"openslide-os2-ki67-crops/{name}.ome.tif")
        with open_slide(path) as reader:
            tm = compute_tissue_mask(reader)  # default 8 um/px: a ~63 px mask of a 0.5 mm field
            img = reader.read_region((0, 0), 0, reader.level_dimensions[0])
            mpp = reader.mpp
        fine = np.asarray(Image.fromarray(tm.mask).resize(img.shape[1::-1], Image.NEAREST))
        dab = H_DAB.unmix(rgb_to_od(img, 228))[..., 1] > 0.3
        glass = _open_glass(img, mpp)
        assert dab.mean() > 0.01 and glass.mean() > 0.05
        assert (fine & dab).sum() >= 0.99 * dab.sum(), name
        assert (~fine & glass).sum() >= 0.85 * glass.sum(), name
        fractions.append(tm.fraction())
    assert all(0.8 <= f <= 0.95 for f in fractions), fractions
    assert abs(fractions[0] - fractions[1]) <= 0.05, fractions


# ---------------------------------------------------------------------------------------------
# Slides from the synthetic-slide generator (truth mask written beside the SVS)


SYNTH_CASES = [
    ("ki67", {"seed": 11, "counterstain": 0.75}),  # pale counterstain
    ("p16_negative", {"seed": 12, "height": 1536}),  # almost no DAB
    (
        "pdl1_cps_ge20",
        {"seed": 13, "width": 1536, "counterstain": 1.3},
    ),  # strong DAB and counterstain
]


@pytest.fixture(scope="module")
def synth_slides(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path, dict]]:
    synth = pytest.importorskip(
        "pathology.synth", reason="the synthetic slide generator is not installed"
    )
    out = tmp_path_factory.mktemp("synth")
    slides = []
    for i, (preset, extra) in enumerate(SYNTH_CASES):
        kw = {"width": 2048, "mpp": 2.0, "artifacts": True, **extra}
        slide = synth.synthesize_slide(
            synth.SynthParams.preset(preset, **kw), out / f"s{i}.svs", workers=2
        )
        meta = json.loads(slide.truth_path.read_text())["tissue_mask"]
        slides.append((slide.svs_path, slide.tissue_path, meta))
    return slides


@pytest.mark.parametrize("index", range(len(SYNTH_CASES)))
def test_synthetic_slides_match_truth(
    synth_slides: list[tuple[Path, Path, dict]], index: int
) -> None:
    svs, truth_png, meta = synth_slides[index]
    truth = np.asarray(Image.open(truth_png)) > 0
    assert truth.shape == (meta["height"], meta["width"])
    with open_slide(svs) as reader:
        tm = compute_tissue_mask(reader)
    score = iou(_reference_grid_mask(tm, truth.shape), truth)
    print(f"{SYNTH_CASES[index][0]}: IoU {score:.3f} against the generator's truth mask")
    assert score >= 0.9


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.realdata
def test_cli_writes_mask_and_refuses_to_overwrite(
    cmu1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ov = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert main(["tissue", str(cmu1_path), "--out", str(out), "--overlay", str(ov)]) == 0
    text = capsys.readouterr().out
    assert "tissue fraction" in text and "139 x 186 px" in text and "downsample" in text
    tm = TissueMask.from_png(out)
    assert tm.l0_dimensions == (2220, 2967) and 0.35 <= tm.fraction() <= 0.55
    with Image.open(ov) as im:
        assert im.size == (139, 186) and im.mode == "RGB"
    before = out.read_bytes()
    assert main(["tissue", str(cmu1_path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert (
        main(["tissue", str(cmu1_path), "--out", str(out), "--overwrite", "--mask-mpp", "16"]) == 0
    )
    assert TissueMask.from_png(out).shape == (93, 70)


def test_cli_run_raises_output_exists(tmp_path: Path) -> None:
    import argparse

    from pathology.cli._tissue import run

    img = tmp_path / "field.png"
    Image.fromarray(synthetic_thumbnail(0)["rgb"]).save(img)
    existing = tmp_path / "mask.png"
    existing.write_bytes(b"keep")
    args = argparse.Namespace(
        slide=str(img), out=existing, overlay=None, mpp=8.0, mask_mpp=8.0, overwrite=False
    )
    with pytest.raises(OutputExistsError):
        run(args)
    assert existing.read_bytes() == b"keep"


def test_overlay_shape_and_colours() -> None:
    rgb = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:25] = True
    out = overlay(rgb, mask)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert tuple(out[0, 0]) != (200, 200, 200)  # glass tinted
    assert tuple(out[10, 15]) == (200, 200, 200)  # tissue inside untouched
    assert tuple(out[5, 10]) == (0, 200, 0)  # outline
