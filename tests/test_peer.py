"""The classical per-tile peer pipeline: accuracy on a synthetic region, DAB units, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from pathology.groundtruth import match_cells
from pathology.peer import (
    SKIMAGE_HED_TO_OD,
    PeerTileResult,
    classical_score_tile,
    classical_score_tiles,
)
from pathology.stain import H_DAB, od_to_rgb
from pathology.synth import RegionRender, SynthParams, render_region

MPP = 0.5


@pytest.fixture(scope="module")
def ki67_region() -> RegionRender:
    """512 x 512 px Ki-67 region at 0.5 um/px: 106 cells (tumour, immune, fibroblasts)."""
    return render_region(SynthParams.preset("ki67", width=512, mpp=MPP, seed=2))


@pytest.fixture(scope="module")
def ki67_result(ki67_region: RegionRender) -> PeerTileResult:
    return classical_score_tile(ki67_region.rgb, MPP)


def _disc_tile(
    od_h: float, od_dab: float, *, ring_dab: float = 0.0, size: int = 128, r_px: int = 10
) -> np.ndarray:
    """White tile with one round nucleus of known stain amounts, optionally a DAB ring around it."""
    tile = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.indices((size, size))
    d2 = (yy - size // 2) ** 2 + (xx - size // 2) ** 2
    if ring_dab:
        ring = (d2 > r_px**2) & (d2 <= (r_px + 6) ** 2)
        tile[ring] = od_to_rgb(H_DAB.mix(np.array([0.0, ring_dab], np.float32)))
    tile[d2 <= r_px**2] = od_to_rgb(H_DAB.mix(np.array([od_h, od_dab], np.float32)))
    return tile


# --- accuracy on a synthetic region with known cells ------------------------------------------
# Measured on this region: 110 detections for 106 cells, every cell found (recall 1.0), 4 extra
# from over-split elongated/large nuclei (precision 0.964), mean centroid error 0.37 px, 27 cells
# called positive for 24 with nuclear DAB >= 0.2 OD. Tolerances are ~1.5x those errors.


def test_nucleus_count_close_to_truth(ki67_region: RegionRender, ki67_result) -> None:
    n_truth = len(ki67_region.truth.cells)
    assert n_truth == 106
    assert abs(ki67_result.n_cells - n_truth) / n_truth <= 0.06


def test_detections_match_truth_cells(ki67_region: RegionRender, ki67_result) -> None:
    truth_xy = np.array([[c.x, c.y] for c in ki67_region.truth.cells])
    m = match_cells(ki67_result.centroid_xy, truth_xy, radius=4.0 / MPP)  # 4 um
    assert m.recall >= 0.98
    assert m.precision >= 0.945
    assert m.distances.mean() <= 0.6  # px: centroids land on the nuclei, not beside them


def test_positive_calls_follow_nuclear_dab(ki67_region: RegionRender, ki67_result) -> None:
    cells = ki67_region.truth.cells
    truth_xy = np.array([[c.x, c.y] for c in cells])
    truth_pos = np.array([c.nucleus_dab >= 0.2 for c in cells])
    assert truth_pos.sum() == 24
    assert abs(ki67_result.n_positive - 24) <= 4
    m = match_cells(ki67_result.centroid_xy, truth_xy, radius=4.0 / MPP)
    agree = ki67_result.positive[m.pairs[:, 0]] == truth_pos[m.pairs[:, 1]]
    assert agree.mean() >= 0.98


def test_result_shapes_and_dtypes(ki67_result: PeerTileResult) -> None:
    n = ki67_result.n_cells
    assert ki67_result.centroid_yx.shape == (n, 2) and ki67_result.centroid_yx.dtype == np.float64
    assert ki67_result.area_px.shape == (n,) and ki67_result.area_px.dtype == np.int64
    assert ki67_result.nucleus_dab.dtype == ki67_result.ring_dab.dtype == np.float32
    assert ki67_result.positive.dtype == np.bool_ and ki67_result.positive.shape == (n,)
    np.testing.assert_array_equal(ki67_result.centroid_xy, ki67_result.centroid_yx[:, ::-1])
    assert (ki67_result.centroid_yx >= 0).all() and (ki67_result.centroid_yx <= 512).all()
    # Smallest nucleus kept is 8 um^2 = 32 px at 0.5 um/px.
    assert ki67_result.area_px.min() >= 32
    np.testing.assert_array_equal(
        ki67_result.positive,
        np.maximum(ki67_result.nucleus_dab, ki67_result.ring_dab) >= 0.2,
    )


# --- DAB units and the positivity rule ---------------------------------------------------------


def test_skimage_scale_factor_is_six() -> None:
    assert SKIMAGE_HED_TO_OD == pytest.approx(6.0)


@pytest.mark.parametrize("od_dab", [0.0, 0.25, 0.4, 0.7])
def test_nucleus_dab_reads_base10_od(od_dab: float) -> None:
    res = classical_score_tile(_disc_tile(0.5, od_dab), MPP)
    assert res.n_cells == 1
    assert res.nucleus_dab[0] == pytest.approx(od_dab, abs=0.02)
    assert res.ring_dab[0] == pytest.approx(0.0, abs=0.02)
    np.testing.assert_allclose(res.centroid_yx, [[64.5, 64.5]], atol=0.05)


def test_threshold_is_in_base10_od() -> None:
    tile = _disc_tile(0.5, 0.4)
    assert classical_score_tile(tile, MPP, dab_threshold=0.35).n_positive == 1
    assert classical_score_tile(tile, MPP, dab_threshold=0.45).n_positive == 0


def test_cytoplasm_ring_makes_a_cell_positive() -> None:
    res = classical_score_tile(_disc_tile(0.5, 0.0, ring_dab=0.5), MPP)
    assert res.n_cells == 1
    assert res.nucleus_dab[0] < 0.05
    assert res.ring_dab[0] > 0.3  # the 3 um ring lies inside the 6 px stained annulus
    assert res.positive.tolist() == [True]


# --- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [255, 240])
def test_blank_tile_gives_no_cells(value: int) -> None:
    res = classical_score_tile(np.full((256, 256, 3), value, np.uint8), MPP)
    assert (res.n_cells, res.n_positive) == (0, 0)
    assert res.centroid_yx.shape == (0, 2) and res.area_px.dtype == np.int64
    assert res.nucleus_dab.shape == res.ring_dab.shape == res.positive.shape == (0,)


def test_noisy_glass_gives_no_cells() -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(225, 256, (256, 256, 3)).astype(np.uint8)
    assert classical_score_tile(tile, MPP).n_cells == 0


def test_debris_below_min_area_is_dropped() -> None:
    # A 2 px radius speck covers 21 px (5.25 um^2) after smoothing: below the 8 um^2 default.
    speck = _disc_tile(0.6, 0.0, r_px=2)
    assert classical_score_tile(speck, MPP).n_cells == 0
    assert classical_score_tile(speck, MPP, min_nucleus_um2=4.0).area_px.tolist() == [21]
    assert classical_score_tile(_disc_tile(0.6, 0.0, r_px=3), MPP).n_cells == 1


def test_batch_equals_single_tiles(ki67_region: RegionRender) -> None:
    tiles = np.stack(
        [
            ki67_region.rgb[:256, :256],
            ki67_region.rgb[256:, 256:],
            np.full((256, 256, 3), 255, np.uint8),
        ]
    )
    batch = classical_score_tiles(tiles, MPP)
    assert len(batch) == 3
    for tile, res in zip(tiles, batch, strict=True):
        single = classical_score_tile(tile, MPP)
        np.testing.assert_array_equal(res.centroid_yx, single.centroid_yx)
        np.testing.assert_array_equal(res.positive, single.positive)
    assert batch[0].n_cells > 5 and batch[2].n_cells == 0


@pytest.mark.parametrize(
    ("tile", "mpp"),
    [
        (np.zeros((32, 32, 3), np.float32), MPP),
        (np.zeros((32, 32), np.uint8), MPP),
        (np.zeros((32, 32, 4), np.uint8), MPP),
        (np.zeros((32, 32, 3), np.uint8), 0.0),
        (np.zeros((32, 32, 3), np.uint8), float("nan")),
    ],
)
def test_bad_input_is_refused(tile: np.ndarray, mpp: float) -> None:
    with pytest.raises(ValueError, match=r"tile_rgb|mpp"):
        classical_score_tile(tile, mpp)


def test_batch_needs_four_dimensions() -> None:
    with pytest.raises(ValueError, match="tiles"):
        classical_score_tiles(np.zeros((32, 32, 3), np.uint8), MPP)
