"""Scoring engine: markers, deconvolution, device policy, accuracy against synthetic truth and
real Ki-67 ground truth (DeepLIIF, from ../shared)."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import shared_file

from pathology.errors import ConfigError
from pathology.scoring import (
    CELL_CLASSES,
    available_markers,
    estimate_stains,
    fit_cell_types,
    load_cell_types,
    load_marker,
    load_model,
    resolve_device,
    run_model,
    score_image,
    score_tiles,
)
from pathology.scoring._celltype import FEATURES
from pathology.scoring._device import run_halving
from pathology.stain import DAB, EOSIN, HAEMATOXYLIN, StainMatrix, od_to_rgb, rgb_to_od
from pathology.synth import SynthParams, render_region
from pathology.synth._svs import jpeg_round_trip

SHIFTED = ((0.55, 0.76, 0.35), (0.33, 0.62, 0.71))  # ~7.5 and ~6 degrees off the references


# -- markers ---------------------------------------------------------------------------------
def test_builtin_markers_load_with_provenance() -> None:
    assert {"p16", "pdl1", "ki67", "egfr"} <= set(available_markers())
    p16 = load_marker("p16")
    assert p16.cells["tumor"].compartments == ("nucleus", "cytoplasm")
    assert p16.cells["tumor"].combine == "all" and p16.cells["tumor"].cut == 0.4
    assert p16.slide["positive_pct"] == 70 and p16.slide["equivocal_pct"] == 50
    assert p16.slide["stained_immune_flag_pct"] == 15
    pdl1 = load_marker("pdl1")
    assert pdl1.cells["tumor"].compartments == ("membrane",)
    assert pdl1.cells["immune"].compartments == ("membrane", "cytoplasm")
    assert pdl1.slide["rule"] == "cps" and pdl1.slide["cps_bins"] == (1.0, 20.0)
    # Macrophages take up PD-L1 and proliferating lymphocytes Ki-67: no stained_immune flag.
    assert (
        pdl1.slide["stained_immune_flag_pct"]
        == load_marker("ki67").slide["stained_immune_flag_pct"]
        == 0
    )
    assert len(pdl1.sha256) == 64


def test_unknown_marker_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown marker 'her2'.*known markers: egfr, ki67"):
        load_marker("her2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\ncells: {tumor: {compartments: [nucleus], cut: 0.2}}\nslide: {rule: percent}\ncolour: red\n",
            "unknown key\\(s\\) colour in the marker",
        ),
        (
            "name: x\ncells: {tumor: {compartments: [nucleolus], cut: 0.2}}\nslide: {rule: percent}\n",
            "unknown compartment 'nucleolus' in cells.tumor",
        ),
        (
            "name: x\ncells: {tumor: {compartments: [nucleus], cut: 5}}\nslide: {rule: percent}\n",
            "cells.tumor.cut must be between",
        ),
        (
            "name: x\ncells: {tumor: {compartments: [membrane], cut: 0.2}}\nslide: {rule: cps}\n",
            "the cps rule needs a cells.immune rule",
        ),
        (
            "name: x\ncells: {tumor: {compartments: [nucleus], cut: 0.2}}\nslide: {rule: median}\n",
            "unknown slide rule 'median'",
        ),
        (
            "name: x\ncells: {tumor: {compartments: [nucleus], cut: 0.2}}\n"
            "slide: {rule: percent, stained_immune_flag_pct: 150}\n",
            "slide.stained_immune_flag_pct must be between",
        ),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_marker_files_name_file_and_key(tmp_path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_marker(f)
    assert str(f) in str(info.value)


def test_extra_marker_is_yaml_only() -> None:
    """EGFR (membranous H-score) ships as a YAML file and scores with no code of its own."""
    p = SynthParams.preset("pdl1_cps_ge20", width=768, height=768, mpp=0.5, seed=11)
    r = render_region(p)
    res = score_image(r.rgb, "egfr", mpp=0.5, device="cpu")
    tot = res.total()
    v = r.truth.values
    assert res.marker == "egfr"
    assert abs(tot["tumor_cells"] - v.tumor_cells) <= 0.1 * v.tumor_cells
    bins = [tot[f"tumor_bin{k}"] for k in range(4)]
    assert sum(bins) == tot["tumor_cells"]
    assert tot["immune_positive"] == 0  # EGFR scores tumour cells only


# -- deconvolution -----------------------------------------------------------------------------
def test_unmixing_matches_skimage_rgb2hed() -> None:
    """scikit-image's vectors and OD convention -> its H, E, DAB to 1e-5.

    rgb2hed unmixes with the raw (unnormalised) rows of ``rgb_from_hed``; StainMatrix normalises
    them, so its amounts are per unit vector: divide by each row's norm to compare.
    """
    from skimage.color import rgb2hed, rgb_from_hed

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hed = StainMatrix(("haematoxylin", "eosin", "dab"), tuple(map(tuple, rgb_from_hed)))
    norms = np.linalg.norm(rgb_from_hed, axis=1)
    od = -np.log10(np.maximum(rgb / 255.0, 1e-6))  # rgb2hed's OD, base 10
    ours = np.maximum(hed.unmix(od) / norms, 0) / 6.0  # rgb2hed's scale: ln(1e-6) / ln(10) = -6
    np.testing.assert_allclose(ours, rgb2hed(rgb), atol=1e-5)
    # Our default vectors are the same Ruifrok-Johnston stains to within rounding (< 1 degree).
    for ours_v, sk in (
        (HAEMATOXYLIN, rgb_from_hed[0]),
        (EOSIN, rgb_from_hed[1]),
        (DAB, rgb_from_hed[2]),
    ):
        cos = np.dot(ours_v, sk) / (np.linalg.norm(ours_v) * np.linalg.norm(sk))
        assert np.degrees(np.arccos(min(1.0, cos))) < 1.0


def test_torch_deconvolution_matches_numpy() -> None:
    from pathology.scoring._stains import deconvolve, log_background
    from pathology.stain import H_DAB

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    inv = np.linalg.inv(H_DAB.complete()).astype(np.float32)[:, :2]
    out = deconvolve(
        torch.from_numpy(rgb).permute(0, 3, 1, 2),
        torch.from_numpy(log_background((250.0, 248.0, 252.0))),
        torch.from_numpy(inv),
    )
    ref = H_DAB.unmix(rgb_to_od(rgb, (250.0, 248.0, 252.0)))[..., :2]
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


def test_stain_estimation_recovers_shifted_vectors() -> None:
    p = SynthParams.preset(
        "p16_positive",
        width=1024,
        height=1024,
        mpp=0.5,
        seed=4,
        stain_vectors=SHIFTED,
        stain_jitter=0.0,
    )
    r = render_region(p)
    est = estimate_stains(r.rgb)
    for got, want in zip(est.stains.vectors, SHIFTED, strict=True):
        cos = np.dot(got, want) / np.linalg.norm(want)
        assert np.degrees(np.arccos(min(1.0, cos))) < 2.0
    assert est.in_range and est.method == "estimated"
    assert all(230 <= b <= 252 for b in est.background)
    # A few tinted pixels among the brightest (a yellow fibre) do not veto the glass: before,
    # one pixel with a channel under 180 among the brightest 1 % set the background to 255,
    # which read a cream-tinted glass as stain (real BCData tiles 34_3 and 6_2).
    rng = np.random.default_rng(0)
    tissue = r.rgb.reshape(-1, 3)[r.rgb.reshape(-1, 3).astype(int).sum(1) < 600]
    cream = np.clip(rng.normal((224, 221, 213), 1.5, (len(tissue) // 30, 3)), 0, 255)
    fibre = np.tile(np.array([[245, 245, 176]]), (20, 1))
    rgb = np.concatenate([tissue, cream.astype(np.uint8), fibre.astype(np.uint8)])
    tinted = estimate_stains(rgb)
    assert "no glass in the sample: background 255" not in tinted.notes
    assert tinted.background == pytest.approx((224, 221, 213), abs=1.0)
    # No glass at all (every pixel stained) still falls back to 255.
    stained = tissue[tissue.min(1) < 170]
    assert estimate_stains(stained).background == (255.0, 255.0, 255.0)


def test_dab_vector_is_estimated_only_where_there_is_dab_to_aim_at() -> None:
    """A PD-L1 CPS < 1 slide (clear DAB in ~3 % of stained pixels) keeps the reference DAB
    vector, with a note; its haematoxylin is still estimated. A p16-positive slide with the same
    jittered stains has its DAB estimated, closer to the truth than the reference."""
    from pathology.scoring._stains import H_DAB, MIN_DAB_SHARE

    def angle(a: object, b: object) -> float:
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(np.degrees(np.arccos(min(1.0, a @ b / np.linalg.norm(a) / np.linalg.norm(b)))))

    low = render_region(SynthParams.preset("pdl1_cps_lt1", width=1536, height=1536, seed=15))
    est = estimate_stains(low.rgb)
    assert est.stains.vectors[1] == pytest.approx(tuple(H_DAB.matrix[1]))
    assert est.angles_deg[1] == 0.0 and est.angles_deg[0] > 3.0  # haematoxylin: estimated
    (note,) = [n for n in est.notes if n.startswith("clear DAB in")]
    share = float(note.split()[3])
    assert 0 < share < 100 * MIN_DAB_SHARE and note.endswith("reference DAB vector kept")
    # The reference is the nearer to this slide's true DAB: 1.8 degrees, the estimate was 4.2.
    true_dab = low.truth.stains["dab"]
    assert angle(est.stains.vectors[1], true_dab) < 2.0
    high = render_region(SynthParams.preset("p16_positive", width=1536, height=1536, seed=15))
    est = estimate_stains(high.rgb)
    assert not any(n.startswith("clear DAB in") for n in est.notes)
    assert angle(est.stains.vectors[1], high.truth.stains["dab"]) < 1.5
    assert est.angles_deg[1] > 0.0


def test_pale_counterstain_is_rescaled_per_slide_and_dab_is_not() -> None:
    """A slide with half the haematoxylin (a pale counterstain) gets its haematoxylin scaled to the
    median of the classifier's training slides by the stain estimate; a synthetic slide keeps
    factor 1; DAB is never rescaled."""
    from dataclasses import replace

    from pathology.scoring import load_model
    from pathology.scoring._stains import (
        H_P99_RANGE,
        H_P99_REFERENCE,
        StainEstimate,
        counterstain_scale,
    )
    from pathology.stain import H_DAB

    p = SynthParams.preset("ki67", width=768, height=768, mpp=0.5, seed=12)
    r = render_region(p)
    est = estimate_stains(r.rgb, estimate_dab=False)
    assert est.h_scale == 1.0
    # Halve the haematoxylin amount of every pixel, keep DAB: a paler counterstain.
    od = rgb_to_od(r.rgb, est.background)
    conc = H_DAB.unmix(od)
    conc[..., 0] *= 0.5
    pale_od = conc @ H_DAB.complete()
    pale = od_to_rgb(pale_od, est.background)
    pale_est = estimate_stains(pale, estimate_dab=False)
    _, p99 = counterstain_scale(od.reshape(-1, 3).astype(np.float64), est.stains)
    _, pale_p99 = counterstain_scale(
        rgb_to_od(pale, pale_est.background).reshape(-1, 3).astype(np.float64), pale_est.stains
    )
    assert H_P99_RANGE[0] <= p99 <= H_P99_RANGE[1]
    assert 0.45 * p99 <= pale_p99 <= 0.65 * p99  # about half: fewer pale pixels pass H > 0.05
    # Brought to the median of the classifier's training slides (not just into its range).
    assert pale_est.h_scale == pytest.approx(H_P99_REFERENCE / pale_p99, rel=0.02)
    assert StainEstimate.from_dict(pale_est.to_dict()) == pale_est
    ref = load_model("ki67", 0.5, stains=replace(pale_est, h_scale=1.0), device="cpu")
    scaled = load_model("ki67", 0.5, stains=pale_est, device="cpu")
    np.testing.assert_allclose(scaled.unmix[:, 0], ref.unmix[:, 0] * pale_est.h_scale, rtol=1e-6)
    np.testing.assert_array_equal(scaled.unmix[:, 1], ref.unmix[:, 1])


def test_counterstain_scale_is_capped() -> None:
    """A counterstain paler than any slide checked against truth is scaled by at most
    ``H_SCALE_MAX`` (scaling lifts faint texture with the nuclei); a moderately pale one is brought
    to the reference exactly."""
    from pathology.scoring._stains import H_P99_REFERENCE, H_SCALE_MAX, counterstain_scale
    from pathology.stain import H_DAB

    rng = np.random.default_rng(0)
    for top, expected in ((0.2, H_SCALE_MAX), (0.5, None)):
        h = rng.uniform(0.06, top, 5000)
        od = np.outer(h, H_DAB.matrix[0])
        factor, p99 = counterstain_scale(od, H_DAB)
        assert p99 == pytest.approx(np.quantile(h, 0.99))
        assert factor == (expected or pytest.approx(H_P99_REFERENCE / p99))


# -- detection filters -----------------------------------------------------------------------
def test_fft_log_matches_direct_separable_convolution() -> None:
    """The frequency-domain LoG equals ``-s^2 (Gxx Gy + Gx Gyy) * img`` with zero padding, done
    directly with scipy on the same truncated taps, on a non-square batch at every scale."""
    from scipy.ndimage import correlate1d

    from pathology.scoring._detect import SIGMAS_UM, gaussian_taps, log_responses

    rng = np.random.default_rng(3)
    img = rng.gamma(2.0, 0.2, (3, 37, 52)).astype(np.float32)
    img[1] = 0.0
    img[1, 18, 26] = 1.0  # an impulse: the response is the kernel itself, edges included
    got = log_responses(torch.from_numpy(img), SIGMAS_UM).numpy()
    assert got.shape == (len(SIGMAS_UM), 3, 37, 52)

    def sep(x: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
        y = correlate1d(x.astype(np.float64), ky, axis=-2, mode="constant")
        return correlate1d(y, kx, axis=-1, mode="constant")

    for i, s in enumerate(SIGMAS_UM):
        g, g2 = gaussian_taps(s, 0), gaussian_taps(s, 2)
        want = -(s * s) * (sep(img, g, g2) + sep(img, g2, g))
        np.testing.assert_allclose(got[i], want, atol=2e-6)
        assert abs(got[i, 1].sum()) < 1e-5  # zero response to a constant: the LoG sums to 0
    # A disc of radius r answers most at sigma = r / sqrt(2) (the scale the detector reports).
    yy, xx = np.mgrid[:64, :64]
    disc = (((yy - 32) ** 2 + (xx - 32) ** 2) <= 4.4**2).astype(np.float32)[None]
    centre = log_responses(torch.from_numpy(disc), SIGMAS_UM)[:, 0, 32, 32]
    assert SIGMAS_UM[int(centre.argmax())] == 3.1


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_mean_pool_matches_avg_pool2d(factor: int) -> None:
    from pathology.scoring._model import mean_pool

    x = torch.rand(2, 3, 41, 50)
    want = torch.nn.functional.avg_pool2d(x, factor)
    got = mean_pool(x, factor)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# -- ray sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2, 3, 6])
def test_sample_points_matches_per_tile_grid_sample(threads: int) -> None:
    """Sampling every tile of a batch as one tall image, split into one batch item per thread,
    equals ``grid_sample`` on each point's own tile with border padding, for one and two
    channels and for offsets shared by all centres or given per centre. Six threads for seven
    centres is the case of more threads than items of two (the CPU path on a 16-core machine
    failed there with a shape error, found on the GPU box)."""
    import torch.nn.functional as F

    from pathology.scoring._sampling import sample_points

    mpp = 0.5
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(2, 5, 23, 19, generator=g).transpose(0, 1)  # stain-major, as deconvolved
    tile = torch.tensor([0, 0, 1, 2, 4, 4, 4])
    centre = torch.rand(7, 2, generator=g) * torch.tensor([23.0, 19.0]) * mpp
    shared = (torch.rand(11, 2, generator=g) - 0.5) * 30.0  # (M, 2) um, many outside the tile
    own = (torch.rand(7, 11, 2, generator=g) - 0.5) * 30.0  # (K, M, 2)

    def want(m: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        pts = centre.unsqueeze(1) + off.expand(7, -1, -1)  # (K, M, 2) um, (y, x)
        px = pts / mpp - 0.5
        size = torch.tensor([m.shape[-2] - 1, m.shape[-1] - 1], dtype=px.dtype)
        grid = (2 * px / size - 1).flip(-1)  # normalised (x, y)
        out = F.grid_sample(
            m[tile], grid.unsqueeze(1), padding_mode="border", align_corners=True
        )  # (K, C, 1, M)
        return out[:, :, 0]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (maps, maps[:, :1]):
            for off in (shared, own):
                got = sample_points(m, mpp, tile, centre, off)
                assert got.shape == (7, m.shape[1], 11)
                torch.testing.assert_close(got, want(m, off), rtol=0, atol=1e-5)
            # Distances along directions: the same points, bit for bit.
            dirs = torch.randn(3, 2, generator=g)
            dist = torch.rand(7, 3, 4, generator=g) * 15.0
            pts = (dist.unsqueeze(3) * dirs[None, :, None, :]).reshape(7, 12, 2)
            got = sample_points(m, mpp, tile, centre, dist, dirs)
            assert torch.equal(got, sample_points(m, mpp, tile, centre, pts))
    finally:
        torch.set_num_threads(before)


def test_prefix_sums_by_columns_equal_the_last_axis_scan() -> None:
    """The CUDA layout of the rays' prefix sums (a scan down a transposed copy) gives the CPU's
    sums bit for bit, empty batches included; run here on the CPU."""
    from pathology.scoring._measure import _prefix, _prefix_by_columns

    g = torch.Generator().manual_seed(3)
    for shape in ((50, 16, 33), (7, 13), (0, 16, 33)):
        v = torch.rand(shape, generator=g)
        got = _prefix_by_columns(v)
        assert got.shape == (*shape[:-1], shape[-1] + 1) and got.is_contiguous()
        assert torch.equal(got, _prefix(v))


@pytest.mark.parametrize(
    ("mpp", "preset", "marker"),
    [(0.5, "pdl1_cps_ge20", "pdl1"), (0.25, "pdl1_cps_ge20", "pdl1"), (0.5, "ki67", "ki67")],
)
def test_halo_cells_get_short_haematoxylin_rays_and_the_same_features(
    mpp: float, preset: str, marker: str
) -> None:
    """Cells that cannot end up in a tile's core get haematoxylin-only rays (Ki-67: haematoxylin
    and DAB, its outline's map), only as long as their nucleus measurement reads: every cell's
    outline, nucleus features, centre and neighbours are the same as with full rays, the core
    cells' DAB rays and compartments too, and DAB rays of a halo-only cell are refused."""
    from pathology.scoring import load_model
    from pathology.scoring._api import tiles_with_halo
    from pathology.scoring._measure import measure_compartments
    from pathology.scoring._model import halo_for

    halo = halo_for(mpp)
    p = SynthParams.preset(preset, width=768, height=512, mpp=mpp, seed=4)
    tiles, _ = tiles_with_halo(render_region(p).rgb, 256, halo)
    t = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    scorer = load_model(marker, mpp, halo_px=halo, device="cpu")
    with torch.inference_mode():
        maps = scorer.stain_maps(t)
        full, _, _ = scorer.detect(maps)
        part, _, _ = scorer.detect(maps, (t.shape[-2], t.shape[-1]))
        for name in ("tile", "yx_um", "centre_um", "t_um", "edge_um", "area_um2", "elongation"):
            assert torch.equal(getattr(full, name), getattr(part, name)), name
        for name in ("h_nucleus", "h_around", "density", "nb_index", "nb_dist_um"):
            assert torch.equal(getattr(full, name), getattr(part, name)), name
        without = (part.dab_row < 0).nonzero(as_tuple=True)[0]
        assert 0 < without.numel() < part.dab_row.numel()  # the short path ran
        core = scorer.in_core(full.centre_um, t.shape[-2], t.shape[-1]).nonzero(as_tuple=True)[0]
        assert core.numel() > 20 and bool((part.dab_row[core] >= 0).all())
        assert torch.equal(full.dab_rays(core), part.dab_rays(core))
        assert torch.equal(full.dab_nucleus(core), part.dab_nucleus(core))
        body = torch.full_like(full.area_um2, 12.75)
        a, b = (
            measure_compartments(r, body, 0.2, maps, scorer.meas_mpp, cells=core)
            for r in (full, part)
        )
        for name in ("cell_edge_um", "cytoplasm", "membrane", "membrane_coverage"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        with pytest.raises(ValueError, match="DAB rays were not sampled"):
            part.dab_rays(without[:3])


def test_grey_closing_matches_max_pooling() -> None:
    import torch.nn.functional as F

    from pathology.scoring._detect import grey_closing

    x = torch.rand((3, 37, 29), generator=torch.Generator().manual_seed(0))
    for half in (1, 2, 3):
        k = 2 * half + 1
        dil = F.max_pool2d(x.unsqueeze(1), k, 1, half)
        ref = -F.max_pool2d(-dil, k, 1, half)
        assert torch.equal(grey_closing(x, half), ref.squeeze(1)), half
    assert grey_closing(x, 0) is x


def test_granular_ki67_nucleus_gives_one_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ki-67-positive nucleus stained as clumps around a paler centre (as on BCData 6_2) is one
    nucleus: the closing of the detection map's DAB part merges the clumps' LoG peaks. Without
    it (DAB_CLOSING_UM 0) the same nucleus gives a peak per clump; a blue nucleus 14 um away
    keeps its one peak either way."""
    import pathology.scoring._model as model_mod
    from pathology.scoring import load_model

    mpp = 0.5
    yy, xx = np.mgrid[0:80, 0:80] * mpp + mpp / 2
    maps = np.zeros((1, 2, 80, 80), np.float32)
    cy, cx = 20.3, 16.2
    maps[0, 1][(yy - cy) ** 2 + (xx - cx) ** 2 <= 5.5**2] = 0.1  # pale brown nucleoplasm
    for a in np.arange(5) * (2 * np.pi / 5):  # five dark clumps 1.5 um across on a 4 um ring
        clump = (yy - cy - 4.0 * np.sin(a)) ** 2 + (xx - cx - 4.0 * np.cos(a)) ** 2 <= 1.5**2
        maps[0, 1][clump] = 1.2
    maps[0, 0][(yy - cy) ** 2 + (xx - cx - 14.0) ** 2 <= 3.5**2] = 0.6
    t = torch.from_numpy(maps)

    def peaks_in(closing_um: float) -> tuple[int, int]:
        monkeypatch.setattr(model_mod, "DAB_CLOSING_UM", closing_um)
        scorer = load_model("ki67", mpp, halo_px=0, device="cpu")
        with torch.inference_mode():
            rays, _, _ = scorer.detect(t)
        d_brown = (rays.yx_um - torch.tensor([cy, cx])).norm(dim=1)
        d_blue = (rays.yx_um - torch.tensor([cy, cx + 14.0])).norm(dim=1)
        return int((d_brown < 5.5).sum()), int((d_blue < 3.5).sum())

    assert peaks_in(2.0) == (1, 1)
    brown, blue = peaks_in(0.0)
    assert brown >= 4 and blue == 1


def test_two_detections_of_one_nucleus_count_once() -> None:
    """Two LoG peaks on one nucleus (a clump off its centre, a second scale) both outline the
    whole nucleus and their outline centres meet: the weaker is a duplicate. A nucleus 1 um
    from it is a cell of its own even with a weaker response."""
    from pathology.scoring._measure import sample_rays
    from pathology.scoring._model import _drop_neighbours, duplicate_nuclei

    mpp = 0.5
    yy, xx = np.mgrid[0:80, 0:80] * mpp + mpp / 2
    maps = np.zeros((1, 2, 80, 80), np.float32)
    for cx in (16.0, 25.0):
        maps[0, 0][(yy - 20.0) ** 2 + (xx - cx) ** 2 <= 4.0**2] = 0.6
    yx = torch.tensor([[20.0, 14.8], [20.0, 17.2], [20.0, 25.0]])
    rays = sample_rays(
        torch.from_numpy(maps), mpp, torch.zeros(3, dtype=torch.long), yx, torch.full((3,), 4.0)
    )
    assert (rays.centre_um[0] - rays.centre_um[1]).norm() < 0.5  # both outline nucleus A
    dup = duplicate_nuclei(rays, torch.tensor([0.5, 0.4, 0.3]))
    assert dup.tolist() == [False, True, False]
    # The duplicate leaves the others' neighbour lists and density (what typing reads).
    kept = _drop_neighbours(rays, dup, 1)
    assert rays.density.tolist() == [2.0, 2.0, 2.0]
    assert kept.density[[0, 2]].tolist() == [1.0, 1.0]
    assert kept.nb_index[0, :2].tolist() == [2, -1] and kept.nb_index[2, :2].tolist() == [0, -1]
    assert kept.nb_dist_um[0, 0] == rays.nb_dist_um[0][rays.nb_index[0] == 2]
    dup = duplicate_nuclei(rays, torch.tensor([0.4, 0.5, 0.3]))
    assert dup.tolist() == [True, False, False]


def test_synthetic_nuclei_are_reported_once() -> None:
    """On a synthetic slide with known nuclei, few hold two reported tumour or immune cells.
    2026-11-24, p16 positive seed 5 (1280 px at 0.5 um/px, 454 such cells): 4 nuclei; 8 before
    duplicate detections were dropped. Every detection the rule drops on the accuracy slides
    (57) lies in the same true nucleus as the one kept. What is left is mostly elongated
    nuclei read as two (both typed `other`, so not counted)."""
    p = SynthParams.preset("p16_positive", width=1280, height=1280, mpp=0.5, seed=5)
    r = render_region(p)
    c = score_image(r.rgb, p.marker, mpp=p.mpp, device="cpu").cells
    counted = c["type"] != 3  # all but `other`
    lab = r.nucleus_labels[c["y"][counted].astype(int), c["x"][counted].astype(int)]
    _, n = np.unique(lab[lab > 0], return_counts=True)
    assert int(counted.sum()) > 400
    assert int((n > 1).sum()) <= 4


@pytest.mark.parametrize("r_um", [2.5, 4.0, 5.0])
def test_a_plateau_gives_one_peak(r_um: float) -> None:
    """A disc centred on a pixel corner has a flat top of equal responses; it is one nucleus
    (the suppression breaks ties by position: it gave 2-3 coincident peaks before)."""
    from pathology.scoring._detect import detect_nuclei

    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    det = ((yy - 20.0) ** 2 + (xx - 20.0) ** 2 <= r_um**2).astype(np.float32) * 0.6
    peaks = detect_nuclei(torch.from_numpy(det)[None, None], 1.0)
    assert peaks.tile.numel() == 1
    assert peaks.yx_um[0].tolist() == pytest.approx([20.0, 20.0], abs=0.05)


def test_nuclear_marker_outlines_brown_nuclei_at_their_size() -> None:
    """A Ki-67-positive nucleus is brown: where the slide's DAB hue is off the unmixing vector it
    reads no haematoxylin, or a little below zero. Markers that find nuclei on haematoxylin + DAB
    outline them on it too, so such a nucleus measures its true area; the nucleus darkness
    features stay haematoxylin. On haematoxylin alone its outline shrinks to a sliver."""
    from pathology.scoring._measure import sample_rays

    mpp, r_um = 0.5, 4.0
    yy, xx = np.mgrid[0:96, 0:96] * mpp + mpp / 2
    maps = np.zeros((1, 2, 96, 96), np.float32)
    centres = [(12.0, 12.0), (12.0, 36.0)]  # um: a blue nucleus, then a brown one
    for k, (cy, cx) in enumerate(centres):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r_um**2
        if k == 0:
            maps[0, 0][disc] = 0.5
        else:
            maps[0, 1][disc] = 0.9
            maps[0, 0][disc] = -0.05  # DAB unmixed with a hue a little off its vector
    args = (
        torch.from_numpy(maps),
        mpp,
        torch.zeros(2, dtype=torch.long),
        torch.tensor(centres),
        torch.tensor([2.83, 2.83]),  # the smallest LoG scale's radius, as on real tiles
    )
    true_area = math.pi * r_um**2
    on_both = sample_rays(*args, nucleus_dab=True)
    on_h = sample_rays(*args)
    assert on_both.area_um2.tolist() == pytest.approx([true_area, true_area], rel=0.15)
    assert float(on_h.area_um2[1]) < 0.3 * true_area
    # The blue nucleus and every darkness feature are the same either way.
    assert float(on_both.area_um2[0]) == pytest.approx(float(on_h.area_um2[0]), rel=1e-6)
    assert float(on_both.h_nucleus[0]) == pytest.approx(0.5, abs=0.02)
    assert float(on_both.h_nucleus[1]) == pytest.approx(-0.05, abs=0.02)
    assert float(on_both.h_around[1]) == pytest.approx(float(on_h.h_around[1]), abs=1e-6)

    assert float(on_both.nucleus_dab_od[1]) == pytest.approx(0.9, abs=0.02)
    assert on_h.nucleus_dab_od is None


def test_off_plane_brown_is_outlined_on_the_larger_stain() -> None:
    """Scanned brown whose hue lies off the two stain vectors unmixes into large readings of
    opposite sign (BCData 6_2: haematoxylin -1.7 next to DAB +1.7 OD at saturated pixels). A
    brown nucleus with such a band inside is outlined on the larger of the two stains at its true
    size; on their sum the band reads ~0 and every ray stops at it."""
    from pathology.scoring import _measure
    from pathology.scoring._measure import sample_rays

    mpp, r_um = 0.5, 4.0
    yy, xx = np.mgrid[0:48, 0:48] * mpp + mpp / 2
    rr = np.hypot(yy - 12.0, xx - 12.0)
    maps = np.zeros((1, 2, 48, 48), np.float32)
    maps[0, 1][rr <= r_um] = 1.7
    band = (rr >= 1.5) & (rr <= 2.5)
    maps[0, 0][band] = -1.6
    args = (
        torch.from_numpy(maps),
        mpp,
        torch.zeros(1, dtype=torch.long),
        torch.tensor([[12.0, 12.0]]),
        torch.tensor([2.83]),
    )
    true_area = math.pi * r_um**2
    rays = sample_rays(*args, nucleus_dab=True)
    assert float(rays.area_um2[0]) == pytest.approx(true_area, rel=0.15)
    # The same rays traced on the sum (what the outline read before): the band cuts it short.
    t = torch.arange(0.0, _measure.RAY_MAX_UM + 1e-6, _measure.RAY_STEP_UM)
    a = _measure.RAY_ANGLES
    theta = torch.arange(a, dtype=torch.float32) * (2 * math.pi / a)
    dirs = torch.stack([torch.sin(theta), torch.cos(theta)], 1)
    offsets = (t.view(1, -1, 1) * dirs.view(a, 1, 2)).reshape(-1, 2)
    samp = _measure.sample_points(args[0], mpp, args[2], args[3], offsets).reshape(1, 2, a, -1)
    summed = samp[:, 0] + samp[:, 1].clamp_min(0)
    edge_sum = _measure._nucleus(summed, t, args[4].clamp(2.0, 8.0))[0]
    assert float(edge_sum.max()) < 2.0  # um: stops at the band, against 4 um


def test_darkness_of_dab_masked_nuclei_is_not_read() -> None:
    """Under Ki-67 (nuclei found on haematoxylin + DAB), a nucleus whose DAB is >= 0.3 OD and
    >= its unscaled haematoxylin has its haematoxylin darkness features left unread (NaN, which
    the classifier standardises to 0), and is left out of its neighbours' darkness ratio. A dark
    blue nucleus with DAB cross-talk below its haematoxylin (as synthetic lymphocytes read: 0.6
    DAB next to 0.9 haematoxylin) stays read; so does every nucleus under a marker whose nuclei
    are found on haematoxylin alone."""
    from pathology.scoring._celltype import cell_features, stained_nuclei
    from pathology.scoring._measure import sample_rays

    mpp = 0.5
    yy, xx = np.mgrid[0:64, 0:64] * mpp + mpp / 2
    maps = np.zeros((1, 2, 64, 64), np.float32)
    # (centre um, haematoxylin, DAB): blue tumour nucleus, leaky brown one, dark blue one
    nuclei = [((10.0, 10.0), 0.5, 0.0), ((10.0, 22.0), 1.4, 1.8), ((22.0, 10.0), 0.9, 0.6)]
    for (cy, cx), h, d in nuclei:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 3.5**2
        maps[0, 0][disc], maps[0, 1][disc] = h, d
    args = (
        torch.from_numpy(maps),
        mpp,
        torch.zeros(3, dtype=torch.long),
        torch.tensor([c for c, _, _ in nuclei]),
        torch.full((3,), 2.83),
    )
    rays = sample_rays(*args, nucleus_dab=True)
    resp, radius = torch.full((3,), 0.5), torch.full((3,), 2.83)
    h_col, dark_col = FEATURES.index("h_nucleus"), FEATURES.index("neighbour_log_darkness_ratio")
    f = cell_features(rays, resp, radius).numpy()
    assert np.isnan(f[1, [h_col, dark_col]]).all()
    assert np.isfinite(np.delete(f, 1, axis=0)).all() and np.isfinite(np.delete(f[1], [1, 8])).all()
    # The blue nucleus's darkness ratio is against the dark blue neighbour only.
    assert f[0, dark_col] == pytest.approx(math.log(0.9 / 0.5), abs=0.05)
    # The comparison is on unscaled haematoxylin: with the map scaled x2 (a pale counterstain)
    # the dark blue nucleus's 0.9 is 0.45 unscaled, below its 0.6 DAB; scaled x0.5 the brown
    # one's 1.4 is 2.8, above its 1.8.
    assert stained_nuclei(rays.nucleus_dab_od, rays.h_nucleus, 2.0).tolist() == [0, 1, 1]
    # A pale nucleus reading more DAB than haematoxylin, both near noise: read.
    assert not stained_nuclei(torch.tensor([0.25]), torch.tensor([0.1])).any()
    assert not stained_nuclei(rays.nucleus_dab_od, rays.h_nucleus, 0.5).any()
    # Nuclei found on haematoxylin alone carry no nucleus DAB: every feature is read.
    assert np.isfinite(cell_features(sample_rays(*args), resp, radius).numpy()).all()
    # NaN is typed as the training mean, and fitted as such.
    from pathology.scoring import model_dir

    model = load_cell_types(model_dir() / "cell_types.json")
    at_mean = f.copy()
    at_mean[1, [h_col, dark_col]] = model.mean[[h_col, dark_col]]
    np.testing.assert_allclose(model.predict_proba(f), model.predict_proba(at_mean), atol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, len(FEATURES))).astype(np.float32)
    y = rng.integers(0, len(CELL_CLASSES), 200)
    x[:50, h_col] = np.nan
    fitted = fit_cell_types(x, y)
    assert fitted.mean[h_col] == pytest.approx(float(np.nanmean(x[:, h_col])), abs=1e-5)
    assert np.isfinite(fitted.predict_proba(x)).all()


def test_strongly_stained_ki67_tumour_cells_stay_tumour() -> None:
    """Synthetic Ki-67 at 2.0 OD with look variety (seed 33): the positive tumour nuclei read
    ~1.15 OD haematoxylin leaked from the DAB, and were typed lymphocytes while their darkness
    was read as chromatin (0 of 35 positive tumour cells found, 68 immune cells for 35). With it
    left unread (``stained_nuclei``) counts are within 10 % of the truth."""
    p = SynthParams.preset(
        "ki67", width=640, height=640, mpp=0.5, seed=33, variety=1.0, intensity=2.0
    )
    r = render_region(p)
    v = r.truth.values
    t = score_image(r.rgb, "ki67", mpp=0.5, device="cpu").total()
    assert abs(t["tumor_cells"] - v.tumor_cells) <= 0.1 * v.tumor_cells, (t, v)
    assert abs(t["tumor_positive"] - v.tumor_positive) <= 0.1 * v.tumor_positive, (t, v)
    assert abs(t["immune_cells"] - v.immune_cells) <= 0.15 * v.immune_cells, (t, v)


@pytest.mark.parametrize(
    ("intensity", "variety"),
    [
        (1.6, 0.0),
        pytest.param(
            1.2,
            1.0,
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "strong p16 with dense DAB that partly unmixes as haematoxylin (look variety): "
                    "the whole brown cell reads as chromatin, so the haematoxylin outlines and "
                    "typing features see big dark cells (typed macrophage, neighbour context "
                    "skewed by extra detections between cells). 2026-11-24, seed 35: p16 71.7 % "
                    "against 84.9 %, immune 154 / 100; seeds 31-36 -13.2 to -2.2 points, and at "
                    "1.6 OD -24.4 to -5.8 with 2 of 6 positive regions called equivocal "
                    "(scripts/stain_strength_sweep.py, model card)"
                ),
            ),
        ),
    ],
    ids=["reference-look-1.6OD", "dense-DAB-look-1.2OD"],
)
def test_strongly_stained_p16_regions_keep_their_p16_percent(
    intensity: float, variety: float
) -> None:
    """p16 fills nucleus and cytoplasm, so strong staining darkens the whole tumour cell. A
    p16-positive region (85 % of tumour cells positive; 1024 px at 0.5 um/px, seed 35) stained
    at ``intensity`` OD reads its p16 % within 10 % (relative) of the truth and its immune cells
    within 15 %, and keeps its call. On the reference look this holds up to 1.6 OD; with dense
    DAB that leaks into the haematoxylin channel (``variety``) it does not yet (strict xfail:
    the day it passes, the xfail must go)."""
    sweep = _script("stain_strength_sweep")
    c = sweep.score_case(
        "p16_positive", seed=35, intensity=intensity, variety=variety, size_px=1024, mpp=0.5
    )
    assert c.call_found == c.call_true == "positive", c
    assert abs(c.readout_found - c.readout_true) <= 0.1 * c.readout_true, c
    assert abs(c.immune_found - c.immune_true) <= 0.15 * c.immune_true, c


@pytest.mark.parametrize(
    "variety",
    [
        0.0,
        pytest.param(
            1.0,
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "(2026-11-25) with look variety the per-slide DAB vector is estimated from the "
                    "colour of the dense positive cells, which carries their neutral share and the "
                    "cytoplasm counterstain (9 degrees from the reference here, 4.6 without "
                    "variety); unmixed with it, a 1+ cell's DAB reads ~15 % high and crosses the "
                    "0.4 OD cut: seed 33 p16 41.4 % against 15.1 % (15.0 % with the slide's true "
                    "vectors), seeds 31-36 -1.2 to +26.3 points; the call (equivocal) holds"
                ),
            ),
        ),
    ],
    ids=["reference-look", "dense-DAB-look"],
)
def test_weak_diffuse_p16_keeps_its_p16_percent(variety: float) -> None:
    """A p16 region stained diffusely but weakly (``p16_weak_diffuse``: 15 % of tumour cells
    positive at 0.78 OD, the rest 1+ just under the 0.4 OD cut; 1024 px, seed 33) reads its p16 %
    within 3 points and is called equivocal (diffuse but weak). Strict xfail with look variety:
    the day the stain estimate handles it, the xfail must go."""
    sweep = _script("stain_strength_sweep")
    c = sweep.score_case(
        "p16_weak_diffuse", seed=33, intensity=0.78, variety=variety, size_px=1024, mpp=0.5
    )
    assert c.call_found == c.call_true == "equivocal", c
    assert abs(c.readout_found - c.readout_true) <= 3.0, c


@pytest.mark.parametrize(
    ("intensity", "variety", "flagged"),
    [(1.6, 0.0, False), (1.2, 1.0, True), (1.6, 1.0, True)],
    ids=["reference-look-1.6OD", "dense-DAB-look-1.2OD", "dense-DAB-look-1.6OD"],
)
def test_p16_that_reads_low_under_dense_dab_is_flagged(
    intensity: float, variety: float, flagged: bool
) -> None:
    """Until strong p16 under dense DAB is typed right (the strict xfail above), the slide says
    so: its many immune-typed cells stained like positive tumour cells raise ``stained_immune``
    (p16.yaml: 15 %), and a slide read right carries no flag. Seed 35, 1024 px: at 1.2 OD with
    variety the p16 % reads low (2026-11-25: 71.7 % against 84.9 %), at 1.6 OD the call turns
    equivocal (60.5 %); the reference look reads 82.9 % at 1.6 OD. Over seeds 31-36 and the five
    p16 presets (``stain_strength_sweep.py``) the flag was on every wrong call and on no region
    of the reference look or at 0.78 OD."""
    sweep = _script("stain_strength_sweep")
    c = sweep.score_case(
        "p16_positive", seed=35, intensity=intensity, variety=variety, size_px=1024, mpp=0.5
    )
    assert ("stained_immune" in c.qc_flags) is flagged, c
    if flagged:
        assert c.readout_found < c.readout_true - 10.0, c
        assert (c.call_found == "equivocal") is (intensity == 1.6), c
    else:
        assert c.call_found == c.call_true == "positive", c


def test_stained_immune_flag_needs_share_and_cells() -> None:
    """``call_slide`` raises ``stained_immune`` at the marker's share of stained cells typed
    immune (p16: 15 % of those plus the positive tumour cells) and at least 20 such cells."""
    from pathology.calls import QC_FLAGS, STAINED_IMMUNE_MIN_CELLS, call_slide

    p16 = load_marker("p16")
    base = {"tumor_cells": 1000, "tumor_positive": 680, "tumor_bin0": 300, "tumor_bin3": 700}

    def flags(stained: int, marker: str = "p16") -> tuple[str, ...]:
        return call_slide({**base, "immune_stained": stained}, load_marker(marker)).qc_flags

    assert STAINED_IMMUNE_MIN_CELLS == 20 and "stained_immune" in QC_FLAGS
    assert flags(120) == ("stained_immune",)  # 120 / 800 = 15.0 %
    assert flags(119) == ()  # 14.9 %
    assert flags(0) == () and call_slide(base, p16).qc_flags == ()
    few = {"tumor_cells": 1000, "tumor_positive": 10, "immune_stained": 19}
    assert call_slide(few, p16).qc_flags == ()  # 66 % of too few cells
    assert call_slide({**few, "immune_stained": 20}, p16).qc_flags == ("stained_immune",)
    assert flags(500, "pdl1") == flags(500, "ki67") == ()  # not configured: never


def test_stain_strength_sweep_script(capsys: pytest.CaptureFixture[str]) -> None:
    """``scripts/stain_strength_sweep.py`` prints one summary line per strength and look, with
    the calls compared; bad lists are refused by argparse."""
    sweep = _script("stain_strength_sweep")
    args = ["--preset", "p16_positive", "--intensity", "0.78", "--variety", "0"]
    assert sweep.main([*args, "--seeds", "31", "--size", "512"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    assert out[0].startswith("p16_positive DAB 0.78 OD, variety 0: tumour found/true "), out
    assert out[0].endswith("calls wrong 0 of 1, flagged stained_immune 0 (of the wrong calls 0)"), (
        out
    )
    assert sweep.main([*args, "--seeds", "31", "--size", "512", "--per-seed"]) == 0
    per_seed = capsys.readouterr().out
    # 512 px holds 63 tumour cells: not evaluable on either side, and flagged so.
    assert per_seed.rstrip().endswith(
        ", seed 31: tumour 63/63, immune 23/23, readout 85.7/85.7 %, call "
        "not_evaluable/not_evaluable, QC flags few_tumor_cells"
    ), per_seed
    with pytest.raises(SystemExit):
        sweep.main(["--intensity", "strong"])
    assert "expected comma-separated numbers, got 'strong'" in capsys.readouterr().err
    assert sweep.main(["--preset", "p16_bogus", "--seeds", "31"]) == 2
    assert "unknown synth preset 'p16_bogus'" in capsys.readouterr().err


# -- device ----------------------------------------------------------------------------------
def test_device_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_out_of_memory_halves_the_batch() -> None:
    seen: list[tuple[int, int]] = []

    def fn(i: int, j: int) -> int:
        if j - i > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append((i, j))
        return j - i

    assert sum(run_halving(fn, 0, 40, 32)) == 40
    assert seen == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]

    def other(i: int, j: int) -> int:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_halving(other, 0, 4, 4)


def test_gil_switch_interval_is_set_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pathology.scoring._device import default_batch_size, gil_switch_interval

    before = sys.getswitchinterval()
    with gil_switch_interval():
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    monkeypatch.setenv("PATHOLOGY_GPU_SWITCH_INTERVAL", "0")  # the A/B switch: leave it alone
    with gil_switch_interval():
        assert sys.getswitchinterval() == before
    assert sys.getswitchinterval() == before
    assert (default_batch_size("cpu"), default_batch_size(torch.device("cuda", 0))) == (64, 1024)


@pytest.mark.gpu
def test_cpu_and_cuda_agree() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA path is untested on this machine")
    p = SynthParams.preset("pdl1_cps_ge20", width=1024, height=1024, mpp=0.5, seed=3)
    r = render_region(p)
    cpu = score_image(r.rgb, "pdl1", mpp=0.5, device="cpu").counts.sum(0)
    gpu = score_image(r.rgb, "pdl1", mpp=0.5, device="cuda").counts.sum(0)
    assert np.all(np.abs(cpu - gpu) <= np.maximum(1, 0.005 * cpu))


# -- API -------------------------------------------------------------------------------------
def test_score_tiles_layouts_blank_tiles_and_errors() -> None:
    p = SynthParams.preset("ki67", width=512, height=512, mpp=0.5, seed=5)
    r = render_region(p)
    tiles = np.stack([r.rgb[:256, :256], r.rgb[256:, 256:], np.full((256, 256, 3), 255, np.uint8)])
    nhwc = score_tiles(tiles, "ki67", mpp=0.5, device="cpu")
    nchw = score_tiles(tiles.transpose(0, 3, 1, 2).copy(), "ki67", mpp=0.5, device="cpu")
    assert nhwc.counts.shape == (3, len(nhwc.count_names))
    np.testing.assert_array_equal(nhwc.counts, nchw.counts)
    # Batches of one tile scored two at a time in threads: the same records, in the same order.
    scorer = load_model("ki67", 0.5, device="cpu")
    serial = run_model(scorer, tiles, batch_size=1)
    threaded = run_model(scorer, tiles, batch_size=1, workers=2)
    assert serial.counts[0, 0] > 5
    np.testing.assert_array_equal(threaded.counts, serial.counts)
    for name, values in serial.cells.items():
        np.testing.assert_array_equal(threaded.cells[name], values, err_msg=name)
    assert nhwc.counts[2].sum() == 0  # glass has no cells
    assert nhwc.counts[0, 0] > 5 and nhwc.device == "cpu" and nhwc.model == "physics-v1"
    k = len(nhwc.cells["x"])
    assert all(len(v) == k for v in nhwc.cells.values())
    assert set(np.unique(nhwc.cells["tile"])) <= {0, 1}
    assert ((nhwc.cells["x"] >= -0.5) & (nhwc.cells["x"] < 256)).all()
    with pytest.raises(ValueError, match="uint8"):
        score_tiles(tiles.astype(np.float32), "ki67", mpp=0.5, device="cpu")
    # A batch of glass only: no detections at all, still one row of zero counts per tile.
    glass = score_tiles(tiles[2:].repeat(2, 0), "ki67", mpp=0.5, device="cpu")
    assert glass.counts.shape == (2, len(glass.count_names)) and glass.counts.sum() == 0
    assert all(len(v) == 0 for v in glass.cells.values())


def test_shipped_cell_types_still_fit_the_engine() -> None:
    """The shipped classifier was fitted on features of an earlier engine; a change upstream of
    the features (stains, detection, outline) can silently move them. On the first held-out seed
    of ``scripts/fit_cell_types.py`` (900: every preset and scale, look variety cycled) it must
    type cells about as its model card says (2026-11-24: accuracy 0.945; recall tumour 0.985,
    lymphocyte 0.949, macrophage 0.783, fibroblast 0.943). When this fails after an engine change,
    refit (``scripts/fit_cell_types.py``) and check the real-data tests, or record why not."""
    from pathology.scoring import CELL_CLASSES, load_cell_types, model_dir
    from pathology.scoring._fit import synthetic_training_cells, type_confusion

    model = load_cell_types(model_dir() / "cell_types.json")
    x, y = synthetic_training_cells(range(900, 901), 1024, (1.0, 0.75, 0.6, 0.5), variety=1.0)
    cm = type_confusion(model, x, y)
    assert cm.sum() > 8000
    recall = dict(zip(CELL_CLASSES, np.diag(cm) / cm.sum(1), strict=True))
    # Floors ~1 point under today's figures: 8 rays instead of 16 fail (fibroblast 0.922), an
    # outline threshold 40 % of the way instead of half fails (0.936; macrophage 0.651).
    assert np.trace(cm) / cm.sum() >= 0.94, cm
    floors = {"tumor": 0.975, "lymphocyte": 0.935, "macrophage": 0.76, "fibroblast": 0.93}
    for name, floor in floors.items():
        assert recall[name] >= floor, (name, recall, cm)


def test_fit_cell_types_script_writes_a_loadable_model(tmp_path) -> None:
    """The refit script end to end on a tiny synthetic set: it writes a classifier that loads,
    with its provenance and held-out accuracy, and refuses bad options with a clear message."""
    import importlib.util
    from pathlib import Path

    from pathology.scoring import load_cell_types

    path = Path(__file__).resolve().parents[1] / "scripts" / "fit_cell_types.py"
    spec = importlib.util.spec_from_file_location("fit_cell_types_script", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cell_types.json"
    argv = ["--out", str(out), "--train-seeds", "1", "--test-seeds", "1", "--size", "384"]
    assert script.main([*argv, "--scales", "1.0"]) == 0
    model = load_cell_types(out)
    assert model.meta["held_out"] == "seeds 900-900, each scale"
    assert 0.5 < model.meta["held_out_accuracy"] <= 1.0
    assert set(model.meta["held_out_accuracy_by_scale"]) == {"1.0"}
    with pytest.raises(SystemExit):
        script.main([*argv, "--scales", "0.1"])


def test_cell_type_model_refit_and_load(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (len(CELL_CLASSES), len(FEATURES)))
    y = np.repeat(np.arange(len(CELL_CLASSES)), 200)
    x = centres[y] + rng.normal(0, 0.5, (len(y), len(FEATURES)))
    model = fit_cell_types(x, y, meta={"fitted_on": "toy"})
    assert model.meta["training_accuracy"] > 0.98
    path = model.save(tmp_path / "cell_types.json")
    again = load_cell_types(path)
    np.testing.assert_allclose(again.predict_proba(x), model.predict_proba(x), atol=1e-4)
    (tmp_path / "bad.json").write_text('{"classes": ["a"]}')
    with pytest.raises(ConfigError, match=r"bad\.json: not a valid cell-type model"):
        load_cell_types(tmp_path / "bad.json")


def test_cell_type_model_with_a_hidden_layer(tmp_path) -> None:
    """A refit with a hidden tanh layer separates classes no linear rule can (a ring around a
    core), round-trips through JSON, and the scorer's torch path types cells as NumPy does."""

    from pathology.scoring._model import CellScorer

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2000, len(FEATURES)))
    ring = np.hypot(x[:, 0], x[:, 1])
    y = np.where(ring < 1.1, 0, 1)  # tumour inside, lymphocyte around: not linearly separable
    linear = fit_cell_types(x, y)
    hidden = fit_cell_types(x, y, hidden=8, seed=3)
    assert linear.hidden == 0 and hidden.hidden == 8 and hidden.meta["hidden_units"] == 8
    assert linear.meta["training_accuracy"] < 0.75
    assert hidden.meta["training_accuracy"] > 0.95
    again = load_cell_types(hidden.save(tmp_path / "cell_types.json"))
    assert again.hidden == 8
    np.testing.assert_allclose(again.predict_proba(x), hidden.predict_proba(x), atol=1e-4)
    refit = fit_cell_types(x, y, hidden=8, seed=3)  # same rows and seed: the same model
    np.testing.assert_array_equal(refit.hidden_weights, hidden.hidden_weights)
    scorer = CellScorer(load_marker("ki67"), 0.5, again)
    with torch.inference_mode():
        cls, prob = scorer.classify(torch.tensor(x, dtype=torch.float32))
    p = again.predict_proba(x)
    np.testing.assert_array_equal(cls.numpy(), p.argmax(1))
    np.testing.assert_allclose(prob.numpy(), p.max(1), atol=1e-5)
    raw = json.loads((tmp_path / "cell_types.json").read_text())
    raw["hidden_bias"] = raw["hidden_bias"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"short\.json: .*hidden_weights must be \(H, 9\)"):
        load_cell_types(tmp_path / "short.json")
    del raw["hidden_bias"]
    (tmp_path / "half.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"half\.json: .*come together"):
        load_cell_types(tmp_path / "half.json")


def test_training_cells_measure_annotated_cells_as_scoring_does() -> None:
    """The refit path: annotated cells become feature rows with their type, unmixed with the
    stains estimated from the image (what scoring uses) unless told otherwise."""
    from pathology.scoring import training_cells
    from pathology.scoring._celltype import FEATURES, LYMPHOCYTE, MACROPHAGE, NONE, TUMOR

    p = SynthParams.preset("pdl1_cps_ge20", width=768, height=768, mpp=0.5, seed=3)
    r = render_region(p)
    xy = np.array([(c.x, c.y) for c in r.truth.cells], np.float64)
    types = [c.type for c in r.truth.cells]
    tc = training_cells(r.rgb, xy, types, mpp=0.5, marker="pdl1")
    assert tc.features.shape == (len(tc.labels), len(FEATURES))
    assert tc.n_annotated == len(xy) and tc.n_matched >= 0.9 * len(xy)
    counts = np.bincount(tc.labels, minlength=NONE + 1)
    assert counts[TUMOR] > 100 and counts[LYMPHOCYTE] > 20 and counts[MACROPHAGE] > 0
    ref = training_cells(r.rgb, xy, types, mpp=0.5, marker="pdl1", stains="reference")
    assert not np.allclose(
        ref.features[:, FEATURES.index("h_nucleus")].mean(),
        tc.features[:, FEATURES.index("h_nucleus")].mean(),
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="stains must be 'estimate', 'reference'"):
        training_cells(r.rgb, xy, types, mpp=0.5, marker="pdl1", stains="guess")


# -- accuracy against synthetic truth --------------------------------------------------------
# (preset, seed, overrides): several seeds, stain vectors, intensities and one 40x scan.
ACCURACY_CASES = [
    ("p16_positive", 1, {}),
    ("p16_equivocal", 2, {}),
    ("p16_negative", 3, {}),
    ("p16_positive", 4, {"stain_vectors": SHIFTED, "stain_jitter": 0.0}),
    ("p16_positive", 5, {"intensity": "moderate"}),
    ("pdl1_cps_ge20", 1, {}),
    ("pdl1_cps_1_19", 2, {}),
    ("pdl1_cps_ge20", 6, {"stain_vectors": SHIFTED, "stain_jitter": 0.0}),
    ("pdl1_cps_ge20", 7, {"intensity": "moderate"}),
    ("ki67", 1, {}),
    ("ki67", 8, {"intensity": "weak"}),
    ("ki67", 9, {"mpp": 0.25}),
]


# Cases also scored after the JPEG round trip every slide goes through (q90, YCbCr 4:2:0, encoded
# as the synthetic SVS writer and scanners do): chroma at half resolution smears DAB one pixel
# across cell borders, which membrane scoring must survive.
JPEG_CASES = {
    ("p16_positive", 1),
    ("pdl1_cps_ge20", 1),
    ("pdl1_cps_1_19", 2),
    ("pdl1_cps_ge20", 6),
    ("pdl1_cps_ge20", 7),
    ("ki67", 1),
}
#: JPEG cases expected to fail, with the reason (strict xfails). Empty since the 2026-11-24
#: refit with look variety: ``pdl1_cps_1_19`` seed 2 read 114 of 136 immune cells after JPEG.
JPEG_XFAIL: dict[tuple[str, int], str] = {}


def _accuracy_params() -> list[object]:
    params: list[object] = []
    for preset, seed, over in ACCURACY_CASES:
        params.append(pytest.param(preset, seed, over, False, id=f"{preset}-{seed}-raw"))
        if (preset, seed) in JPEG_CASES:
            reason = JPEG_XFAIL.get((preset, seed))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(
                pytest.param(preset, seed, over, True, id=f"{preset}-{seed}-jpeg", marks=marks)
            )
    return params


@functools.lru_cache(maxsize=1)
def _accuracy_render(preset: str, seed: int, over: tuple[tuple[str, object], ...]) -> object:
    """One render shared by a case's raw and JPEG variants (they run one after the other)."""
    kw: dict = {"width": 1280, "height": 1280, "mpp": 0.5, "seed": seed, **dict(over)}
    if kw["mpp"] == 0.25:
        kw["width"] = kw["height"] = 2560
    p = SynthParams.preset(preset, **kw)
    return p, render_region(p)


@pytest.mark.parametrize(("preset", "seed", "over", "jpeg"), _accuracy_params())
def test_accuracy_against_synthetic_truth(preset: str, seed: int, over: dict, jpeg: bool) -> None:
    p, r = _accuracy_render(preset, seed, tuple(sorted(over.items())))
    v = r.truth.values
    rgb = jpeg_round_trip(r.rgb) if jpeg else r.rgb
    t = score_image(rgb, p.marker, mpp=p.mpp, device="cpu").total()
    nt, tp = t["tumor_cells"], t["tumor_positive"]
    assert abs(nt - v.tumor_cells) <= 0.10 * v.tumor_cells
    assert abs(t["immune_cells"] - v.immune_cells) <= 0.10 * v.immune_cells
    assert abs(100 * tp / nt - 100 * v.tumor_positive / v.tumor_cells) <= 3.0
    if p.marker == "p16":
        assert abs(100 * tp / nt - v.p16_positive_pct) <= 0.10 * v.p16_positive_pct
    if p.marker == "pdl1":
        cps = min(100.0, 100 * (tp + t["immune_positive"]) / nt)
        assert abs(cps - v.cps) <= 0.10 * v.cps


@pytest.mark.xfail(
    strict=True,
    reason="(2026-11-24) the linear cell-type regression types pale lymphocytes in lymphoid "
    "clusters tumour: here immune 133 of 154 counted, 10 % allowed, tumour 415 / 394 (128 and "
    "423 before DAB-masked darkness was left unread; 15 of 132 lymphocytes typed tumour); over "
    "seeds 31-36 of "
    "four presets 247 of 2,908 lymphocytes and 148 of 511 macrophages. A 16-unit hidden layer "
    "fixed this (54 and 55; here 396 / 394 tumour, 150 / 154 immune) but dropped real BCData "
    "nuclei as `none` (model card)",
)
def test_immune_cells_are_counted_on_a_slide_with_look_variety() -> None:
    """Synthetic Ki-67 region with every look variety on (pale and dark nuclei side by side,
    counterstained cytoplasm, dense DAB leaking into haematoxylin): tumour and immune cell
    counts within 10 % of the truth, as on the reference look."""
    p = SynthParams.preset("ki67", width=1280, height=1280, mpp=0.5, seed=33, variety=1.0)
    r = render_region(p)
    v = r.truth.values
    t = score_image(r.rgb, "ki67", mpp=0.5, device="cpu").total()
    assert abs(t["tumor_cells"] - v.tumor_cells) <= 0.10 * v.tumor_cells
    assert abs(t["immune_cells"] - v.immune_cells) <= 0.10 * v.immune_cells


def test_cytoplasmic_only_pdl1_tumour_cells_are_negative() -> None:
    """22C3: a tumour cell with brown cytoplasm and an unstained membrane is PD-L1 negative. On
    three CPS < 1 regions (seeds from the 2026-11-24 sweep, where CPS read 1.1-1.5 and 7 of 30
    such cells were called positive on 4 of 16 membrane rays) the matched cytoplasmic-only cells
    stay negative and every region reads CPS < 1, as its truth."""
    from pathology.groundtruth import match_cells

    decoys = called = 0
    for seed in (21, 22, 25):
        p = SynthParams.preset("pdl1_cps_lt1", width=1280, height=1280, mpp=0.5, seed=seed)
        r = render_region(p)
        res = score_image(r.rgb, "pdl1", mpp=0.5, device="cpu")
        t, c = res.total(), res.cells
        assert r.truth.values.cps < 1
        assert 100 * (t["tumor_positive"] + t["immune_positive"]) / t["tumor_cells"] < 1, seed
        truth = r.truth.cells
        m = match_cells(np.stack([c["x"], c["y"]], 1), np.array([(q.x, q.y) for q in truth]), 6.0)
        cyto_only = {
            j
            for j, q in enumerate(truth)
            if q.type == "tumor" and not q.positive and q.cytoplasm_dab >= 0.28
        }
        hits = [bool(c["positive"][i]) for i, j in m.pairs if j in cyto_only]
        decoys += len(hits)
        called += sum(hits)
    assert decoys >= 25 and called <= 2, (decoys, called)


# -- real Ki-67 with ground truth (DeepLIIF, non-commercial: referenced from ../shared) ------------
DEEPLIIF = "deepliif-ki67-samples"


def _deepliif_cases() -> list[tuple[str, np.ndarray, object]]:
    from PIL import Image

    from pathology.groundtruth import deepliif_panel, load_deepliif_mask

    lung = shared_file(f"{DEEPLIIF}/val/Lung1.png")
    cases = [("Lung1", deepliif_panel(lung, 0), load_deepliif_mask(lung))]
    for n in ("22_2", "34_3", "6_2"):
        img = np.asarray(Image.open(shared_file(f"{DEEPLIIF}/test_cli/{n}.png")).convert("RGB"))
        cases.append(
            (n, img, load_deepliif_mask(shared_file(f"{DEEPLIIF}/test_groundtruth/{n}.png")))
        )
    return cases


@functools.lru_cache(maxsize=1)
def _deepliif_scored() -> list[tuple[str, dict[str, np.ndarray], object]]:
    """(name, cells of ``score_image`` at 0.25 um/px for Ki-67, truth) per DeepLIIF case, scored
    once for the tests that read them."""
    return [
        (name, score_image(img, "ki67", mpp=0.25, device="cpu").cells, gt)
        for name, img, gt in _deepliif_cases()
    ]


def _script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the file runs
    spec.loader.exec_module(script)
    return script


def _ki67_review_script() -> Any:
    return _script("inspect_ki67_truth")


def test_ki67_truth_review_sorts_every_difference() -> None:
    """``scripts/inspect_ki67_truth.py`` explains a tile's point-5 figures: every truth nucleus is
    matched or missed for one named reason, every counted cell matched or extra for one, on a
    constructed 100 x 100 px tile (match radius 5 px, border 3 px)."""
    from pathology.groundtruth import MaskCells

    script = _ki67_review_script()
    truth = MaskCells(
        centroid_xy=np.array(
            [
                [20.0, 20.0],  # matched by a counted tumour cell
                [50.0, 99.0],  # a sliver on the bottom edge, nothing found
                [80.0, 20.0],  # found, typed none
                [20.0, 80.0],  # found, typed other (not counted on BCData)
                [50.0, 50.0],  # matched
                [50.0, 55.0],  # merged: its only counted cell within 5 px is matched to the above
                [80.0, 80.0],  # nothing near
            ]
        ),
        area_px=np.full(7, 100, np.int64),
        positive=np.array([True, False, False, False, False, False, False]),
    )
    xy = np.array(
        [
            [20.5, 20.0],  # tumour, positive -> matches nucleus 0
            [80.0, 21.0],  # none
            [20.0, 81.0],  # other
            [50.0, 51.0],  # lymphocyte -> matches nucleus 4
            [23.0, 22.0],  # tumour, positive: a second detection of nucleus 0
            [5.0, 50.0],  # macrophage, negative, on unlabelled tissue
        ]
    )
    cls = np.array([0, 4, 3, 1, 0, 2])
    dab = np.array([0.5, 0.0, 0.0, 0.1, 0.6, 0.05], np.float32)
    why, items = script.explain("22_2", (100, 100), truth, xy, cls, dab, 5.0, 3.0)
    assert why == {
        "truth": 7,
        "counted": 4,
        "matched": 2,
        "missed_border": 1,
        "missed_typed_none": 1,
        "missed_typed_other": 1,
        "missed_merged": 1,
        "missed_undetected": 1,
        "extra_second_detection_pos": 1,
        "extra_second_detection_neg": 0,
        "extra_unlabelled_pos": 0,
        "extra_unlabelled_neg": 1,
    }
    # The same differences one by one (the review sheet's rows): where, the label, and the
    # nearest detection's type and nucleus DAB ("-" when nothing is within reach).
    assert [(d.kind, d.x, d.y, d.truth, d.cell_type) for d in items] == [
        ("missed_border", 50.0, 99.0, "negative", "-"),
        ("missed_typed_none", 80.0, 20.0, "negative", "N"),
        ("missed_typed_other", 20.0, 80.0, "negative", "F"),
        ("missed_merged", 50.0, 55.0, "negative", "L"),
        ("missed_undetected", 80.0, 80.0, "negative", "-"),
        ("extra_second_detection_pos", 23.0, 22.0, "unlabelled", "T"),
        ("extra_unlabelled_neg", 5.0, 50.0, "unlabelled", "M"),
    ]
    assert items[5].nucleus_dab == pytest.approx(0.6) and np.isnan(items[0].nucleus_dab)
    # Lung1's mask outlines every nucleus: cells typed other are counted there.
    lung, _ = script.explain("Lung1", (100, 100), truth, xy, cls, dab, 5.0, 3.0)
    assert (lung["counted"], lung["matched"], lung["missed_typed_other"]) == (5, 3, 0)


@pytest.mark.realdata
def test_ki67_truth_review_runs_on_the_deepliif_tiles(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The review script on the shared DeepLIIF tiles: its point-5 lines count what
    ``test_deepliif_ki67_targets`` counts, and its reasons add up to the truth and the counted
    cells. 22_2's misses include truth nuclei cut by the bottom and left edges (2026-11-24: 10 of
    36; 10 typed ``none``, 4 merged, 11 undetected). With ``--out`` it writes an overlay and a
    review sheet per image and one CSV row per difference, for a pathologist's verdict."""
    import csv

    from PIL import Image

    script = _ki67_review_script()
    assert script.main(["--data", str(shared_file(DEEPLIIF)), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("overlays, review sheets and differences.csv written to")
    lines = lines[:-1]
    figures = {}
    for head, detail in zip(lines[::2], lines[1::2], strict=True):
        name = head.split(":")[0]
        figures[name] = {k: int(v) for k, v in (kv.split() for kv in detail.strip().split(", "))}
    scored = {name: c for name, c, _ in _deepliif_scored()}
    assert list(figures) == ["Lung1", "22_2", "34_3", "6_2"]
    for name, f in figures.items():
        c = scored[name]
        counted = np.ones(len(c["x"]), bool) if name == "Lung1" else c["type"] != 3
        assert f["counted"] == int(counted.sum()), name
        missed = sum(v for k, v in f.items() if k.startswith("missed_"))
        extra = sum(v for k, v in f.items() if k.startswith("extra_"))
        assert f["matched"] + missed == f["truth"] and f["matched"] + extra == f["counted"], f
    assert figures["22_2"]["missed_border"] >= 8, figures["22_2"]
    with (tmp_path / "differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    for name, f in figures.items():
        mine = [r for r in rows if r["image"] == name]
        assert [int(r["id"]) for r in mine] == list(range(1, len(mine) + 1))
        for kind, n in f.items():
            if kind.startswith(("missed_", "extra_")):
                assert sum(r["kind"] == kind for r in mine) == n, (name, kind)
        assert all(r["verdict"] == "" for r in mine)
        with Image.open(tmp_path / f"{name}-review.png") as sheet:  # 6 crops of 192 px a row
            assert sheet.width == 6 * 196 and sheet.height == -(-len(mine) // 6) * 210
        with Image.open(tmp_path / f"{name}.png") as ov:
            assert ov.size == (1024, 1024)


def test_compare_scans_recovers_a_tone_curve_and_a_shift() -> None:
    """``scripts/compare_scans.py`` on a synthetic Ki-67 region and a second "scan" of it: the
    same field at 0.6 instead of 0.5 um/px, moved by a few pixels and stored with every OD halved
    (``I = glass (I / glass)^0.5``, a different tone curve). It finds the field and reads the OD
    scale 0.5 in every channel and bin. Scored, the two agree on the cells and the Ki-67 index
    (any intensity counts) but the halved DAB takes the strong (0.78 OD) positives out of 3+ and
    halves the H-score: intensity cuts are cuts on the scanner's OD."""
    from skimage.transform import resize

    script = _script("compare_scans")
    params = SynthParams.preset("ki67", width=960, height=960, mpp=0.5, seed=41, intensity="strong")
    a = render_region(params).rgb
    f = a.astype(np.float64)
    glass = np.quantile(f.reshape(-1, 3), 0.99, axis=0)
    b = glass * (np.clip(f, 1, None) / glass) ** 0.5
    b = resize(b[6:, 12:], (795, 790, 3), preserve_range=True)  # (954, 948) x 5 / 6
    b = np.clip(b, 0, 255).round().astype(np.uint8)
    cmp = script.compare(a, 0.5, b, 0.6, marker="ki67")
    reg = cmp.registration
    # On B's grid A's field sits 6 / 1.2 and 12 / 1.2 px further along: moved back by that.
    assert reg.shift_px == (pytest.approx(-5.0, abs=0.2), pytest.approx(-10.0, abs=0.2))
    assert reg.correlation > 0.95
    assert cmp.od_scale == pytest.approx(0.5, abs=0.03)
    usable = [b_ for b_ in cmp.bins if b_.lo >= 0.15]
    assert len({b_.channel for b_ in usable}) == 3 and len(usable) >= 6
    assert all(b_.ratio == pytest.approx(0.5, abs=0.06) for b_ in usable), usable
    ra, rb = cmp.readouts
    # Measured: 230 / 229 tumour cells, 35.2 / 34.9 % positive, 3+ 29.6 / 0.0 %, H-score 100 / 48.
    assert ra.mpp == 0.5 and rb.mpp == 0.6
    assert ra.tumor_cells >= 200 and abs(ra.tumor_cells - rb.tumor_cells) <= 10, (ra, rb)
    assert ra.positive_pct is not None and rb.positive_pct is not None
    assert abs(ra.positive_pct - rb.positive_pct) <= 2, (ra, rb)
    assert ra.bin_pct[3] > 20 and rb.bin_pct[3] < 2, (ra, rb)
    assert ra.h_score is not None and rb.h_score is not None
    assert rb.h_score < 0.6 * ra.h_score, (ra, rb)


@pytest.mark.realdata
def test_compare_scans_on_the_two_os2_scans(capsys: pytest.CaptureFixture[str]) -> None:
    """The same Ki-67 glass scanned by Hamamatsu and Olympus (``../shared``): the script finds the
    field and reads the Olympus file's OD as 0.47 x the Hamamatsu one at every OD level and in
    every channel (measured 2026-11-24: 0.40-0.56 per bin, one scale 0.47), a tone-curve
    difference of about 1 / 2.1. The readouts differ accordingly (see
    ``test_real_ki67_scan_intensity_agreement`` in ``tests/test_batch.py``)."""
    script = _script("compare_scans")
    os2 = "openslide-os2-ki67-crops"
    ndpi, vsi = shared_file(f"{os2}/OS-2-ndpi.ome.tif"), shared_file(f"{os2}/OS-2-vsi.ome.tif")
    assert script.main([str(ndpi), str(vsi)]) == 0
    out = capsys.readouterr().out
    assert "correlation 0.9" in out, out
    scale = float(out.split("all channels): B = ")[1].split(" x")[0])
    assert 0.40 <= scale <= 0.50, out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("OS-2-")]
    assert [r[0] for r in rows] == ["OS-2-ndpi.ome.tif", "OS-2-vsi.ome.tif"]
    h_ndpi, h_vsi = float(rows[0][-1]), float(rows[1][-1])
    assert h_ndpi - h_vsi > 15, rows


def test_compare_scans_refuses_a_whole_slide_and_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script("compare_scans")
    missing = tmp_path / "nope.svs"
    assert script.main([str(missing), str(missing)]) == 2
    assert "nope.svs" in capsys.readouterr().err
    big = tmp_path / "big.tif"
    import tifffile

    tifffile.imwrite(
        big,
        np.full((64, 12_001, 3), 230, np.uint8),
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    assert script.main([str(big), str(big)]) == 2
    err = capsys.readouterr().err
    assert "big.tif" in err and "too large to read whole" in err, err


@pytest.mark.realdata
@pytest.mark.xfail(
    strict=True,
    reason="(cells / GT, positive % / GT at 0.25 um/px, 2026-11-24, Ki-67 nuclei outlined on "
    "the larger of haematoxylin and DAB, DAB closed for detection, darkness of DAB-masked nuclei "
    "unread, second detections of a nucleus dropped) Lung1 62/61, 19.4/18.0 (met); BCData "
    "tumour + immune cells 22_2 109/137 (110 needed), 10.1/7.3 (% met); 34_3 112/100 (count "
    "met), 32.1/21.0; 6_2 54/46, 48.1/47.8 (met). 22_2's 36 misses: 10 nuclei cut by the image "
    "edge (a sliver whose centre is outside), 10 pale ones typed none, 4 merged in crowded "
    "nests, 11 not found; 34_3: 15 brown nuclei the annotators left unlabelled are counted "
    "positive (21.6 % without them; per nucleus, labelled and detected ones agree: "
    "test_deepliif_positivity_of_matched_nuclei). scripts/inspect_ki67_truth.py sorts them",
)
def test_deepliif_ki67_targets() -> None:
    # What the masks count, and so what is compared with them:
    # - Lung1's mask (DeepLIIF's own co-registered mpIF truth) outlines every nucleus, stroma
    #   included: every cell the scorer keeps (all types but `none`) is counted.
    # - The BCData tiles (22_2, 34_3, 6_2) label tumour nuclei only (BCData annotated positive and
    #   negative tumour cells); 6_2's spindle stromal nuclei carry no label. Counted: cells typed
    #   tumour, lymphocyte or macrophage (the `tumor_cells + immune_cells` of the slide table, as
    #   in the OS-2 test), i.e. all kept cells but those typed `other` (spindle / fibroblast).
    #   Not `tumor_cells` alone: on these tiles many brown tumour nuclei are typed lymphocyte
    #   (22_2: 92 tumour, 8 lymphocyte, 8 macrophage, all tumour by eye), so that would measure
    #   the tumour / immune split, not the detection and positivity the targets are about.
    # Positive: nucleus DAB >= 0.2 OD (the Ki-67 cut), over the same cells.
    for name, c, gt in _deepliif_scored():
        other = 3  # cell type codes: 0 tumour, 1 lymphocyte, 2 macrophage, 3 other
        counted = np.ones(len(c["x"]), bool) if name == "Lung1" else c["type"] != other
        n = int(counted.sum())
        pos = 100 * float(np.mean(c["nucleus_dab"][counted] >= 0.2)) if n else 0.0
        assert abs(n - gt.n_cells) <= 0.2 * gt.n_cells, (name, n, gt.n_cells)
        assert abs(pos - gt.percent_positive) <= 5.0, (name, pos, gt.percent_positive)


@pytest.mark.realdata
def test_bcdata_tumour_nuclei_are_typed_tumour() -> None:
    """BCData labels tumour nuclei only (positive and negative), so every labelled nucleus the
    scorer detects should be typed tumour: >= 80 % of those matched within 4 um, pooled over
    the three tiles, and >= 80 % of the labelled Ki-67-positive ones (the Ki-67 index divides
    the positive tumour cells by the tumour cells). This is the check on real tissue that the
    cell typing (fitted on synthetic cells) transfers; PD-L1's CPS and TPS divide by the tumour
    cells it finds too.

    2026-11-24: 189 of 227 (83 %; 12 lymphocyte, 18 macrophage, 8 other), positives 45 of 52
    (194 of 230 before second detections of a nucleus were dropped).
    Before Ki-67 outlines were traced on the larger of haematoxylin and DAB and the darkness of
    DAB-masked nuclei was left unread (``stained_nuclei``): 173 of 230, positives 26 of 52 (6_2:
    6 of 22, 14 typed lymphocyte); before Ki-67 nuclei were outlined on haematoxylin + DAB: 158
    of 229 (a brown nucleus's outline shrank to a sliver)."""
    from pathology.groundtruth import match_cells

    typed = np.zeros(4, np.int64)
    positives = np.zeros(4, np.int64)
    for name, c, gt in _deepliif_scored()[1:]:
        m = match_cells(np.stack([c["x"], c["y"]], 1), gt.centroid_xy, 4.0 / 0.25)
        assert m.tp >= 0.6 * gt.n_cells, (name, m.tp, gt.n_cells)
        types = c["type"][m.pairs[:, 0]]
        typed += np.bincount(types, minlength=4)
        positives += np.bincount(types[np.asarray(gt.positive)[m.pairs[:, 1]]], minlength=4)
    what = "types (tumour, lymphocyte, macrophage, other)"
    assert typed[0] >= 0.8 * typed.sum(), f"{what}: {typed}"
    assert positives[0] >= 0.8 * positives.sum(), f"{what} of labelled positives: {positives}"


@pytest.mark.realdata
def test_deepliif_positivity_of_matched_nuclei() -> None:
    """Per nucleus, the Ki-67 call (nucleus DAB >= 0.2 OD) against the labels, on every labelled
    nucleus the scorer detects (matched within 4 um, any type), pooled over Lung1 and the three
    BCData tiles. This separates the stain measurement from detection and labelling scope: the
    tile-level positive % of ``test_deepliif_ki67_targets`` misses on 34_3 and 6_2 because of
    detected nuclei that carry no label, while the nuclei both sides found are called alike
    (2026-11-24: 60 of 63 labelled positives called positive, 212 of 218 negatives negative)."""
    from pathology.groundtruth import match_cells

    table = np.zeros((2, 2), np.int64)  # rows: label positive, negative; columns: called +, -
    for name, c, gt in _deepliif_scored():
        m = match_cells(np.stack([c["x"], c["y"]], 1), gt.centroid_xy, 4.0 / 0.25)
        assert m.tp >= 0.6 * gt.n_cells, (name, m.tp, gt.n_cells)
        # The tumour cut of ki67.yaml, read on every type (``positive`` is set on tumour cells only).
        called = c["nucleus_dab"][m.pairs[:, 0]] >= 0.2
        label = np.asarray(gt.positive)[m.pairs[:, 1]]
        table += np.array(
            [
                [np.sum(label & called), np.sum(label & ~called)],
                [np.sum(~label & called), np.sum(~label & ~called)],
            ]
        )
    sensitivity = table[0, 0] / table[0].sum()
    specificity = table[1, 1] / table[1].sum()
    assert table[0].sum() >= 50 and table[1].sum() >= 150, table
    assert sensitivity >= 0.90, table
    assert specificity >= 0.95, table


def test_host_allocator_tuning_is_opt_out(monkeypatch) -> None:
    import pathology.scoring._device as d

    monkeypatch.setattr(d, "_allocator_tuned", False)
    monkeypatch.setenv("PATHOLOGY_MALLOC_TUNE", "0")
    assert d.tune_host_allocator() is False
    monkeypatch.delenv("PATHOLOGY_MALLOC_TUNE")
    import sys

    expected = sys.platform.startswith("linux") and _has_glibc()
    assert d.tune_host_allocator() is expected
    # A CPU model load applies it (idempotent).
    from pathology.scoring import load_model

    load_model("ki67", 0.5, device="cpu")
    assert d._allocator_tuned is expected


def _has_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
