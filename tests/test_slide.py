"""Slide reader: formats, mpp sources, bad inputs, PHI filtering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from conftest import shared_file, write_generic_tiff

from pathology import open_slide
from pathology.cli import main
from pathology.errors import (
    CorruptSlideError,
    EmptySlideError,
    MissingMppError,
    NotASlideError,
    PathologyError,
    SlideNotFoundError,
    TileReadError,
)
from pathology.slide import ArraySlide, OpenSlideReader, SlideReader


def _gradient(h: int = 600, w: int = 800) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], axis=-1).astype(np.uint8)


@pytest.mark.realdata
def test_aperio_slide_metadata(cmu1_path: Path) -> None:
    with open_slide(cmu1_path) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert isinstance(reader, SlideReader)
        info = reader.info
        assert info.vendor == "aperio"
        assert info.dimensions == (2220, 2967)
        assert info.level_count == 1 and info.level_downsamples == (1.0,)
        assert reader.mpp == pytest.approx(0.499)
        assert info.mpp_source == "openslide"
        assert info.objective_power == 20
        assert info.tile_size == (240, 240)
        region = reader.read_region((1000, 1000), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        # Past the right edge reads as white glass, like OpenSlide's transparent padding.
        edge = reader.read_region((2200, 0), 0, (100, 10))
        assert (edge[:, 30:] == 255).all()


@pytest.mark.realdata
def test_phi_never_leaves_the_reader(
    cmu1_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slide's description carries a scanner user id, a date and a time: none may be printed.
    raw = openslide.OpenSlide(str(cmu1_path)).properties
    secrets = [
        raw["aperio.User"],
        raw["aperio.Date"],
        raw["aperio.Time"],
        raw["aperio.Filename"] + "|",
    ]

    def _forbidden(self: object) -> None:
        raise AssertionError("label/macro/associated images must never be read")

    monkeypatch.setattr(openslide.OpenSlide, "associated_images", property(_forbidden))
    assert main(["info", "--json", str(cmu1_path)]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    for secret in secrets:
        assert secret not in out
    assert "tiff.ImageDescription" not in info["properties"]
    assert "openslide.comment" not in info["properties"]
    assert info["properties"]["openslide.mpp-x"] == "0.499"
    with open_slide(cmu1_path) as reader:
        thumb = reader.get_thumbnail((222, 297))
    assert thumb.shape == (297, 222, 3)


def test_generic_tiff_pyramid_and_resolution_tags(tmp_path: Path) -> None:
    img = _gradient(1024, 1536)
    path = write_generic_tiff(tmp_path / "g.tif", img, mpp=0.25, levels=3, compression="zlib")
    with open_slide(path) as reader:
        assert reader.info.vendor == "generic-tiff"
        assert reader.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
        assert reader.mpp == pytest.approx(0.25)
        assert reader.get_best_level_for_downsample(3.0) == 1
        assert reader.get_best_level_for_downsample(1.9) == 0
        assert reader.get_best_level_for_downsample(100) == 2
        # Lossless pyramid: the level-1 read equals the stored 2x subsample exactly.
        region = reader.read_region((512, 256), 1, (128, 64))
        np.testing.assert_array_equal(region, img[::2, ::2][128:192, 256:384])
        thumb = reader.get_thumbnail((192, 192))
        assert thumb.shape == (128, 192, 3)


def test_mpp_override_and_missing_mpp(tmp_path: Path) -> None:
    path = write_generic_tiff(tmp_path / "nompp.tif", _gradient(), mpp=None)
    reader = open_slide(path)
    assert reader.info.mpp is None and reader.info.mpp_source == "none"
    with pytest.raises(MissingMppError) as err:
        _ = reader.mpp
    msg = str(err.value)
    assert str(path) in msg and "--slide-mpp" in msg and "\n" not in msg
    reader = open_slide(path, mpp=0.5)
    assert reader.mpp == 0.5 and reader.info.mpp_source == "override"
    with pytest.raises(MissingMppError, match="plausible"):
        open_slide(path, mpp=400)


def test_plain_images_are_single_level_slides(tmp_path: Path) -> None:
    from PIL import Image

    img = _gradient(100, 120)
    Image.fromarray(img).save(tmp_path / "tile.png")
    Image.fromarray(img).save(tmp_path / "tile.jpg", quality=95)
    Image.fromarray(img).save(tmp_path / "dpi.png", dpi=(50800, 50800))  # 0.5 um/px
    tifffile.imwrite(
        tmp_path / "plain.tif", img, photometric="rgb"
    )  # stripped: not an OpenSlide TIFF
    png = open_slide(tmp_path / "tile.png", mpp=0.5)
    assert isinstance(png, ArraySlide) and png.info.vendor == "image"
    np.testing.assert_array_equal(png.read_region((10, 20), 0, (30, 40)), img[20:60, 10:40])
    assert open_slide(tmp_path / "tile.jpg").info.dimensions == (120, 100)
    assert open_slide(tmp_path / "dpi.png").mpp == pytest.approx(0.5)
    plain = open_slide(tmp_path / "plain.tif")
    assert isinstance(plain, ArraySlide)
    np.testing.assert_array_equal(plain.read_region((0, 0), 0, (120, 100)), img)
    with pytest.raises(MissingMppError):
        _ = open_slide(tmp_path / "tile.png").mpp


@pytest.mark.realdata
def test_ome_tiff_crop_reads_physical_size() -> None:
    # Big-endian OME-TIFF that OpenSlide refuses: read through tifffile with the OME pixel size.
    path = shared_file("openslide-os2-ki67-crops/OS-2-ndpi.ome.tif")
    with open_slide(path) as reader:
        assert isinstance(reader, ArraySlide)
        assert reader.info.dimensions == (2202, 2202)
        assert reader.mpp == pytest.approx(0.2271, abs=1e-4)
        assert reader.info.mpp_source == "ome"


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "vendor", "dims", "mpp"),
    [
        ("small.svs", "aperio", (16, 16), 0.499),
        ("boxes.tiff", "generic-tiff", (300, 250), None),  # 72 dpi header = no real pixel size
        ("boxes_0.dcm", "dicom", (16, 16), 0.499),
    ],
)
def test_openslide_format_fixtures(
    name: str, vendor: str, dims: tuple[int, int], mpp: float | None
) -> None:
    with open_slide(shared_file(f"openslide-python-fixtures/{name}")) as reader:
        assert reader.info.vendor == vendor
        assert reader.info.dimensions == dims
        assert reader.info.mpp == (pytest.approx(mpp) if mpp else None)


def test_bad_inputs_each_get_their_own_one_line_error(tmp_path: Path) -> None:
    good = write_generic_tiff(tmp_path / "good.tif", _gradient(512, 512), tile=256)
    data = good.read_bytes()
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "notes.svs").write_text("patient notes, not a slide\n")
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "folder.mrxs").mkdir()
    cases = {
        "missing.svs": SlideNotFoundError,
        "folder.mrxs": SlideNotFoundError,
        "empty.svs": EmptySlideError,
        "notes.svs": NotASlideError,
        "truncated.tif": CorruptSlideError,
        "fake.png": CorruptSlideError,
    }
    for name, error in cases.items():
        with pytest.raises(error) as err:
            open_slide(tmp_path / name)
        msg = str(err.value)
        assert msg.startswith(str(tmp_path / name) + ":"), msg
        assert "\n" not in msg
        assert isinstance(err.value, PathologyError)
    # stdlib compatibility for callers that catch built-in types
    with pytest.raises(FileNotFoundError):
        open_slide(tmp_path / "missing.svs")


def test_damaged_tile_fails_alone(tmp_path: Path) -> None:
    img = _gradient(512, 512)
    path = write_generic_tiff(tmp_path / "damaged.tif", img, tile=256)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\x5a" * count
    path.write_bytes(bytes(raw))
    with open_slide(path) as reader:
        with pytest.raises(TileReadError, match=r"x=256, y=256"):
            reader.read_region((256, 256), 0, (256, 256))
        # The handle recovers: other tiles still read (libopenslide errors are otherwise sticky).
        assert reader.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)


def test_info_cli_batch_reports_each_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_generic_tiff(tmp_path / "ok.tif", _gradient(), mpp=0.5)
    (tmp_path / "empty.svs").write_bytes(b"")
    assert main(["info", str(good), str(tmp_path / "empty.svs")]) == 1
    captured = capsys.readouterr()
    assert "0.5000 um/px (openslide)" in captured.out
    assert (
        captured.err.strip()
        == f"pathology info: error: {tmp_path / 'empty.svs'}: file is empty (0 bytes); was the copy interrupted?"
    )
    # A single bad slide is a usage error: exit 2, one line, no traceback.
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_slide_errors_survive_pickling() -> None:
    """Errors cross process boundaries (Dask workers): they must unpickle to the same message."""
    import pickle

    from pathology.errors import MissingMppError, NotASlideError

    for exc in (NotASlideError("a.svs", "not a slide"), MissingMppError("b.png", "no mpp")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.path == exc.path
