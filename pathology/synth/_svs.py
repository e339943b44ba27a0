"""Aperio-style SVS writer: a streamed, tiled JPEG pyramid that OpenSlide opens as ``aperio``.

Layout, like slides from Aperio scanners::

    page 0   level 0, tiled 256 x 256 JPEG (YCbCr 4:2:0), description "Aperio Image Library ..."
    page 1   thumbnail, stripped JPEG (~1024 px)
    page 2.. reduced levels (downsample 4, 16, ... while > ~1000 px; at least 3 levels in all)
    page -2  label image, stripped LZW, NewSubfileType 1, description "...\\nlabel WxH"
    page -1  macro image, stripped JPEG, NewSubfileType 9, description "...\\nmacro WxH"

Level 0 arrives as an iterator of already-encoded tiles (the band renderers encode them in their
own threads with the same codec call tifffile would use), so the full image never sits in memory;
level 1 (downsample 4) is accumulated from the bands and the coarser levels come from it.

FAKE patient data, on purpose: the first-page description carries ``Filename``, ``Date``,
``Time``, ``User`` and ``Barcode`` fields and the label image shows a name, MRN and date of birth,
all from :data:`FAKE_PHI`. They are invented (no real person) and exist so the rest of the project
can test that identifying metadata and label/macro images never reach its outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "APERIO_HEADER",
    "FAKE_PHI",
    "TILE",
    "downsample4",
    "encode_tiles",
    "jpeg_round_trip",
    "write_svs",
]

TILE = 256
APERIO_HEADER = "Aperio Image Library v12.0.0"

#: Invented identifying fields written into every synthetic slide (description and label image).
FAKE_PHI: dict[str, str] = {
    "Filename": "DOE_JANE_1961-03-14",
    "Date": "03/14/24",
    "Time": "09:41:07",
    "User": "jane.doe-histotech",
    "Barcode": "MRN0042424242-S24-01234-A1",
    "PatientName": "DOE, JANE",
    "MRN": "0042424242",
    "DOB": "1961-03-14",
    "Accession": "S24-01234 A1",
}

RGB = NDArray[np.uint8]


def encode_tiles(band: RGB, quality: int) -> list[bytes]:
    """JPEG-encode a band of whole tile rows, row-major (the order tifffile expects).

    Parameters
    ----------
    band : ndarray (k * TILE, m * TILE, 3) uint8
    quality : int
        JPEG quality 1-100; YCbCr 4:2:0 like scanner output and tifffile's ``photometric='rgb'``.
    """
    import imagecodecs

    h, w = band.shape[:2]
    out: list[bytes] = []
    for r in range(0, h, TILE):
        for c in range(0, w, TILE):
            tile = imagecodecs.jpeg_encode(
                band[r : r + TILE, c : c + TILE],
                level=quality,
                subsampling=(2, 2),
                colorspace="RGB",
                outcolorspace="YCBCR",
            )
            out.append(bytes(tile))  # already bytes: no copy
    return out


def jpeg_round_trip(rgb: RGB, quality: int = 90) -> RGB:
    """``rgb`` (h, w, 3), both multiples of ``TILE``, as a scan's pixels after the SVS writer's
    JPEG (:func:`encode_tiles`: 256 px tiles, YCbCr 4:2:0) and a decoder: what scoring a written
    slide sees, as opposed to the raw render."""
    import imagecodecs

    h, w = rgb.shape[:2]
    if h % TILE or w % TILE:
        raise ValueError(f"image {h} x {w} px is not a whole number of {TILE} px tiles")
    blobs = iter(encode_tiles(rgb, quality))
    out = np.empty_like(rgb)
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            out[y : y + TILE, x : x + TILE] = imagecodecs.jpeg_decode(next(blobs))
    return out


def downsample4(img: RGB) -> RGB:
    """Box-filter by 4 in both axes (sizes must be multiples of 4), (h/4, w/4, 3) uint8."""
    _h, _w = img.shape[:2]
    rows = img[0::4].astype(np.uint16)
    for k in (1, 2, 3):
        rows += img[k::4]
    acc = rows[:, 0::4].copy()
    for k in (1, 2, 3):
        acc += rows[:, k::4]
    acc += 8
    acc >>= 4
    return acc.astype(np.uint8)


def _pad4(img: RGB) -> RGB:
    h, w = img.shape[:2]
    ph, pw = (-h) % 4, (-w) % 4
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else img


def _description(
    size: tuple[int, int], mpp: float, quality: int, app_mag: int, extra: dict[str, str]
) -> str:
    w, h = size
    fields = {
        "AppMag": str(app_mag),
        "StripeWidth": "2040",
        "ScanScope ID": "SYNTH-SS01",
        "Filename": FAKE_PHI["Filename"],
        "Date": FAKE_PHI["Date"],
        "Time": FAKE_PHI["Time"],
        "Time Zone": "GMT+01:00",
        "User": FAKE_PHI["User"],
        "Barcode": FAKE_PHI["Barcode"],
        "MPP": f"{mpp:.4f}",
        "Left": "25.000000",
        "Top": "18.000000",
        "LineCameraSkew": "0.000000",
        "LineAreaXOffset": "0.000000",
        "LineAreaYOffset": "0.000000",
        "Focus Offset": "0.000000",
        "OriginalWidth": str(w),
        "OriginalHeight": str(h),
        **extra,
    }
    head = f"{APERIO_HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    return head + "".join(f"|{k} = {v}" for k, v in fields.items())


def make_label(marker: str, seed: int) -> RGB:
    """Slide label photo (fake patient name, MRN, DOB, accession and a barcode), (400, 400, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (400, 400), (238, 236, 228))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=30)
        small = ImageFont.load_default(size=22)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        font = small = ImageFont.load_default()
    d.text((20, 18), FAKE_PHI["PatientName"], fill=(20, 20, 30), font=font)
    d.text((20, 60), f"MRN {FAKE_PHI['MRN']}", fill=(20, 20, 30), font=small)
    d.text((20, 90), f"DOB {FAKE_PHI['DOB']}", fill=(20, 20, 30), font=small)
    d.text((20, 120), FAKE_PHI["Accession"], fill=(20, 20, 30), font=small)
    d.text((20, 150), f"{marker.upper()}  #{seed}", fill=(120, 20, 20), font=small)
    rng = np.random.default_rng(seed)
    x = 30
    while x < 370:  # 1-D barcode: random bar widths, deterministic in the seed
        bw = int(rng.integers(2, 7))
        if rng.random() < 0.55:
            d.rectangle([x, 200, x + bw - 1, 370], fill=(10, 10, 10))
        x += bw
    return np.asarray(img)


