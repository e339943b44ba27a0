"""Tiling: grid maths, level choice, the Zarr store contract, resume after SIGKILL, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import shared_file, write_generic_tiff

from pathology import open_slide
from pathology.cli import main
from pathology.errors import ConfigError, MissingMppError
from pathology.slide import block_mean
from pathology.synth import FAKE_PHI, SynthParams, synthesize_slide
from pathology.tiling import StoreMismatchError, TileStore, plan_grid, render_tile, tile_slide
from pathology.tiling._store import halve_chw

# --------------------------------------------------------------------------- grid maths


@pytest.mark.parametrize(
    ("slide_mpp", "downsamples", "target", "level", "factor", "snapped", "mpp"),
    [
        (0.25, (1.0, 4.0, 16.0), 0.25, 0, 1.0, True, 0.25),
        (0.25, (1.0, 4.0, 16.0), 0.5, 0, 2.0, True, 0.5),
        (0.25, (1.0, 4.0, 16.0), 1.0, 1, 1.0, True, 1.0),
        (0.25, (1.0, 4.0, 16.0), 2.0, 1, 2.0, True, 2.0),
        (0.5, (1.0, 4.0), 0.5, 0, 1.0, True, 0.5),
        (0.5, (1.0, 4.0), 1.0, 0, 2.0, True, 1.0),
        (0.499, (1.0,), 0.5, 0, 1.0, True, 0.499),  # within tolerance: snap, record 0.499
        (0.25, (1.0, 4.0), 0.7, 0, 2.8, False, 0.7),  # resampled
    ],
)
def test_level_choice(
    slide_mpp: float,
    downsamples: tuple[float, ...],
    target: float,
    level: int,
    factor: float,
    snapped: bool,
    mpp: float,
) -> None:
    grid = plan_grid((10_000, 8_000), downsamples, slide_mpp, target_mpp=target)
    assert (grid.level, grid.snapped) == (level, snapped)
    assert grid.factor == pytest.approx(factor)
    assert grid.mpp == pytest.approx(mpp)


def test_off_grid_edges_and_overlap() -> None:
    grid = plan_grid((1000, 701), (1.0,), 0.25, target_mpp=0.5, tile_px=256, overlap_px=16)
    assert grid.out_size == (500, 351)  # the last level-0 row still has an output row
    assert grid.shape == (2, 2) and grid.n_tiles == 4
    rc = grid.tile_rc()
    assert rc.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert grid.out_box(rc).tolist() == [
        [0, 0, 256, 256],
        [256, 0, 244, 256],
        [0, 256, 256, 95],
        [256, 256, 244, 95],
    ]
    assert grid.out_box(rc[3:], overlap=True).tolist() == [[240, 240, 288, 288]]
    assert grid.l0_box(rc[3:]).tolist() == [[512.0, 512.0, 488.0, 190.0]]
    l0_xy, size, src = grid.level_region((256, 256, 244, 95))
    assert (l0_xy, size, src) == ((512, 512), (488, 190), (0.0, 0.0, 488.0, 190.0))


def test_grid_rejects_bad_requests() -> None:
    with pytest.raises(ConfigError, match="finer than the slide"):
        plan_grid((100, 100), (1.0,), 0.5, target_mpp=0.25)
    with pytest.raises(ConfigError, match="--overlap"):
        plan_grid((100, 100), (1.0,), 0.5, tile_px=64, overlap_px=64)
    with pytest.raises(ConfigError, match="--tile"):
        plan_grid((100, 100), (1.0,), 0.5, tile_px=8)


def test_block_mean_fast_path_matches_the_definition() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    expected = np.floor(img.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(block_mean(img, 2), expected.astype(np.uint8))


@pytest.mark.parametrize("shape", [(3, 64, 96), (3, 2048, 2048), (3, 75, 33), (3, 1, 1)])
def test_halve_chw_is_block_mean_by_two(shape: tuple[int, int, int]) -> None:
    # The pyramid reduces each channel plane on its own; it must give block_mean's pixels.
    rng = np.random.default_rng(sum(shape))
    chw = rng.integers(0, 256, shape, dtype=np.uint8)
    out = halve_chw(chw)
    expected = block_mean(np.ascontiguousarray(chw.transpose(1, 2, 0)), 2).transpose(2, 0, 1)
    assert out.shape == (3, -(-shape[1] // 2), -(-shape[2] // 2)) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_resampled_tiles_are_antialiased() -> None:
    # A 1-px checkerboard has no content at a coarser scale: a correct reduction is flat grey,
    # point sampling would alias it into stripes.
    yy, xx = np.mgrid[0:1024, 0:1024]
    board = np.where((yy + xx) % 2 == 0, 0, 255).astype(np.uint8)
    from pathology.slide import ArraySlide

    reader = ArraySlide(np.repeat(board[..., None], 3, axis=2), mpp=0.25)
    grid = plan_grid(reader.dimensions, reader.level_downsamples, 0.25, target_mpp=0.7, tile_px=128)
    tile = render_tile(reader, grid, (64, 64, 128, 128))
    assert tile.shape == (128, 128, 3)
    assert abs(float(tile.mean()) - 127.5) < 2 and tile.std() < 6


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synth_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiling") / "p16.svs"
    params = SynthParams.preset("p16_positive", width=3000, height=2200, mpp=0.25, seed=11)
    return synthesize_slide(params, out).svs_path


def test_store_layout_pixels_and_provenance(synth_svs: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "s.zarr"
    result = tile_slide(
        synth_svs, store_path, target_mpp=0.5, tile_px=256, min_tissue=0.25, workers=2
    )
    assert result.grid.out_size == (1500, 1100) and result.grid.shape == (5, 6)
    assert 0 < result.tissue_tiles < 30 and result.tiles_written == result.tissue_tiles
    assert result.failed_tiles == []

    group = zarr.open_group(store_path, mode="r")  # plain zarr, no pathology code
    image = group["0"]
    assert image.shape == (3, 1100, 1500) and image.dtype == np.uint8
    # Shards of 8 x 8 tiles (one file each), inner chunks of 2 x 2 tiles (format 2).
    assert image.shards == (3, 2048, 2048) and image.chunks == (3, 512, 512)
    assert group["1"].shape == (3, 550, 750) and group["3"].shape == (3, 138, 188)
    assert [group[str(lvl)].chunks for lvl in (1, 2, 3)] == [
        (3, 1024, 1024),
        (3, 512, 512),
        (3, 256, 256),
    ]
    assert group.attrs["pathology"]["format_version"] == 2
    assert group.attrs["pathology"]["chunk_tiles"] == 2
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    assert [d["path"] for d in ome["multiscales"][0]["datasets"]] == ["0", "1", "2", "3"]
    assert ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] == [
        1.0,
        1.0,
        1.0,
    ]
    meta = group.attrs["pathology"]
    assert meta["provenance"]["source"]["name"] == "p16.svs"
    assert meta["provenance"]["level_read"] == 0 and meta["grid"]["mpp"] == 0.5
    assert meta["provenance"]["software"].startswith("pathology ")
    # No patient data from the slide's description or label reaches the store.
    metadata_text = "".join(p.read_text() for p in store_path.rglob("zarr.json"))
    for value in FAKE_PHI.values():
        assert str(value) not in metadata_text

    # Tile table: tissue tiles only, fractions at or above the threshold, level-0 boxes.
    tiles = {
        k: np.asarray(group[f"tiles/{k}"][...])
        for k in ("row", "col", "x", "y", "l0_x", "l0_w", "tissue")
    }
    assert len(tiles["row"]) == result.tissue_tiles and (tiles["tissue"] >= 0.25).all()
    assert (tiles["x"] == tiles["col"] * 256).all() and (tiles["l0_x"] == tiles["x"] * 2).all()

    # Pixels: every stored tissue tile is the 2x2 block mean of the slide's level-0 pixels.
    with open_slide(synth_svs) as reader:
        for row, col in zip(tiles["row"][:4], tiles["col"][:4], strict=True):
            x, y = int(col) * 256, int(row) * 256
            w, h = min(256, 1500 - x), min(256, 1100 - y)
            expected = block_mean(reader.read_region((2 * x, 2 * y), 0, (2 * w, 2 * h)), 2)
            np.testing.assert_array_equal(
                image[:, y : y + h, x : x + w].transpose(1, 2, 0), expected
            )
    # Non-tissue tiles are never written: they read as the white fill value.
    skipped = set(zip(tiles["row"].tolist(), tiles["col"].tolist(), strict=True)) ^ {
        (r, c) for r in range(5) for c in range(6)
    }
    r, c = next(iter(sorted(skipped)))
    assert (image[:, r * 256 : r * 256 + 8, c * 256 : c * 256 + 8] == 255).all()
    # The scorer's view: tiles with overlap, white beyond the image.
    store = TileStore.open(store_path)
    tile = store.read_tile(int(tiles["row"][0]), int(tiles["col"][0]), overlap_px=8)
    assert tile.shape == (3, 272, 272)
    assert store.is_complete()


def test_store_is_a_valid_ome_ngff_image(synth_svs: Path, tmp_path: Path) -> None:
    # The schema napari's OME-Zarr reader relies on (ome-zarr-models validates NGFF 0.5).
    from ome_zarr_models.v05.image import Image

    tile_slide(synth_svs, tmp_path / "ngff.zarr", target_mpp=1.0)
    image = Image.from_zarr(zarr.open_group(tmp_path / "ngff.zarr", mode="r"))
    assert image.attributes.ome.version == "0.5"
    scales = [
        d.coordinateTransformations[0].scale for d in image.attributes.ome.multiscales[0].datasets
    ]
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0], [1.0, 8.0, 8.0]]


def test_existing_stores_are_never_silently_replaced(
    synth_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s.zarr"
    assert main(["tile", str(synth_svs), "--out", str(store), "--mpp", "1.0"]) == 0
    capsys.readouterr()
    assert main(["tile", str(synth_svs), "--out", str(store), "--mpp", "1.0"]) == 0
    assert "already complete" in capsys.readouterr().out
    # Other parameters: refused, one line naming the difference.
    with pytest.raises(StoreMismatchError, match=r"target_mpp: 1\.0 in the store, 0\.5 now"):
        tile_slide(synth_svs, store, target_mpp=0.5)
    # A folder that is not a store at all.
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["tile", str(synth_svs), "--out", str(other)]) == 2
    assert "is not a tile store" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    # --overwrite replaces.
    result = tile_slide(synth_svs, store, target_mpp=0.5, overwrite=True)
    assert result.grid.mpp == 0.5 and result.shards_skipped == 0


def test_resume_after_sigkill_gives_the_pixels_of_an_uninterrupted_run(
    synth_svs: Path, tmp_path: Path
) -> None:
    args = [
        "--mpp",
        "0.25",
        "--tile",
        "128",
        "--min-tissue",
        "0",
        "--shard-tiles",
        "1",
        "--workers",
        "1",
        # threads: SIGKILL then takes every writer with it, so the flags counted below are final
        # (a process-pool worker could still finish its shard after the kill).
        "--scheduler",
        "threads",
    ]
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pathology", "tile", str(synth_svs), "--out", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    progress = killed / "progress" / "shards" / "c"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and sum(1 for _ in progress.rglob("*")) >= 6:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = int((TileStore.open(killed).shard_progress > 0).sum())
    total = 24 * 18  # (3000 x 2200 at 0.25 um/px) / 128 px tiles
    assert 0 < done_at_kill < total

    result = tile_slide(
        synth_svs, killed, target_mpp=0.25, tile_px=128, min_tissue=0.0, shard_tiles=1, workers=2
    )
    assert result.shards_skipped == done_at_kill
    assert result.shards_written == total - done_at_kill
    tile_slide(
        synth_svs, clean, target_mpp=0.25, tile_px=128, min_tissue=0.0, shard_tiles=1, workers=2
    )
    a, b = zarr.open_group(killed, mode="r"), zarr.open_group(clean, mode="r")
    for name in ("0", "1", "2", "3"):
        np.testing.assert_array_equal(a[name][...], b[name][...])


def test_format_1_stores_stay_readable_and_resumable(
    synth_svs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store written before format 2 (inner chunk = one tile) is read and resumed in its own
    # layout, with the pixels of a format-2 store of the same slide.
    from pathology.batch._shards import plan_shards, read_shard_tiles
    from pathology.tiling import _store

    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    kwargs = {"target_mpp": 0.25, "tile_px": 256, "min_tissue": 0.0, "shard_tiles": 4}
    with monkeypatch.context() as m:
        m.setattr(_store, "CHUNK_TILES", 1)  # the layout format 1 wrote
        tile_slide(synth_svs, old, **kwargs)
    assert zarr.open_group(old, mode="r")["0"].chunks == (3, 256, 256)
    # Tear two finished shards: progress flag cleared, shard file of level 0 deleted.
    store = TileStore.open(old, mode="r+")
    assert store.meta["format_version"] == 1 and store.is_complete()
    for shard_rc in ((0, 0), (1, 1)):
        store.mark_shard(shard_rc, 0)
        (old / "0" / "c" / "0" / str(shard_rc[0]) / str(shard_rc[1])).unlink()
    resumed = tile_slide(synth_svs, old, **kwargs)
    assert resumed.shards_written == 2 and resumed.shards_skipped == store.shard_progress.size - 2
    tile_slide(synth_svs, new, **kwargs)

    a, b = TileStore.open(old), TileStore.open(new)
    assert a.image.chunks == (3, 256, 256) and b.image.chunks == (3, 512, 512)
    assert a.meta["format_version"] == 1 and b.meta["format_version"] == 2
    for name in ("0", "1", "2", "3"):
        np.testing.assert_array_equal(a.group[name][...], b.group[name][...])
    # The scorer's reads (a shard with its halo) and single-tile reads agree too.
    table = a.table()
    for shard in plan_shards(table, 4)[:3]:
        np.testing.assert_array_equal(
            read_shard_tiles(a.image, shard.tiles_rc, 256, 32),
            read_shard_tiles(b.image, shard.tiles_rc, 256, 32),
        )
    row, col = int(table["row"][-1]), int(table["col"][-1])
    np.testing.assert_array_equal(
        a.read_tile(row, col, overlap_px=16), b.read_tile(row, col, overlap_px=16)
    )


def test_store_of_a_newer_format_is_refused_with_one_line(
    synth_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "future.zarr"
    tile_slide(synth_svs, store, target_mpp=1.0)
    group = zarr.open_group(store, mode="r+")
    meta = dict(group.attrs["pathology"])
    meta["format_version"] = 99
    group.attrs["pathology"] = meta
    with pytest.raises(StoreMismatchError, match=r"format_version 99.*--overwrite"):
        TileStore.open(store)
    assert main(["tile", str(synth_svs), "--out", str(store), "--mpp", "1.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-tile with --overwrite" in err
    result = tile_slide(synth_svs, store, target_mpp=1.0, overwrite=True)
    assert result.shards_skipped == 0 and TileStore.open(store).meta["format_version"] == 2


# --------------------------------------------------------------------------- real and odd slides


@pytest.mark.realdata
def test_real_aperio_slide(cmu1_path: Path, tmp_path: Path) -> None:
    result = tile_slide(cmu1_path, tmp_path / "cmu.zarr", target_mpp=0.5, tile_px=256)
    # 0.499 um/px is within tolerance of 0.5: read level 0 as is, record the true mpp.
    assert result.grid.snapped and result.grid.factor == 1.0
    assert result.grid.mpp == pytest.approx(0.499)
    assert result.grid.out_size == (2220, 2967) and result.grid.shape == (12, 9)
    assert 40 <= result.tissue_tiles <= 80  # about half the strip is glass
    store = TileStore.open(tmp_path / "cmu.zarr")
    t = store.table()
    row, col = int(t["row"][0]), int(t["col"][0])
    with open_slide(cmu1_path) as reader:
        expected = reader.read_region((col * 256, row * 256), 0, (256, 256))
    np.testing.assert_array_equal(store.read_tile(row, col).transpose(1, 2, 0), expected)


@pytest.mark.realdata
def test_nonsense_mpp_needs_an_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boxes = shared_file("openslide-python-fixtures/boxes.tiff")  # 72 dpi header: 352.8 um/px
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        tile_slide(boxes, tmp_path / "b.zarr")
    assert main(["tile", str(boxes), "--out", str(tmp_path / "b.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(boxes) in err
    result = tile_slide(
        boxes, tmp_path / "b.zarr", slide_mpp=0.5, target_mpp=1.0, tile_px=64, min_tissue=0.0
    )
    assert (
        result.grid.level == 1 and result.grid.out_size == (150, 125) and result.tissue_tiles == 6
    )


def test_unreadable_tile_is_reported_and_isolated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    img = np.clip(rng.normal(150, 30, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    path = write_generic_tiff(tmp_path / "damaged.tif", img, mpp=0.5, tile=256)
    with tifffile.TiffFile(path) as tif:
        offset, count = (
            tif.pages[0].dataoffsets[5],
            tif.pages[0].databytecounts[5],
        )  # tile row 1, col 1
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\x5a" * count
    path.write_bytes(bytes(raw))
    store = tmp_path / "d.zarr"
    code = main(
        [
            "tile",
            str(path),
            "--out",
            str(store),
            "--min-tissue",
            "0",
            "--shard-tiles",
            "1",
            "--reader",
            "openslide",
            "--json",
        ]
    )
    assert code == 1
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["tissue_tiles"] == 16 and summary["failed_tiles"] == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("pathology tile: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"pathology tile: error: {path}: tile row 1, col 1:"
    )
    progress = TileStore.open(store).shard_progress
    assert progress[1, 1] == 2 and (np.delete(progress.ravel(), 5) == 1).all()
    good = zarr.open_group(store, mode="r")["0"][:, 0:256, 0:256].transpose(1, 2, 0)
    with open_slide(path) as reader:
        np.testing.assert_array_equal(good, reader.read_region((0, 0), 0, (256, 256)))
