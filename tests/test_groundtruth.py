"""Cell ground truth: one-to-one point matching and the DeepLIIF segmentation-mask reader."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from conftest import shared_file
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from pathology.groundtruth import (
    CellMatch,
    deepliif_panel,
    load_deepliif_mask,
    mask_cells_from_rgb,
    match_cells,
)

DEEPLIIF = "deepliif-ki67-samples"

# --- match_cells: hand-built cases ----------------------------------------------------------


def test_exact_counts_of_a_small_case() -> None:
    truth = [[10.0, 10.0], [50.0, 10.0], [90.0, 10.0], [10.0, 80.0]]
    pred = [[11.0, 9.0], [52.0, 12.0], [200.0, 200.0], [10.0, 86.5]]  # last one 6.5 away
    m = match_cells(pred, truth, radius=5.0)
    assert (m.tp, m.fp, m.fn) == (2, 2, 2)
    assert m.pairs.tolist() == [[0, 0], [1, 1]]
    assert m.pairs.dtype == np.int64 and m.pairs.shape == (2, 2)
    np.testing.assert_allclose(m.distances, [math.sqrt(2), math.sqrt(8)])
    assert m.precision == 0.5 and m.recall == 0.5 and m.f1 == 0.5
    assert m.unmatched_pred.tolist() == [2, 3]
    assert m.unmatched_truth.tolist() == [2, 3]
    # A larger radius takes the 6.5 px pair in too.
    assert match_cells(pred, truth, radius=7.0).tp == 3


def test_two_detections_near_one_truth_match_once() -> None:
    m = match_cells([[0.0, 0.0], [1.0, 0.0]], [[0.6, 0.0]], radius=2.0)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.pairs.tolist() == [[1, 0]]  # the nearer of the two
    m = match_cells([[0.6, 0.0]], [[0.0, 0.0], [1.0, 0.0]], radius=2.0)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert m.pairs.tolist() == [[0, 1]]


def test_matching_maximises_pairs_where_greedy_would_not() -> None:
    # Nearest-first would pair detection 0 with truth 0 (1.4 apart) and leave detection 1
    # (1.9 from truth 0, 4.9 from truth 1) without a partner: 1 pair. The optimum has 2.
    m = match_cells([[1.4, 0.0], [-1.9, 0.0]], [[0.0, 0.0], [3.0, 0.0]], radius=2.0)
    assert m.tp == 2
    assert m.pairs.tolist() == [[0, 1], [1, 0]]
    np.testing.assert_allclose(m.distances, [1.6, 1.9])


def test_radius_is_inclusive_and_units_are_the_callers() -> None:
    assert match_cells([[0.0, 0.0]], [[3.0, 4.0]], radius=5.0).tp == 1
    assert match_cells([[0.0, 0.0]], [[3.0, 4.0]], radius=4.99).tp == 0
    # Microns instead of pixels: same geometry scaled, same answer.
    assert match_cells([[0.0, 0.0]], [[1.5, 2.0]], radius=2.5).tp == 1


@pytest.mark.parametrize(("n", "m"), [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 10 + m)
    match = match_cells(rng.uniform(0, 10, (n, 2)), rng.uniform(0, 10, (m, 2)), radius=3.0)
    assert match.pairs.shape == (0, 2) and match.distances.shape == (0,)
    assert (match.tp, match.fp, match.fn) == (0, n, m)
    assert math.isnan(match.precision) == (n == 0)
    assert math.isnan(match.recall) == (m == 0)
    assert math.isnan(match.f1) == (n == m == 0)
    if n + m:
        assert match.f1 == 0.0


def test_plain_lists_and_empty_lists_are_accepted() -> None:
    assert match_cells([], [[1.0, 1.0]], radius=1.0).fn == 1
    assert match_cells([[1.0, 1.0]], [], radius=1.0).fp == 1


def test_no_pair_within_radius() -> None:
    m = match_cells([[0.0, 0.0], [0.0, 10.0]], [[10.0, 0.0]], radius=3.0)
    assert (m.tp, m.fp, m.fn) == (0, 2, 1)
    assert m.precision == 0.0 and m.recall == 0.0 and m.f1 == 0.0


@pytest.mark.parametrize(
    ("pred", "truth", "radius"),
    [
        (np.zeros((3, 3)), np.zeros((2, 2)), 1.0),
        (np.zeros((3, 2)), np.zeros((2, 2, 1)), 1.0),
        (np.array([[0.0, np.nan]]), np.zeros((2, 2)), 1.0),
        (np.zeros((3, 2)), np.zeros((2, 2)), 0.0),
        (np.zeros((3, 2)), np.zeros((2, 2)), float("nan")),
    ],
)
def test_bad_input_is_refused(pred: np.ndarray, truth: np.ndarray, radius: float) -> None:
    with pytest.raises(ValueError, match=r"pred_xy|truth_xy|radius"):
        match_cells(pred, truth, radius)


def _brute_force(pred: np.ndarray, truth: np.ndarray, radius: float) -> tuple[int, float]:
    """(pairs, total distance) of the max-cardinality min-distance matching, dense."""
    d = np.hypot(*(pred[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    big = 1e6
    cost = np.where(d <= radius, d, big)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    return int(ok.sum()), float(d[r[ok], c[ok]].sum())


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_dense_assignment_on_crowded_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 40, size=2)
    pred = rng.uniform(0, 25, (n, 2))
    truth = rng.uniform(0, 25, (m, 2))
    match = match_cells(pred, truth, radius=4.0)
    tp, total = _brute_force(pred, truth, 4.0)
    assert match.tp == tp
    assert match.distances.sum() == pytest.approx(total, abs=1e-9)
    assert len(set(match.pairs[:, 0])) == len(set(match.pairs[:, 1])) == tp  # one-to-one
    assert (match.distances <= 4.0).all()


def test_twenty_thousand_points_all_found_under_jitter() -> None:
    # Truth at about one cell per radius^2: neighbours often lie within the radius of a
    # detection, so only an optimal matching is sure to pair every detection with its own cell.
    rng = np.random.default_rng(7)
    n, radius = 20_000, 8.0
    side = math.sqrt(n) * radius
    truth = rng.uniform(0, side, (n, 2))
    angle = rng.uniform(0, 2 * np.pi, n)
    jitter = rng.uniform(0, 0.9 * radius, n)
    pred = truth + np.stack([np.cos(angle), np.sin(angle)], axis=1) * jitter[:, None]
    order = rng.permutation(n)
    t0 = time.perf_counter()
    m = match_cells(pred[order], truth, radius)
    seconds = time.perf_counter() - t0
    assert (m.tp, m.fp, m.fn) == (n, 0, 0)
    assert m.f1 == 1.0
    assert seconds < 5.0, f"20k x 20k matching took {seconds:.1f} s"


def test_cellmatch_is_frozen() -> None:
    m = match_cells([[0.0, 0.0]], [[0.0, 0.0]], radius=1.0)
    assert isinstance(m, CellMatch)
    assert m.tp == 1 and m.distances.tolist() == [0.0]  # coincident points still pair
    with pytest.raises(AttributeError):
        m.n_pred = 3  # type: ignore[misc]


# --- DeepLIIF masks: synthetic ---------------------------------------------------------------


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_mask_reader_on_a_drawn_mask() -> None:
    shape = (64, 96)
    mask = np.zeros((*shape, 3), np.uint8)
    red = _disc(shape, 20, 20, 8)
    blue_a = _disc(shape, 20, 60, 6)
    blue_b = _disc(shape, 48, 60, 6)
    for region, colour in ((red, (255, 0, 0)), (blue_a, (0, 0, 255)), (blue_b, (0, 0, 250))):
        mask[region] = colour
        # A green outline one pixel wide around each nucleus, as DeepLIIF draws them.
        mask[ndi.binary_dilation(region) & ~region] = (0, 255, 0)
    mask[20, 20] = (210, 0, 0)
    mask[2, 2] = (0, 0, 255)  # a single-pixel speck
    mask[60, 5] = (0, 0, 7)  # near-black: background
    mask[5, 90] = (200, 200, 0)  # yellow: neither red nor blue

    cells = mask_cells_from_rgb(mask)
    assert (cells.n_cells, cells.n_positive, cells.n_negative) == (3, 1, 2)
    assert cells.positive.tolist() == [True, False, False]
    assert cells.area_px.tolist() == [int(red.sum()), int(blue_a.sum()), int(blue_b.sum())]
    np.testing.assert_allclose(cells.centroid_xy, [[20.5, 20.5], [60.5, 20.5], [60.5, 48.5]])
    assert cells.centroid_xy.dtype == np.float64 and cells.area_px.dtype == np.int64
    assert cells.percent_positive == pytest.approx(100 / 3)
    # The speck counts only when nothing is filtered.
    assert mask_cells_from_rgb(mask, min_area_px=0).n_negative == 3
    assert mask_cells_from_rgb(mask, min_area_px=int(blue_a.sum()) + 1).n_cells == 1


def test_touching_nuclei_across_a_diagonal_stay_apart() -> None:
    # Two blue squares meeting only corner to corner: two nuclei (4-connectivity).
    mask = np.zeros((20, 20, 3), np.uint8)
    mask[2:8, 2:8] = (0, 0, 255)
    mask[8:14, 8:14] = (0, 0, 255)
    cells = mask_cells_from_rgb(mask, min_area_px=0)
    assert cells.n_negative == 2
    assert cells.area_px.tolist() == [36, 36]


def test_empty_mask_and_bad_shapes() -> None:
    cells = mask_cells_from_rgb(np.zeros((16, 16, 3), np.uint8))
    assert cells.n_cells == 0 and cells.centroid_xy.shape == (0, 2)
    assert math.isnan(cells.percent_positive)
    with pytest.raises(ValueError, match="mask_rgb"):
        mask_cells_from_rgb(np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="min_area_px"):
        mask_cells_from_rgb(np.zeros((16, 16, 3), np.uint8), min_area_px=-1)


def test_panels_of_a_drawn_strip(tmp_path) -> None:
    from PIL import Image

    strip = np.zeros((32, 96, 3), np.uint8)
    strip[:, 32:64] = 100
    strip[4:12, 68:76] = (255, 0, 0)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    assert deepliif_panel(path, 1).shape == (32, 32, 3)
    assert (deepliif_panel(path, 1) == 100).all()
    np.testing.assert_array_equal(deepliif_panel(path, -1), strip[:, 64:])
    cells = load_deepliif_mask(path, min_area_px=0)  # not square: the last panel
    assert (cells.n_positive, cells.n_negative) == (1, 0)
    np.testing.assert_allclose(cells.centroid_xy, [[8.0, 8.0]])
    assert load_deepliif_mask(path, panel=0).n_cells == 0
    with pytest.raises(IndexError, match="3 panels"):
        deepliif_panel(path, 3)
    bad = tmp_path / "bad.png"
    Image.fromarray(np.zeros((32, 80, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="square"):
        deepliif_panel(bad, 0)


# --- DeepLIIF masks: the real sample files -----------------------------------------------------

# SOURCE.md's connected-component counts (positive, negative); they include 1-pixel specks of
# anti-aliased outline, which min_area_px=0 keeps and the default (10 px) drops.
_SOURCE_COUNTS = {
    "val/Lung1.png": (11, 50),
    "test_groundtruth/22_2.png": (10, 130),
    "test_groundtruth/34_3.png": (22, 79),
    "test_groundtruth/6_2.png": (22, 24),
}
_DEFAULT_COUNTS = {
    "val/Lung1.png": (11, 50),
    "test_groundtruth/22_2.png": (10, 127),  # three 1-px blue specks dropped
    "test_groundtruth/34_3.png": (21, 79),  # one 1-px red speck dropped
    "test_groundtruth/6_2.png": (22, 24),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(_SOURCE_COUNTS))
def test_deepliif_counts_match_source_md(name: str) -> None:
    path = shared_file(f"{DEEPLIIF}/{name}")
    raw = load_deepliif_mask(path, min_area_px=0)
    assert (raw.n_positive, raw.n_negative) == _SOURCE_COUNTS[name]
    cells = load_deepliif_mask(path)
    assert (cells.n_positive, cells.n_negative) == _DEFAULT_COUNTS[name]
    assert (cells.centroid_xy >= 0).all() and (cells.centroid_xy <= 512).all()
    assert cells.area_px.min() >= 10


@pytest.mark.realdata
def test_deepliif_lung1_matches_its_own_json() -> None:
    path = shared_file(f"{DEEPLIIF}/val/Lung1.png")
    doc = json.loads(shared_file(f"{DEEPLIIF}/val/Lung1.json").read_text())
    cells = load_deepliif_mask(path, min_area_px=doc["size_thresh"])
    assert (cells.n_positive, cells.n_negative) == (doc["num_pos"], doc["num_neg"]) == (11, 49)
    assert cells.percent_positive == pytest.approx(doc["percent_pos"], abs=0.05)


@pytest.mark.realdata
def test_deepliif_lung1_panels() -> None:
    path = shared_file(f"{DEEPLIIF}/val/Lung1.png")
    ihc = deepliif_panel(path, 0)
    seg = deepliif_panel(path, 5)
    assert ihc.shape == seg.shape == (512, 512, 3) and ihc.dtype == np.uint8
    # The IHC panel is bright tissue; the mask panel mostly black background.
    assert ihc.mean() > 150 > 60 > seg.mean()
    explicit = load_deepliif_mask(path, panel=5)
    auto = load_deepliif_mask(path)
    np.testing.assert_array_equal(explicit.centroid_xy, auto.centroid_xy)