def make_macro(thumb: RGB, label: RGB) -> RGB:
    """Macro camera photo of the whole glass slide: label on the left, tissue on the glass."""
    from PIL import Image

    W, H = 1280, 431
    img = Image.new("RGB", (W, H), (60, 60, 62))
    glass = Image.new("RGB", (W - 20, H - 20), (226, 228, 230))
    img.paste(glass, (10, 10))
    lab = Image.fromarray(label).resize((H - 40, H - 40)).rotate(90)
    img.paste(lab, (20, 20))
    th, tw = thumb.shape[:2]
    box_w, box_h = W - H - 40, H - 60
    s = min(box_w / tw, box_h / th)
    t = Image.fromarray(thumb).resize((max(1, int(tw * s)), max(1, int(th * s))))
    img.paste(t, (H + 10 + (box_w - t.width) // 2, 30 + (box_h - t.height) // 2))
    return np.asarray(img)


def _resize(img: RGB, size: tuple[int, int]) -> RGB:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


def write_svs(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int],
    mpp: float,
    quality: int,
    bands: Iterable[tuple[list[bytes], RGB]],
    marker: str,
    seed: int,
    extra_description: dict[str, str] | None = None,
    on_band: Callable[[], None] | None = None,
) -> int:
    """Write an Aperio-style pyramid.

    Parameters
    ----------
    path : path-like
        Output file (written as is; the caller handles temp names and overwrite policy).
    size : (w, h)
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel (``MPP`` and ``AppMag = round(10 / mpp)`` in the description).
    quality : int
        JPEG quality of every tiled level and the thumbnail.
    bands : iterable of (tiles, reduced)
        In order from the top: JPEG tiles of whole tile rows (row-major, level-0 width rounded up
        to whole tiles) and that band box-filtered by 4, ``(rows/4, ceil(w_tiles*256/4), 3)``.
    on_band : callable, optional
        Called after each band is consumed (progress).

    Returns
    -------
    int
        Number of pyramid levels written.
    """
    import tifffile

    w, h = size
    mag = max(1, round(10.0 / mpp))
    desc0 = _description(size, mpp, quality, mag, extra_description or {})
    tiles_x, tiles_y = -(-w // TILE), -(-h // TILE)
    l1_w, l1_h = -(-w // 4), -(-h // 4)
    level1 = np.empty((tiles_y * TILE // 4, tiles_x * TILE // 4, 3), np.uint8)
    res = 1e4 / mpp  # pixels per cm, for readers that use the TIFF resolution tags
    bigtiff = (
        w * h * 3 > 2**32 - 2**28
    )  # 4 GiB of raw pixels can exceed a classic TIFF even as JPEG

    def tile_stream() -> Iterator[bytes]:
        row = 0
        for tiles, reduced in bands:
            level1[row : row + reduced.shape[0]] = reduced
            row += reduced.shape[0]
            yield from tiles
            if on_band is not None:
                on_band()
        if row != level1.shape[0]:
            raise RuntimeError(
                f"bands covered {row * 4} rows of level 0, expected {tiles_y * TILE}"
            )

    common = {
        "photometric": "rgb",
        "metadata": None,
        "software": False,
        "resolution": (res, res),
        "resolutionunit": "CENTIMETER",
    }
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(
            tile_stream(),
            shape=(h, w, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            description=desc0,
            **common,
            **jpeg,
        )
        l1 = np.ascontiguousarray(level1[:l1_h, :l1_w])
        # Thumbnail: ~1024 px on the long side, stripped, second page (OpenSlide's "thumbnail").
        s = min(1.0, 1024 / max(l1_w, l1_h))
        tsize = (max(1, round(l1_w * s)), max(1, round(l1_h * s)))
        thumb = _resize(l1, tsize) if tsize != (l1_w, l1_h) else l1
        tw.write(
            thumb,
            description=f"{APERIO_HEADER} \n{w}x{h} -> {tsize[0]}x{tsize[1]} - |"
            + desc0.split("|", 1)[1],
            rowsperstrip=16,
            **common,
            **jpeg,
        )
        levels = [l1]
        while len(levels) < 2 or max(levels[-1].shape[:2]) > 1000:
            levels.append(
                downsample4(_pad4(levels[-1]))[
                    : -(-levels[-1].shape[0] // 4), : -(-levels[-1].shape[1] // 4)
                ]
            )
        for lvl in levels:
            lh, lw = lvl.shape[:2]
            d = f"{APERIO_HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) -> {lw}x{lh} JPEG/RGB Q={quality}"
            tw.write(lvl, tile=(TILE, TILE), description=d, maxworkers=2, **common, **jpeg)
        label = make_label(marker, seed)
        tw.write(
            label,
            description=f"{APERIO_HEADER} \nlabel {label.shape[1]}x{label.shape[0]}",
            subfiletype=1,
            compression="lzw",
            photometric="rgb",
            metadata=None,
            software=False,
        )
        macro = make_macro(thumb, label)
        tw.write(
            macro,
            description=f"{APERIO_HEADER} \nmacro {macro.shape[1]}x{macro.shape[0]}",
            subfiletype=9,
            photometric="rgb",
            metadata=None,
            software=False,
            rowsperstrip=16,
            **jpeg,
        )
    return 1 + len(levels)


def tile_rows_for(width: int, target_px: float = 8e6) -> int:
    """Tile rows per band so a band holds ~``target_px`` pixels (bounded memory at any width)."""
    return max(1, min(8, int(target_px // (math.ceil(width / TILE) * TILE * TILE))))
