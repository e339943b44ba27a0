"""Direct TIFF tile path: pixel equality with OpenSlide, refusals, missing and corrupt tiles.

Every case compares each native tile of each level with ``OpenSlideReader.read_region`` at the
same place and asserts exact equality. OpenSlide's JPEG fast path and imagecodecs both run
libjpeg-turbo with its defaults (integer "islow" IDCT, fancy upsampling: integer arithmetic whose
SIMD and C paths agree bit for bit); openslide-bin 4.0.1 bundles libjpeg-turbo 3.1.4, imagecodecs
2026.3.6 ships 3.1.3, and every tile compared is identical.
Tiles whose level origin OpenSlide cannot address on a whole pixel (levels with non-integer
downsamples) are checked through :class:`DirectTiffReader`, which leaves them to OpenSlide.
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import DATA, shared_file, write_generic_tiff

from pathology.errors import TileReadError
from pathology.slide import OpenSlideReader, open_slide
from pathology.tiling._direct import (
    DirectTiffReader,
    DirectTiffSource,
    direct_support,
    open_direct,
    why_not,
)

# -- helpers ----------------------------------------------------------------------------------


def _image(h: int, w: int) -> np.ndarray:
    """Tissue-like RGB test image: the committed IHC field tiled, (h, w, 3) uint8."""
    from PIL import Image

    ihc = np.asarray(Image.open(DATA / "ihc.png").convert("RGB"))
    reps = (-(-h // ihc.shape[0]), -(-w // ihc.shape[1]), 1)
    return np.ascontiguousarray(np.tile(ihc, reps)[:h, :w])


def _patch_tile_entry(
    path: Path, page: int, tile_no: int, *, bytecount: int, offset: int | None = None
) -> None:
    """Overwrite one tile's TileByteCounts (and optionally TileOffsets) entry in place."""
    fmt = {3: "<H", 4: "<I", 16: "<Q"}
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[page].tags
        edits = [(tags["TileByteCounts"], bytecount)]
        if offset is not None:
            edits.append((tags["TileOffsets"], offset))
        writes = [
            (tag.valueoffset + tile_no * struct.calcsize(fmt[tag.dtype]), fmt[tag.dtype], value)
            for tag, value in edits
        ]
    with path.open("r+b") as fh:
        for pos, f, value in writes:
            fh.seek(pos)
            fh.write(struct.pack(f, value))


def _whole_pixel(ds: float, level_xy: tuple[int, int]) -> tuple[int, int] | None:
    """Level-0 origin OpenSlide maps back to exactly ``level_xy``, or None if there is none."""
    l0 = (round(level_xy[0] * ds), round(level_xy[1] * ds))
    return l0 if (l0[0] / ds).is_integer() and (l0[1] / ds).is_integer() else None


