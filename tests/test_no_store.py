"""``pathology score --no-store``: tiles rendered straight from the slide, the store's pixels exactly.

Contract: :class:`~pathology.tiling._image.SlideImage` holds the pixels ``tile_slide`` writes to the
store (every grid kind: exact block means, Lanczos resampling, a coarser pyramid level), so scoring
without the store gives the same rows, per-tile counts and cells; no image is written; interrupted
runs resume from their part files, with or without the store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pathology.cli import main

#: Columns that hold wall time, not results.
TIMING = {"seconds"}


def _synth(path: Path, preset: str, seed: int, size: tuple[int, int], mpp: float) -> Path:
    from pathology.synth import SynthParams, synthesize_slide

    w, h = size
    params = SynthParams.preset(preset, width=w, height=h, mpp=mpp, seed=seed)
    return synthesize_slide(params, path, overwrite=True).svs_path


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.25 um/px p16 slide with two pyramid levels read: 3072 px, 6 x 6 tiles at 0.5 um/px."""
    return _synth(
        tmp_path_factory.mktemp("slide") / "s.svs", "p16_equivocal", 7, (3072, 3072), 0.25
    )


@pytest.mark.parametrize(
    ("target_mpp", "reader"),
    [
        pytest.param(0.5, "auto", id="block-mean-level0"),
        pytest.param(0.7, "auto", id="lanczos"),
        pytest.param(1.0, "auto", id="block-mean-level1"),
        pytest.param(0.5, "openslide", id="block-mean-openslide"),
    ],
)
def test_slide_image_is_the_store_image(
    slide: Path, tmp_path: Path, target_mpp: float, reader: str
) -> None:
    from pathology.tiling import TileStore, tile_slide
    from pathology.tiling._image import SlideImage
    from pathology.tiling._read import ReaderSpec
    from pathology.tiling._run import _choose_reader, plan_tissue_tiles

    result = tile_slide(
        slide,
        tmp_path / "t.zarr",
        target_mpp=target_mpp,
        tile_px=128,
        scheduler="sync",
        reader=reader,
    )
    store = TileStore.open(result.store)
    plan = plan_tissue_tiles(slide, target_mpp=target_mpp, tile_px=128)
    assert plan.grid == result.grid
    assert {k: v.tolist() for k, v in plan.table.items()} == {
        k: v.tolist() for k, v in store.table().items()
    }
    grid = plan.grid
    direct, _ = _choose_reader(slide, reader, grid)
    assert direct is (reader == "auto")
    expected_snap = {0.5: (True, 0), 0.7: (False, 0), 1.0: (True, 1)}[target_mpp]
    assert (grid.snapped, grid.level) == expected_snap
    with SlideImage(ReaderSpec(str(slide), None, direct), grid, plan.tiles_rc) as image:
        assert image.shape == store.image.shape
        whole = store.image[...]
        assert (whole < 255).any() and (whole == 255).any()  # tissue and glass
        np.testing.assert_array_equal(image[:, :, :], whole)
        # Boxes cutting through tiles (as a shard's halo does), edges included.
        _, h, w = image.shape
        rng = np.random.default_rng(0)
        for _ in range(12):
            y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
            y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
            np.testing.assert_array_equal(image[:, y0:y1, x0:x1], whole[:, y0:y1, x0:x1])
        r, c = (int(v) for v in plan.tiles_rc[len(plan.tiles_rc) // 2])
        np.testing.assert_array_equal(
            image.read_tile(r, c, overlap_px=20), store.read_tile(r, c, overlap_px=20)
        )
        assert image.failed_tiles == []


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_device_jpeg_image_renders_the_slide_image(
    slide: Path, big_slide: Path, target_mpp: float
) -> None:
    """Shards rendered from the native JPEG tiles with torch (decode, block mean, tissue mask,
    halo windows) equal :class:`SlideImage`'s, for every shard of the plan and for boxes reaching
    beyond the image; the CPU decoder here, nvJPEG on CUDA (tests/test_jpeg.py bounds that one)."""
    import torch

    from pathology.batch._shards import plan_shards, read_shard_tiles
    from pathology.tiling._device_image import DeviceJpegImage, device_decode_support
    from pathology.tiling._image import SlideImage
    from pathology.tiling._read import ReaderSpec
    from pathology.tiling._run import plan_tissue_tiles

    for path, tile_px in ((slide, 128), (big_slide, 256)):
        plan = plan_tissue_tiles(path, target_mpp=target_mpp, tile_px=tile_px)
        assert device_decode_support(path, plan.grid) is None
        image = SlideImage(ReaderSpec(str(path), None, True), plan.grid, plan.tiles_rc)
        with DeviceJpegImage(image, torch.device("cpu")) as dev:
            shards = plan_shards(plan.table, 4)
            assert len(shards) >= 3
            for shard in shards:
                want = read_shard_tiles(image, shard.tiles_rc, tile_px, 32)
                got = dev.read_shard(shard.tiles_rc, tile_px, 32)
                assert got.shape == want.shape and got.dtype == torch.uint8
                np.testing.assert_array_equal(got.numpy(), want)
            _, h, w = image.shape
            for box in ((-40, -40, 300, 200), (w - 100, h - 90, 250, 250), (0, 0, w, h)):
                np.testing.assert_array_equal(dev.read_box(box).numpy(), _box(image, box))
            assert dev.fallbacks == 0
    plan = plan_tissue_tiles(slide, target_mpp=0.7, tile_px=128)
    assert "resamples" in str(device_decode_support(slide, plan.grid))


def _box(image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """``image``'s pixels of an output box that may leave it (white there)."""
    x0, y0, bw, bh = box
    _, h, w = image.shape
    out = np.full((3, bh, bw), 255, np.uint8)
    ax, ay, bx, by = max(x0, 0), max(y0, 0), min(x0 + bw, w), min(y0 + bh, h)
    out[:, ay - y0 : by - y0, ax - x0 : bx - x0] = image[:, ay:by, ax:bx]
    return out


def test_unreadable_tile_is_white_and_flagged(slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathology.errors import TileReadError
    from pathology.tiling._image import SlideImage
    from pathology.tiling._read import ReaderSpec
    from pathology.tiling._run import plan_tissue_tiles

    plan = plan_tissue_tiles(slide, tile_px=128)
    bad_rc = tuple(int(v) for v in plan.tiles_rc[0])
    t = plan.grid.tile_px
    real = __import__("pathology.tiling._image", fromlist=["render_tile"]).render_tile

    def render(reader: Any, grid: Any, box: tuple[int, int, int, int]) -> Any:
        if (box[1] // t, box[0] // t) == bad_rc:
            raise TileReadError(slide, "damaged JPEG")
        return real(reader, grid, box)

    monkeypatch.setattr("pathology.tiling._image.render_tile", render)
    with SlideImage(ReaderSpec(str(slide)), plan.grid, plan.tiles_rc) as image:
        r, c = bad_rc
        assert (image.read_tile(r, c) == 255).all()
        assert image.any_failed(plan.tiles_rc[:1]) and not image.any_failed(plan.tiles_rc[1:])
        assert image.failed_tiles == [f"tile row {r}, col {c}: {slide}: damaged JPEG"]


def test_device_image_falls_back_to_the_slide_image_on_a_damaged_tile(
    slide: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A JPEG tile the device path cannot read: that shard is rendered by :class:`SlideImage`
    instead (which, should it fail too, paints the tile white and flags it: tested above). Here
    the CPU reader reads it, so the shard's pixels are the same as without the damage."""
    import torch

    from pathology.batch._shards import plan_shards, read_shard_tiles
    from pathology.errors import TileReadError
    from pathology.tiling._device_image import DeviceJpegImage
    from pathology.tiling._direct import DirectTiffSource
    from pathology.tiling._image import SlideImage
    from pathology.tiling._read import ReaderSpec
    from pathology.tiling._run import plan_tissue_tiles

    plan = plan_tissue_tiles(slide, tile_px=128)
    shard = plan_shards(plan.table, 4)[0]
    real_jpeg = DirectTiffSource.read_jpeg

    def damaged(self: Any, level: int, col: int, row: int) -> bytes | None:
        if (col, row) == (0, 0):
            raise TileReadError(slide, "damaged JPEG")
        return real_jpeg(self, level, col, row)

    image = SlideImage(ReaderSpec(str(slide), None, True), plan.grid, plan.tiles_rc)
    with DeviceJpegImage(image, torch.device("cpu")) as dev:
        clean = dev.read_shard(shard.tiles_rc, 128, 32).clone()
        monkeypatch.setattr(DirectTiffSource, "read_jpeg", damaged)
        with caplog.at_level("WARNING", logger="pathology.tiling._device_image"):
            got = dev.read_shard(shard.tiles_rc, 128, 32)
        assert dev.fallbacks == 1
        assert "rendered on the CPU instead (" in caplog.text and "damaged JPEG" in caplog.text
        monkeypatch.undo()
        np.testing.assert_array_equal(got.numpy(), read_shard_tiles(image, shard.tiles_rc, 128, 32))
        assert torch.equal(got, clean) and got.shape[0] == len(shard.tiles_rc)
        assert dev.any_failed(shard.tiles_rc) is False


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def _score(slide: Path, out: Path, *more: str) -> int:
    # --decode cpu: on a CUDA box --no-store would otherwise decode with nvJPEG, whose pixels
    # are within rounding of the store's, not equal (test_nvjpeg_no_store_... covers that).
    argv = ["score", str(slide), "--marker", "p16", "--out", str(out), "--workers", "1"]
    return main([*argv, "--no-geojson", "--decode", "cpu", *more])


def _results(out: Path, sid: str) -> tuple[dict[str, str], pd.DataFrame, pd.DataFrame]:
    row = {k: v for k, v in _rows(out / "slides.csv")[sid].items() if k not in TIMING}
    tiles = pd.read_parquet(out / sid / "tiles.parquet")
    cells = pd.read_parquet(out / sid / "cells.parquet")
    return row, tiles, cells


@pytest.fixture(scope="module")
def scored(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The slide scored with its store and with ``--no-store``."""
    root = tmp_path_factory.mktemp("scored")
    assert _score(slide, root / "store") == 0
    assert _score(slide, root / "nostore", "--no-store") == 0
    return {"store": root / "store", "nostore": root / "nostore"}


def test_no_store_gives_the_same_results(scored: dict[str, Path]) -> None:
    row_a, tiles_a, cells_a = _results(scored["store"], "s")
    row_b, tiles_b, cells_b = _results(scored["nostore"], "s")
    assert row_a == row_b
    assert int(row_a["tumor_cells"]) > 100 and int(row_a["tissue_tiles"]) > 10
    pd.testing.assert_frame_equal(tiles_a, tiles_b)
    pd.testing.assert_frame_equal(cells_a, cells_b)
    # The store's per-tile counts are the ones tiles.parquet carries.
    from pathology.tiling import TileStore

    store = TileStore.open(scored["store"] / "s" / "tiles.zarr")
    counts = store.group["scores/p16/counts"]
    names = list(store.group["scores/p16"].attrs["count_names"])
    np.testing.assert_array_equal(np.asarray(counts[...]), tiles_b[names].to_numpy())


def test_no_store_rendered_by_the_device_path_gives_the_same_results(
    slide: Path, scored: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--no-store`` with the shards rendered by :class:`DeviceJpegImage` (what ``--decode auto``
    does on CUDA), forced here on the CPU decoder: the same rows, tiles and cells as the
    reading threads' rendering, and ``slide.json`` says who decoded."""
    import torch

    from pathology.batch import _slide

    monkeypatch.setattr(_slide, "_device_decoder", lambda *_: torch.device("cpu"))
    out = tmp_path / "dev"
    assert (
        main(
            [
                "score",
                str(slide),
                "--marker",
                "p16",
                "--out",
                str(out),
                "--workers",
                "1",
                "--no-geojson",
                "--no-store",
            ]
        )
        == 0
    )
    row_a, tiles_a, cells_a = _results(scored["nostore"], "s")
    row_b, tiles_b, cells_b = _results(out, "s")
    assert row_a == row_b
    pd.testing.assert_frame_equal(tiles_a, tiles_b)
    pd.testing.assert_frame_equal(cells_a, cells_b)
    record = json.loads((out / "s" / "slide.json").read_text())
    assert record["tile_decoder"] == "cpu" and record["tile_store"] is False
    assert record["tile_decoder_cpu_shards"] == 0
    monkeypatch.undo()
    with pytest.raises(Exception, match="decode must be one of auto, cpu"):
        from pathology.batch import ScoreSettings, SlideJob, score_slide

        job = SlideJob(slide_id="s", path=slide, marker="p16")
        score_slide(job, tmp_path / "bad", ScoreSettings(store=False, decode="gpu"))


def test_no_store_writes_no_image(scored: dict[str, Path]) -> None:
    sdir = scored["nostore"] / "s"
    assert sorted(p.name for p in sdir.iterdir()) == [
        "cells.parquet",
        "heatmap.png",
        "slide.json",
        "tiles.parquet",
    ]
    record = json.loads((sdir / "slide.json").read_text())
    assert record["tile_store"] is False and record["shards"] == {"scored": 1, "resumed": 0}
    assert json.loads((scored["store"] / "s" / "slide.json").read_text())["tile_store"] is True
    from PIL import Image

    with Image.open(sdir / "heatmap.png") as im:  # drawn over a thumbnail read from the slide
        assert min(im.size) >= 500


def test_store_choice_does_not_force_a_rescore(slide: Path, scored: dict[str, Path]) -> None:
    """Same pixels, same results: a finished slide is reused whichever way it was made."""
    for out, more in ((scored["store"], ["--no-store"]), (scored["nostore"], [])):
        stamp = (out / "s" / "slide.json").stat().st_mtime_ns
        assert _score(slide, out, *more) == 0
        assert (out / "s" / "slide.json").stat().st_mtime_ns == stamp
    assert (scored["store"] / "s" / "tiles.zarr").exists()
    assert not (scored["nostore"] / "s" / "tiles.zarr").exists()


class _Stop(Exception):
    """Raised by the patched part writer to cut a run short after some shards."""


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(["--no-store"], ["--no-store"], id="no-store-then-no-store"),
        pytest.param(["--no-store"], [], id="no-store-then-store"),
        pytest.param([], ["--no-store"], id="store-then-no-store"),
    ],
)
def test_resume_after_an_interrupted_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    big_slide: Path,
    big_clean: tuple[dict[str, str], pd.DataFrame, pd.DataFrame],
    first: list[str],
    second: list[str],
) -> None:
    from pathology.batch import _shards

    real = _shards._save_part
    saved: list[str] = []

    def save_then_stop(path: Path, *args: Any) -> None:
        real(path, *args)
        saved.append(path.name)
        if len(saved) == 2:
            raise _Stop  # the run dies after its second shard

    out = tmp_path / "out"
    monkeypatch.setattr(_shards, "_save_part", save_then_stop)
    with pytest.raises(_Stop):
        from pathology.batch import ScoreSettings, SlideJob, score_slide

        job = SlideJob(slide_id="big", path=big_slide, marker="p16")
        # Two workers: on the CPU two shards are read and scored at once, so the run dies with
        # another shard in flight (its part must not be written); the resumed run and the clean
        # one score one shard at a time, so the equality below also checks parallel = serial.
        score_slide(
            job, out, ScoreSettings(workers=2, geojson=False, store=not first, decode="cpu")
        )
    parts = out / "big" / "work" / "parts"
    assert sorted(p.name for p in parts.glob("shard-*.npz")) == sorted(saved)
    assert (out / "big" / "tiles.zarr").exists() is not bool(first)
    monkeypatch.setattr(_shards, "_save_part", real)

    assert _score(big_slide, out, *second) == 0
    record = json.loads((out / "big" / "slide.json").read_text())
    assert record["shards"]["resumed"] == 2 and record["shards"]["scored"] >= 1
    assert record["tile_store"] is not bool(second)
    assert (out / "big" / "tiles.zarr").exists() is not bool(second)
    assert not (out / "big" / "work").exists()
    row, tiles, cells = _results(out, "big")
    clean_row, clean_tiles, clean_cells = big_clean
    assert row == clean_row
    pd.testing.assert_frame_equal(tiles, clean_tiles)
    pd.testing.assert_frame_equal(cells, clean_cells)


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Several shards: 4096 x 2560 px at 0.5 um/px is 16 x 10 tiles, 2 x 2 shards of 8 x 8."""
    return _synth(tmp_path_factory.mktemp("big") / "big.svs", "p16_positive", 3, (4096, 2560), 0.5)


@pytest.fixture(scope="module")
def big_clean(
    big_slide: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, str], pd.DataFrame, pd.DataFrame]:
    """An uninterrupted run (with the store) of ``big_slide``."""
    out = tmp_path_factory.mktemp("clean")
    assert _score(big_slide, out) == 0
    record = json.loads((out / "big" / "slide.json").read_text())
    assert record["shards"]["scored"] >= 3  # enough shards to cut a run short after two
    return _results(out, "big")


def test_shards_scored_together_give_each_shard_its_own_part(
    big_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA consecutive shards go through the model as one batch (``group_tiles``), forced here
    on the CPU: one part file per shard; the numbers of one call per shard up to float rounding
    (a tile's sample positions depend on its place in the batch at ~1e-3 px); and a run cut short
    after its first part resumes to exactly the numbers of an uninterrupted one (the block is
    scored whole again)."""
    from pathology.batch import _shards
    from pathology.batch._shards import load_parts, plan_shards, score_image, shard_blocks
    from pathology.scoring import load_model
    from pathology.scoring._model import halo_for
    from pathology.tiling import TileStore, tile_slide

    tile_slide(big_slide, tmp_path / "t.zarr", target_mpp=0.5, tile_px=256, workers=1)
    store = TileStore.open(tmp_path / "t.zarr")
    table, shard_tiles = store.table(), int(store.meta["shard_tiles"])
    n = len(table["row"])
    scorer = load_model("p16", 0.5, halo_px=halo_for(0.5), device="cpu")
    shards = plan_shards(table, shard_tiles)
    sizes = [len(s.index) for s in shards]
    assert len(shards) == 4 and sum(sizes) == n
    group = sizes[0] + sizes[1]  # the first block holds two shards
    blocks = shard_blocks(shards, group)
    assert len(blocks[0]) == 2 and [s for b in blocks for s in b] == shards
    assert all(sum(len(s.index) for s in b) <= group for b in blocks)
    assert shard_blocks(shards, 1) == [[s] for s in shards]

    def run(parts: Path, group: int) -> tuple[Any, Any, int]:
        res = score_image(
            store.image, table, 256, shard_tiles, scorer, parts, read_workers=2, group_tiles=group
        )
        assert sorted(p.name for p in parts.glob("*.npz")) == sorted(s.name for s in shards)
        return load_parts(parts, shards, n, res.counts.shape[1])

    c1, cells1, _ = run(tmp_path / "per-shard", 1)
    c2, cells2, _ = run(tmp_path / "grouped", group)
    assert c1.sum() > 5000 and set(cells1) == set(cells2)
    assert (c1 != c2).any(1).sum() <= 0.03 * n
    assert np.abs(c1.sum(0) - c2.sum(0)).max() <= max(2, 0.002 * c1.sum(0).max())

    real, saved = _shards._save_part, []

    def save_then_stop(path: Path, *args: Any) -> None:
        real(path, *args)
        saved.append(path.name)
        if len(saved) == 1:
            raise _Stop  # dies inside the first block, after its first part

    parts = tmp_path / "resumed"
    monkeypatch.setattr(_shards, "_save_part", save_then_stop)
    with pytest.raises(_Stop):
        run(parts, group)
    monkeypatch.setattr(_shards, "_save_part", real)
    assert [p.name for p in parts.glob("*.npz")] == [shards[0].name]
    c3, cells3, _ = run(parts, group)
    assert np.array_equal(c2, c3)
    for k in cells2:
        np.testing.assert_array_equal(cells2[k], cells3[k], err_msg=k)


@pytest.mark.gpu
def test_nvjpeg_no_store_matches_the_store_within_rounding(
    slide: Path, scored: dict[str, Path], tmp_path: Path
) -> None:
    """On CUDA, ``--no-store`` (``--decode auto``) decodes the slide's JPEG tiles with nvJPEG and
    renders the shards on the GPU: the decoder is recorded and the counts are the store's
    within nvJPEG's rounding (its chroma upsampling is not libjpeg-turbo's)."""
    import torch

    pytest.importorskip("torchvision", reason="nvJPEG needs the gpu extra (torchvision)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "gpu"
    argv = ["score", str(slide), "--marker", "p16", "--out", str(out), "--workers", "4"]
    assert main([*argv, "--no-geojson", "--no-store"]) == 0
    record = json.loads((out / "s" / "slide.json").read_text())
    assert record["tile_decoder"] == "nvjpeg"
    row_a, _, _ = _results(scored["store"], "s")
    row_b, _, _ = _results(out, "s")
    a, b = int(row_a["tumor_cells"]), int(row_b["tumor_cells"])
    assert a > 100 and abs(a - b) <= max(3, 0.03 * a)
    pa, pb = (100 * int(r["tumor_positive"]) / int(r["tumor_cells"]) for r in (row_a, row_b))
    assert abs(pa - pb) <= 2.0