def _assert_tiles_equal(path: Path, max_tiles_per_level: int = 400) -> dict[int, int]:
    """Every native tile (padded to full size) equals OpenSlide's box; returns tiles compared/level."""
    compared: dict[int, int] = {}
    with open_direct(path) as src, OpenSlideReader(path) as ref:
        assert src.level_dimensions == ref.level_dimensions
        for level, lv in enumerate(src.levels):
            ds = src.level_downsamples[level]
            cols, rows = lv.tiles_cr
            tw, th = lv.tile_px
            k_all = np.arange(cols * rows)
            if k_all.size > max_tiles_per_level:  # deterministic sample on big levels
                k_all = k_all[:: -(-k_all.size // max_tiles_per_level)]
            n = 0
            for k in k_all.tolist():
                col, row = k % cols, k // cols
                l0 = _whole_pixel(ds, (col * tw, row * th))
                if l0 is None:
                    continue
                got = src.read_tile(level, col, row, pad=True)
                want = ref.read_region(l0, level, (tw, th))
                if not np.array_equal(got, want):
                    diff = np.abs(got.astype(int) - want.astype(int))
                    pytest.fail(
                        f"{path.name} level {level} tile ({col}, {row}): max diff {diff.max()}, "
                        f"{(diff.max(axis=-1) > 0).mean():.2%} of pixels differ"
                    )
                # Cropped edge tiles are the visible part of the padded one.
                vis = src.read_tile(level, col, row)
                assert vis.shape == (
                    min(th, lv.size_px[1] - row * th),
                    min(tw, lv.size_px[0] - col * tw),
                    3,
                )
                assert np.array_equal(vis, want[: vis.shape[0], : vis.shape[1]])
                n += 1
            compared[level] = n
    return compared


def _assert_regions_equal(path: Path, n: int = 40, seed: int = 0) -> DirectTiffReader:
    """Random aligned and unaligned boxes (some leaving the image) equal OpenSlide's through the wrapper."""
    rng = np.random.default_rng(seed)
    ref = OpenSlideReader(path)
    reader = DirectTiffReader(path, OpenSlideReader(path))
    assert reader.direct is not None, reader.why_not
    for _ in range(n):
        level = int(rng.integers(reader.level_count))
        ds = reader.level_downsamples[level]
        w, h = reader.level_dimensions[level]
        x, y = int(rng.integers(0, w + 40)), int(rng.integers(0, h + 40))
        size = (int(rng.integers(1, 600)), int(rng.integers(1, 600)))
        l0 = (round(x * ds), round(y * ds))
        got = reader.read_region(l0, level, size)
        assert np.array_equal(got, ref.read_region(l0, level, size)), (level, l0, size)
    ref.close()
    return reader


# -- fixtures: one slide per format -------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Aperio SVS: JPEG YCbCr 4:2:0, 256 px tiles, 1800 x 1300 (partial edge tiles), 3 levels."""
    from pathology.synth import SynthParams, synthesize_slide

    path = tmp_path_factory.mktemp("direct") / "synth.svs"
    synthesize_slide(
        SynthParams.preset("p16_positive", width=1800, height=1300, mpp=0.25, seed=0), path
    )
    return path


@pytest.fixture(scope="module", params=["jpeg", "zlib", "lzw", "none"])
def generic_tiff(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generic tiled TIFF by tifffile: 900 x 700, 128 px tiles, 2 levels (subfiletype=1), mpp tags."""
    path = tmp_path_factory.mktemp("direct") / f"generic_{request.param}.tif"
    return write_generic_tiff(path, _image(700, 900), tile=128, levels=2, compression=request.param)


# -- equality with OpenSlide --------------------------------------------------------------------


def test_synthetic_svs_equals_openslide(synth_svs: Path) -> None:
    src = open_direct(synth_svs)
    assert src is not None, why_not(synth_svs)
    assert src.vendor == "aperio" and src.level_count == 3
    lv0 = src.levels[0]
    assert (lv0.compression, lv0.photometric, lv0.jpeg_colorspace) == ("jpeg", "ycbcr", "YCbCr")
    assert lv0.jpeg_subsampling == (2, 2)
    assert lv0.page == 0 and [lv.page for lv in src.levels[1:]] == [2, 3]  # page 1 = thumbnail
    src.close()
    compared = _assert_tiles_equal(synth_svs)
    assert compared == {0: 48, 1: 4, 2: 1}
    reader = _assert_regions_equal(synth_svs)
    assert reader.direct_reads > 0


@pytest.mark.realdata
def test_real_aperio_rgb_jpeg_equals_openslide(cmu1_path: Path) -> None:
    with open_direct(cmu1_path) as src:
        lv = src.levels[0]
        assert lv.tile_px == (240, 240) and lv.jpeg_tables
        # Aperio RGB JPEG: no JFIF/Adobe marker, component ids 0,1,2 -> libjpeg alone would
        # decode YCbCr; the Photometric tag says RGB and wins, as in OpenSlide.
        assert lv.photometric == "rgb" and lv.jpeg_colorspace == "RGB"
        assert lv.jpeg_stream_colorspace is not None and lv.jpeg_stream_colorspace.startswith(
            "YCbCr"
        )
        assert lv.jpeg_subsampling == (1, 1)
    assert _assert_tiles_equal(cmu1_path) == {0: 130}
    _assert_regions_equal(cmu1_path, n=20)


def test_generic_tiff_equals_openslide(generic_tiff: Path) -> None:
    with open_direct(generic_tiff) as src:
        assert src.vendor == "generic-tiff" and src.level_downsamples == (1.0, 2.0)
    assert _assert_tiles_equal(generic_tiff) == {0: 48, 1: 12}
    _assert_regions_equal(generic_tiff, n=25)


@pytest.mark.realdata
def test_openslide_fixture_boxes_tiff_equals_openslide() -> None:
    path = shared_file("openslide-python-fixtures/boxes.tiff")
    with open_direct(path) as src:
        assert src.vendor == "generic-tiff" and src.level_count == 4
        assert src.levels[0].compression == "deflate" and src.levels[0].predictor == 2
    compared = _assert_tiles_equal(path)
    # Level 2 (downsample 4.016) tile col 1 has no whole-pixel level-0 origin: wrapper territory.
    assert compared == {0: 20, 1: 6, 2: 1, 3: 1}
    reader = _assert_regions_equal(path, n=40)
    assert reader.fallback_reads > 0  # sub-pixel origins went to OpenSlide
    assert direct_support(path, 1) is None
    assert "not a whole number" in (direct_support(path, 2) or "")


def test_threads_share_one_source(synth_svs: Path) -> None:
    with open_direct(synth_svs) as src:
        cols, rows = src.levels[0].tiles_cr
        serial = [src.read_tile(0, k % cols, k // cols) for k in range(cols * rows)]
        results: dict[int, np.ndarray] = {}

        def work(start: int) -> None:
            for k in range(start, cols * rows, 2):
                results[k] = src.read_tile(0, k % cols, k // cols)

        threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(results[k], serial[k]) for k in range(cols * rows))


# -- missing tiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_sparse_generic_tiff_missing_tiles_are_white(tmp_path: Path, compression: str) -> None:
    path = write_generic_tiff(
        tmp_path / "sparse.tif", _image(300, 400), tile=128, levels=2, compression=compression
    )
    _patch_tile_entry(path, 0, 1, bytecount=0, offset=0)
    _patch_tile_entry(path, 1, 0, bytecount=0, offset=0)
    with open_direct(path) as src:
        assert (src.read_tile(0, 1, 0) == 255).all()
        assert src.read_tile(1, 0, 0).shape == (128, 128, 3)
    _assert_tiles_equal(path)
    _assert_regions_equal(path, n=15)


def test_aperio_missing_tiles_follow_openslide(tmp_path: Path, synth_svs: Path) -> None:
    path = tmp_path / "holes.svs"
    shutil.copy(synth_svs, path)
    # Level 0 col 3 row 0: transparent in OpenSlide. Level 1 (page 2) col 1 row 1: OpenSlide paints
    # it from level 0.
    _patch_tile_entry(path, 0, 3, bytecount=0)
    _patch_tile_entry(path, 2, 3, bytecount=0)
    with open_direct(path) as src:
        assert (src.read_tile(0, 3, 0) == 255).all()
        # OpenSlide paints level>=1 holes and the tiles over level-0 holes from the finer level.
        assert src.levels[0].synthesized == frozenset()
        assert src.levels[1].synthesized == {0, 3}
        assert src.levels[2].synthesized == {0}
        assert src.is_exact(1, (256, 0), (256, 256)) and not src.is_exact(1, (200, 0), (100, 10))
        with OpenSlideReader(path) as ref:  # ... so the stored tile is not what OpenSlide shows
            assert not np.array_equal(
                src.read_tile(1, 0, 0, pad=True), ref.read_region((0, 0), 1, (256, 256))
            )
    reader = _assert_regions_equal(path, n=40, seed=3)
    assert reader.fallback_reads > 0
    with OpenSlideReader(path) as ref:
        assert np.array_equal(
            reader.read_region((0, 0), 1, (450, 325)), ref.read_region((0, 0), 1, (450, 325))
        )


# -- corrupt tiles ------------------------------------------------------------------------------


def test_truncated_jpeg_tile_raises_tile_read_error(tmp_path: Path, synth_svs: Path) -> None:
    path = tmp_path / "truncated.svs"
    shutil.copy(synth_svs, path)
    with tifffile.TiffFile(path) as tif:
        nbytes = tif.pages[0].databytecounts[3]
    _patch_tile_entry(path, 0, 3, bytecount=nbytes // 2)
    with open_direct(path) as src:
        with pytest.raises(TileReadError, match=r"level 0, tile col 3, row 0") as info:
            src.read_tile(0, 3, 0)
        assert "\n" not in str(info.value) and "truncated" in str(info.value)
        src.read_tile(0, 2, 0)  # neighbours still read
    with OpenSlideReader(path) as ref, pytest.raises(TileReadError):
        ref.read_region((768, 0), 0, (256, 256))  # OpenSlide refuses it too


def test_garbled_jpeg_tile_raises_tile_read_error(tmp_path: Path, synth_svs: Path) -> None:
    path = tmp_path / "garbled.svs"
    shutil.copy(synth_svs, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[2]  # level 1
        offset, nbytes = page.dataoffsets[1], page.databytecounts[1]
    with path.open("r+b") as fh:
        fh.seek(offset + nbytes // 2)
        fh.write(bytes(range(256)) * 2)
    with (
        open_direct(path) as src,
        pytest.raises(TileReadError, match=r"level 1, tile col 1, row 0"),
    ):
        src.read_region(1, (200, 0), (100, 100))


# -- refusals -----------------------------------------------------------------------------------


def _refusal_cases(tmp: Path) -> Iterator[tuple[Path, str]]:
    img = _image(300, 400)
    yield DATA / "ihc.png", "not a TIFF"
    tifffile.imwrite(tmp / "strips.tif", img, photometric="rgb")
    yield tmp / "strips.tif", "not a format OpenSlide opens"
    tifffile.imwrite(tmp / "be.tif", img, photometric="rgb", tile=(128, 128), byteorder=">")
    yield tmp / "be.tif", "big-endian"
    with tifffile.TiffWriter(tmp / "subifd.tif") as tw:
        tw.write(img, photometric="rgb", tile=(128, 128), subifds=1, compression="jpeg")
        tw.write(
            img[::2, ::2], photometric="rgb", tile=(128, 128), subfiletype=1, compression="jpeg"
        )
    yield tmp / "subifd.tif", "SubIFD"
    tifffile.imwrite(tmp / "x.ome.tif", img, photometric="rgb", tile=(128, 128), ome=True)
    yield tmp / "x.ome.tif", "OME"
    tifffile.imwrite(tmp / "zstd.tif", img, photometric="rgb", tile=(128, 128), compression="zstd")
    yield tmp / "zstd.tif", "zstd"
    tifffile.imwrite(tmp / "gray.tif", img[..., 0], tile=(128, 128), compression="zlib")
    yield tmp / "gray.tif", "samples per pixel"
    tifffile.imwrite(
        tmp / "u16.tif", img.astype(np.uint16) * 257, photometric="rgb", tile=(128, 128)
    )
    yield tmp / "u16.tif", "bits per sample"
    tifffile.imwrite(
        tmp / "planar.tif",
        np.moveaxis(img, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        tile=(128, 128),
    )
    yield tmp / "planar.tif", "planar"


def test_unsupported_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    for path, reason in _refusal_cases(tmp_path):
        assert open_direct(path) is None, path.name
        why = why_not(path)
        assert why is not None and reason in why and "\n" not in why, (path.name, why)
        with pytest.raises(ValueError, match=reason):
            DirectTiffSource.open(path)


def test_reader_falls_back_to_base_when_refused(tmp_path: Path) -> None:
    base = open_slide(DATA / "ihc.png", mpp=0.5)
    reader = DirectTiffReader(DATA / "ihc.png", base)
    assert reader.direct is None and reader.why_not
    assert np.array_equal(
        reader.read_region((10, 20), 0, (64, 32)), base.read_region((10, 20), 0, (64, 32))
    )
    assert reader.mpp == 0.5 and reader.level_dimensions == base.level_dimensions


def test_supported_files_have_no_reason(synth_svs: Path, cmu1_path: Path) -> None:
    assert why_not(synth_svs) is None and why_not(cmu1_path) is None
    assert direct_support(synth_svs, 1) is None
    assert "not a whole number" in (direct_support(synth_svs, 2) or "")  # 1800/113 is not 16
    with pytest.raises(ValueError, match="level 5 out of range"), open_direct(synth_svs) as src:
        src.read_tile(5, 0, 0)
