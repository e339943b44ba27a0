"""Direct tile path for TIFF-family slides: native tiles decoded straight from the file bytes.

OpenSlide stays the universal reader. For the two TIFF layouts whose pyramid levels are plain
top-level TIFF pages (Aperio SVS, generic tiled TIFF) this module reads the same native tiles
without libopenslide's compositing (cairo, tile cache, ARGB conversion), which is most of
OpenSlide's time per tile, and returns the pixels OpenSlide returns:

- JPEG tiles are decoded by libjpeg-turbo (imagecodecs) with the page's JPEGTables and with the
  colour space forced from the TIFF ``Photometric`` tag, exactly as OpenSlide's JPEG fast path
  does: ``RGB`` means the JPEG components are R, G, B (Aperio writes such tiles with no Adobe or
  JFIF marker, so libjpeg alone would guess YCbCr and shift every colour), ``YCbCr`` means they
  go through the YCbCr -> RGB transform.
- deflate / LZW / uncompressed tiles are unpacked (horizontal predictor undone) like libtiff does.
- The part of an edge tile beyond the image, regions outside the image and missing tiles
  (TileByteCounts 0, as sparse TIFFs have) are white: OpenSlide leaves them transparent and
  :class:`~pathology.slide.OpenSlideReader` composites transparency on white.

:meth:`DirectTiffSource.read_jpeg` also hands out a JPEG tile's bytes as one standalone JPEG
stream (tables merged, colour space stated by an Adobe APP14 marker), for decoders that take no
TIFF side information, such as nvJPEG (:mod:`pathology.tiling._jpeg`).

Anything this module cannot reproduce exactly is refused at open time (:func:`why_not` says why)
or, per region, left to OpenSlide by :class:`DirectTiffReader`: sub-pixel level origins (OpenSlide
interpolates those) and Aperio tiles OpenSlide synthesises from a finer level (zero-length tiles
at levels >= 1 and the tiles covering them).

Coordinate planes (as in :mod:`pathology.slide`):

- ``l0_xy``: (x, y) level-0 pixel position, OpenSlide's ``read_region`` frame.
- ``level_xy``: (x, y) pixel position within pyramid level ``level``.
- ``tile_cr``: (col, row) index of a native TIFF tile of a level; tile (c, r) covers level pixels
  ``[c*tile_w, (c+1)*tile_w) x [r*tile_h, (r+1)*tile_h)``.
- ``size_px``: (w, h) in pixels of the level read.

Thread safety: one file descriptor opened once and read with ``os.pread`` (no shared file
position), decoders that release the GIL; any number of threads may call :meth:`read_tile` and
:meth:`read_region` on one :class:`DirectTiffSource` without locks.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np
from numpy.typing import NDArray

from pathology.errors import TileReadError
from pathology.slide import _ReaderBase  # shared geometry, mpp, thumbnail and context manager

if TYPE_CHECKING:
    from pathology.slide import SlideInfo, SlideReader

__all__ = [
    "DirectLevel",
    "DirectTiffReader",
    "DirectTiffSource",
    "direct_support",
    "open_direct",
    "why_not",
]

#: OpenSlide vendors whose levels are exactly the tiled top-level TIFF pages.
_VENDORS = ("aperio", "generic-tiff")

#: TIFF Compression codes decoded here -> name. 32946 is the pre-standard deflate code.
_CODECS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate"}
_KNOWN_REFUSED = {
    6: "old-style JPEG (6)",
    33003: "Aperio JPEG 2000 YCbCr (33003)",
    33005: "Aperio JPEG 2000 RGB (33005)",
    34712: "JPEG 2000 (34712)",
    50000: "zstd (50000)",
    50001: "WebP (50001)",
    50002: "JPEG XL (50002)",
}
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
_EOI = b"\xff\xd9"


class _Refused(Exception):
    """Internal: the file is not one the direct path reproduces exactly (message = reason)."""


@dataclass(frozen=True, eq=False)
class DirectLevel:
    """One pyramid level = one tiled TIFF page.

    Attributes
    ----------
    page : int
        Index of the TIFF page (IFD) holding the level.
    size_px : (w, h)
        Level size in pixels.
    tile_px : (w, h)
        Native tile size in pixels.
    tiles_cr : (cols, rows)
        Tiles across and down.
    compression : str
        ``jpeg``, ``deflate``, ``lzw`` or ``none``.
    photometric : str
        ``rgb`` or ``ycbcr`` (TIFF Photometric tag).
    predictor : int
        1 (none) or 2 (horizontal differencing; deflate/LZW only).
    jpeg_tables : bytes or None
        Abbreviated tables-only JPEG stream (TIFF tag 347) shared by the tiles, if any.
    jpeg_colorspace : str or None
        Colour space the JPEG samples are decoded as, ``RGB`` or ``YCbCr``: taken from
        ``photometric`` like OpenSlide does, whatever the stream's own markers say.
    jpeg_stream_colorspace : str or None
        What the first tile's JPEG stream itself signals, and by which marker (``"YCbCr (JFIF)"``,
        ``"RGB (Adobe APP14 transform 0)"``, ``"YCbCr (libjpeg default for component ids 0,1,2)"``);
        differs from ``jpeg_colorspace`` on Aperio RGB-JPEG slides.
    jpeg_subsampling : (int, int) or None
        Luma sampling factors (h, v) over chroma: (2, 2) is 4:2:0, (1, 1) is 4:4:4.
    offsets, bytecounts : ndarray (rows * cols,) int64
        File offset and length of each tile, row-major; bytecount 0 = missing tile.
    synthesized : frozenset of int
        Row-major tile numbers OpenSlide does not draw from this page (Aperio zero-length tiles at
        levels >= 1 and the coarser tiles over them, which it paints by scaling a finer level).
    """

    page: int
    size_px: tuple[int, int]
    tile_px: tuple[int, int]
    tiles_cr: tuple[int, int]
    compression: str
    photometric: str
    predictor: int
    jpeg_tables: bytes | None
    jpeg_colorspace: str | None
    jpeg_stream_colorspace: str | None
    jpeg_subsampling: tuple[int, int] | None
    offsets: NDArray[np.int64]
    bytecounts: NDArray[np.int64]
    synthesized: frozenset[int]


class DirectTiffSource:
    """Native tiles of an Aperio SVS or generic tiled TIFF, decoded straight from the file.

    Open with :func:`open_direct` (returns None for files it cannot reproduce exactly) or
    :meth:`open` (raises ``ValueError`` with the reason).

    Attributes
    ----------
    path : Path
        The slide file.
    vendor : str
        ``aperio`` or ``generic-tiff`` (OpenSlide's name for the layout).
    levels : tuple of DirectLevel
        One per OpenSlide level, same order.
    level_dimensions : tuple of (w, h)
        Pixel size of each level (equal to OpenSlide's, verified at open).
    level_downsamples : tuple of float
        OpenSlide's level-0 px per level px (used to map ``l0_xy`` exactly like OpenSlide).
    """

    def __init__(
        self,
        path: Path,
        vendor: str,
        levels: tuple[DirectLevel, ...],
        level_downsamples: tuple[float, ...],
    ) -> None:
        self.path = path
        self.vendor = vendor
        self.levels = levels
        self.level_dimensions = tuple(lv.size_px for lv in levels)
        self.level_downsamples = level_downsamples
        # O_CLOEXEC: worker processes forked later must not inherit a descriptor per slide.
        self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    @classmethod
    def open(cls, path: str | os.PathLike[str], info: SlideInfo | None = None) -> DirectTiffSource:
        """Open ``path``; raise ``ValueError`` with the reason when it cannot be read exactly.

        Parameters
        ----------
        path : path-like
            Slide file.
        info : SlideInfo, optional
            OpenSlide's description of the same file (``OpenSlideReader.info``), to check the
            levels against without opening a second OpenSlide handle.
        """
        try:
            return _probe(Path(path), info)
        except _Refused as exc:
            raise ValueError(f"{os.fspath(path)}: no direct tile path: {exc}") from None

    @property
    def level_count(self) -> int:
        return len(self.levels)

    # -- tiles --------------------------------------------------------------------------------

    def read_tile(self, level: int, col: int, row: int, *, pad: bool = False) -> NDArray[np.uint8]:
        """Decode native tile (``col``, ``row``) of ``level``.

        Parameters
        ----------
        level : int
            Pyramid level.
        col, row : int
            Tile index (``tile_cr``).
        pad : bool
            Keep the full native tile size for edge tiles, white beyond the image (what
            ``OpenSlideReader.read_region`` returns for the tile's box); by default edge tiles are
            cropped to the image.

        Returns
        -------
        ndarray (h, w, 3) uint8
            ``(tile_h, tile_w)`` inside the image; less at the right/bottom edge unless ``pad``.
            Missing tiles are white. May be a read-only view; copy before writing into it.

        Raises
        ------
        TileReadError
            The tile's bytes cannot be read or decoded (message names level, col, row).
        """
        lv = self._level(level)
        cols, rows = lv.tiles_cr
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(
                f"tile (col {col}, row {row}) outside level {level}'s {cols}x{rows} tiles"
            )
        tw, th = lv.tile_px
        w, h = lv.size_px
        vis_w, vis_h = min(tw, w - col * tw), min(th, h - row * th)
        tile = self._decode(level, lv, col, row)
        if tile is None:
            return np.full((th, tw, 3) if pad else (vis_h, vis_w, 3), 255, np.uint8)
        if vis_w == tw and vis_h == th:
            return tile
        if not pad:
            return tile[:vis_h, :vis_w]
        out = np.full((th, tw, 3), 255, np.uint8)
        out[:vis_h, :vis_w] = tile[:vis_h, :vis_w]
        return out

    def read_jpeg(self, level: int, col: int, row: int) -> bytes | None:
        """The compressed bytes of native tile (``col``, ``row``) as one standalone JPEG stream.

        For decoders that take a whole JPEG file and no TIFF side information: nvJPEG
        (:func:`pathology.tiling._jpeg.decode_jpeg_batch` on CUDA), plain libjpeg. The stream is
        the tile's own with the page's JPEGTables merged in, and its colour space stated in the
        stream: any JFIF / Adobe marker of the tile is dropped and an Adobe APP14 marker with
        transform 0 (``Photometric`` RGB: the components are R, G, B) or 1 (YCbCr) is inserted,
        so a standard decoder gives the pixels :meth:`read_tile` gives.

        Parameters
        ----------
        level : int
            Pyramid level; its tiles must be JPEG.
        col, row : int
            Tile index (``tile_cr``).

        Returns
        -------
        bytes or None
            A complete JPEG (SOI ... EOI) of the full native tile size, edge tiles included
            (the part beyond the image is whatever the scanner encoded there); None for a
            missing tile (TileByteCounts 0), which :meth:`read_tile` paints white.

        Raises
        ------
        ValueError
            The level's tiles are not JPEG (deflate, LZW, uncompressed).
        TileReadError
            The tile is truncated (no end-of-image marker) or its header cannot be parsed.
        """
        lv = self._level(level)
        if lv.compression != "jpeg":
            raise ValueError(
                f"{self.path}: level {level} tiles are {lv.compression}, not JPEG: "
                "no JPEG stream to hand to a JPEG decoder (use read_tile)"
            )
        cols, rows = lv.tiles_cr
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(
                f"tile (col {col}, row {row}) outside level {level}'s {cols}x{rows} tiles"
            )
        data = self._tile_bytes(level, lv, col, row)
        if data is None:
            return None
        try:
            return _standalone_jpeg(data, lv.jpeg_tables, rgb=lv.jpeg_colorspace == "RGB")
        except ValueError as exc:
            tw, th = lv.tile_px
            raise TileReadError(
                self.path,
                f"level {level}, tile col {col}, row {row} (level px x={col * tw}, y={row * th}): "
                f"{exc}",
            ) from None

    def read_region(
        self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """Pixels of ``level`` in the box at ``level_xy`` of ``size_px``, assembled from native tiles.

        Any integer origin and size; the box may leave the image (outside is white). A box that
        is exactly one whole native tile is returned without a copy.

        Parameters
        ----------
        level : int
            Pyramid level.
        level_xy : (int, int)
            Top-left corner in level pixels (may be negative).
        size_px : (int, int)
            (w, h) in level pixels.

        Returns
        -------
        ndarray (h, w, 3) uint8
            Equal to ``OpenSlideReader.read_region((x * ds, y * ds), level, (w, h))`` whenever
            OpenSlide maps that origin to exactly ``(x, y)`` and :meth:`is_exact` holds.
        """
        lv = self._level(level)
        x, y = int(level_xy[0]), int(level_xy[1])
        w, h = int(size_px[0]), int(size_px[1])
        if w < 0 or h < 0:
            raise ValueError(f"region size must be non-negative, got {w}x{h}")
        tw, th = lv.tile_px
        lw, lh = lv.size_px
        if x % tw == 0 and y % th == 0 and w == tw and h == th and x + w <= lw and y + h <= lh:
            return self.read_tile(level, x // tw, y // th)  # hot path: one whole tile
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._decode(level, lv, col, row)
                if tile is None:
                    continue  # missing: stays white
                # Intersection of this tile with the wanted box, in level pixels.
                ax0, ay0 = max(x0, col * tw), max(y0, row * th)
                ax1, ay1 = min(x1, (col + 1) * tw), min(y1, (row + 1) * th)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                    ay0 - row * th : ay1 - row * th, ax0 - col * tw : ax1 - col * tw
                ]
        return out

    def is_exact(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> bool:
        """Whether :meth:`read_region` of this box equals OpenSlide's pixels (no synthesized tile)."""
        lv = self._level(level)
        if not lv.synthesized:
            return True
        tw, th = lv.tile_px
        cols, rows = lv.tiles_cr
        x, y = int(level_xy[0]), int(level_xy[1])
        w, h = int(size_px[0]), int(size_px[1])
        c0, r0 = max(x, 0) // tw, max(y, 0) // th
        c1, r1 = min(x + w - 1, cols * tw - 1) // tw, min(y + h - 1, rows * th - 1) // th
        return not any(
            r * cols + c in lv.synthesized for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)
        )

    # -- internals ----------------------------------------------------------------------------

    def _level(self, level: int) -> DirectLevel:
        if not 0 <= level < len(self.levels):
            raise ValueError(
                f"level {level} out of range 0..{len(self.levels) - 1} for {self.path}"
            )
        return self.levels[level]

    def _tile_fail(
        self, level: int, lv: DirectLevel, col: int, row: int, problem: str
    ) -> TileReadError:
        tw, th = lv.tile_px
        return TileReadError(
            self.path,
            f"level {level}, tile col {col}, row {row} (level px x={col * tw}, y={row * th}): {problem}",
        )

    def _tile_bytes(self, level: int, lv: DirectLevel, col: int, row: int) -> bytes | None:
        """The tile's stored bytes, or None for a missing tile; JPEG tiles checked for truncation."""
        k = row * lv.tiles_cr[0] + col
        nbytes = int(lv.bytecounts[k])
        if nbytes == 0:
            return None
        if self._fd is None:
            raise ValueError(f"{self.path}: direct source is closed")
        data = os.pread(self._fd, nbytes, int(lv.offsets[k]))
        if len(data) != nbytes:
            raise self._tile_fail(
                level,
                lv,
                col,
                row,
                f"file ends inside the tile ({len(data)} of {nbytes} bytes); truncated copy?",
            )
        # libjpeg treats data that ends early as a warning and fills the rest of the tile;
        # OpenSlide turns that warning into an error, so must we (truncated tiles).
        if (
            lv.compression == "jpeg"
            and not data.endswith(_EOI)
            and not data.rstrip(b"\0").endswith(_EOI)
        ):
            raise self._tile_fail(level, lv, col, row, "truncated JPEG (no end-of-image marker)")
        return data

    def _decode(self, level: int, lv: DirectLevel, col: int, row: int) -> NDArray[np.uint8] | None:
        """Full native tile (tile_h, tile_w, 3) uint8, or None for a missing tile."""
        data = self._tile_bytes(level, lv, col, row)
        if data is None:
            return None
        tw, th = lv.tile_px
        try:
            if lv.compression == "jpeg":
                tile = imagecodecs.jpeg8_decode(
                    data, tables=lv.jpeg_tables, colorspace=lv.jpeg_colorspace, outcolorspace="RGB"
                )
            else:
                tile = _unpack(data, lv)
        except Exception as exc:  # imagecodecs raises codec-specific RuntimeError subclasses
            raise self._tile_fail(
                level, lv, col, row, f"cannot decode {lv.compression} data ({_one_line(exc)})"
            ) from exc
        if tile.shape != (th, tw, 3) or tile.dtype != np.uint8:
            raise self._tile_fail(
                level,
                lv,
                col,
                row,
                f"decoded {tile.shape} {tile.dtype}, expected ({th}, {tw}, 3) uint8",
            )
        return tile

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DirectTiffSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        lv = self.levels[0]
        return (
            f"<DirectTiffSource {self.path.name} {self.vendor} {self.level_count} levels "
            f"{lv.compression}/{lv.photometric} tiles {lv.tile_px[0]}x{lv.tile_px[1]}>"
        )


def _unpack(data: bytes, lv: DirectLevel) -> NDArray[np.uint8]:
    """Decompress a deflate / LZW / raw tile into (tile_h, tile_w, 3) uint8, predictor undone."""
    tw, th = lv.tile_px
    n = tw * th * 3
    if lv.compression == "deflate":
        try:
            raw: bytes | bytearray = imagecodecs.zlib_decode(data, out=n)
        except imagecodecs.ZlibError:
            # A stream longer than the tile (libtiff just stops reading): decode all, keep n bytes.
            raw = imagecodecs.zlib_decode(data)
    elif lv.compression == "lzw":
        raw = imagecodecs.lzw_decode(data, out=n)
    else:
        raw = data
    if len(raw) < n:
        raise ValueError(f"tile holds {len(raw)} bytes, expected {n}")
    tile = np.frombuffer(raw, np.uint8, count=n).reshape(th, tw, 3)
    if lv.predictor == 2:
        # Horizontal differencing: each sample is stored as the difference to the sample of the
        # same channel one pixel left; a running sum modulo 256 undoes it (libtiff's horAcc8).
        tile = np.cumsum(tile, axis=1, dtype=np.uint8)
    return tile


#: JPEG markers that stand alone (no length field): TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])


def _jpeg_header_segments(data: bytes) -> tuple[list[bytes], int]:
    """Marker segments (each ``FF xx`` + length + payload) of a JPEG stream's header after SOI,
    and the offset where the header ends (the SOS marker, or EOI in a tables-only stream)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("JPEG data does not start with SOI")
    segments: list[bytes] = []
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            raise ValueError(f"JPEG header: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
            return segments, i
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if i + 4 > n:
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if end > n:
            break
        segments.append(data[i:end])
        i = end
    raise ValueError("JPEG header ends before its start-of-scan marker")


def _is_colour_marker(segment: bytes) -> bool:
    """A JFIF APP0 or Adobe APP14 segment: the in-stream colour-space signals libjpeg reads."""
    return (segment[1] == 0xE0 and segment[4:9] == b"JFIF\x00") or (
        segment[1] == 0xEE and segment[4:9] == b"Adobe"
    )


def _adobe_app14(transform: int) -> bytes:
    """Adobe APP14 segment: ``FF EE``, length 14, ``"Adobe"``, version 100, flags0 0, flags1 0,
    then the colour transform (0: components are RGB / CMYK as is, 1: YCbCr, 2: YCCK)."""
    payload = b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes([transform])
    return b"\xff\xee" + (len(payload) + 2).to_bytes(2, "big") + payload


def _standalone_jpeg(data: bytes, tables: bytes | None, *, rgb: bool) -> bytes:
    """One self-contained JPEG from a TIFF tile's (possibly abbreviated) stream.

    SOI, an Adobe APP14 marker stating the colour space (transform 0 for ``rgb``, else 1), the
    JPEGTables' segments (DQT, DHT, ...), the tile's own header segments (which come later, so a
    table the tile redefines wins, as when libjpeg reads the tables stream first), then the tile
    from its SOS on, with any padding after EOI dropped. JFIF and Adobe segments of the inputs
    are dropped: libjpeg lets a JFIF marker override APP14, and two APP14s would be ambiguous.
    """
    tile_segments, sos = _jpeg_header_segments(data)
    table_segments = _jpeg_header_segments(tables)[0] if tables else []
    body = data[sos:]
    if not body.endswith(_EOI):
        body = body.rstrip(b"\0")
    parts = [b"\xff\xd8", _adobe_app14(0 if rgb else 1)]
    parts += [seg for seg in (*table_segments, *tile_segments) if not _is_colour_marker(seg)]
    parts.append(body)
    return b"".join(parts)


# -- opening ----------------------------------------------------------------------------------


def open_direct(
    path: str | os.PathLike[str], info: SlideInfo | None = None
) -> DirectTiffSource | None:
    """A :class:`DirectTiffSource` for ``path``, or None when the direct path cannot be exact.

    Parameters
    ----------
    path : path-like
        Slide file.
    info : SlideInfo, optional
        ``OpenSlideReader.info`` of the same file (avoids opening OpenSlide a second time).

    Returns
    -------
    DirectTiffSource or None
        None for anything but a little-endian Aperio SVS or generic tiled TIFF whose level pages
        are 8-bit RGB/YCbCr JPEG, deflate, LZW or uncompressed tiles; :func:`why_not` says why.
    """
    try:
        return _probe(Path(path), info)
    except _Refused:
        return None


def why_not(path: str | os.PathLike[str], info: SlideInfo | None = None) -> str | None:
    """Why :func:`open_direct` refuses ``path`` (one line), or None when it would open it."""
    try:
        _probe(Path(path), info).close()
    except _Refused as exc:
        return str(exc)
    return None


def direct_support(path: str | os.PathLike[str], level: int | None = None) -> str | None:
    """None when the direct path serves ``path`` (at ``level``, if given); else why not, one line.

    A level whose OpenSlide downsample is not a whole number is refused: a tiler places tiles at
    ``l0 = round(level_x * downsample)``, which OpenSlide maps back to a fractional level pixel
    and interpolates, so nearly every read would fall back to OpenSlide anyway.
    """
    try:
        with _probe(Path(path), None) as source:
            if level is None:
                return None
            if not 0 <= level < source.level_count:
                return f"level {level} out of range 0..{source.level_count - 1}"
            ds = source.level_downsamples[level]
            if not float(ds).is_integer():
                return (
                    f"level {level} downsample {ds:.6g} is not a whole number (OpenSlide interpolates "
                    "sub-pixel origins there)"
                )
            return None
    except _Refused as exc:
        return str(exc)


def _probe(path: Path, info: SlideInfo | None) -> DirectTiffSource:
    if not path.is_file():
        raise _Refused("not a file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:2] == b"MM":
        raise _Refused("big-endian TIFF")
    if head not in (b"II*\x00", b"II+\x00"):
        raise _Refused("not a TIFF file")
    vendor, ref_dims, ref_downs, ref_tiles = _openslide_reference(path, info)
    if vendor not in _VENDORS:
        raise _Refused(
            f"OpenSlide reads it as {vendor!r}; only {' and '.join(_VENDORS)} map TIFF pages onto levels"
        )

    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise _Refused(f"tifffile cannot parse it ({_one_line(exc)})") from None
    with tif:
        if tif.is_ome:
            raise _Refused("OME-TIFF (levels may live in SubIFDs and channels in pages)")
        pages: list[tifffile.TiffPage] = []
        for i in range(len(tif.pages)):
            page = tif.pages[i]  # parses the IFD's tags only; no pixel data is read
            if not isinstance(page, tifffile.TiffPage):  # pragma: no cover - frames are opt-in
                raise _Refused(f"page {i} could not be parsed as a TIFF page")
            pages.append(page)
        if any(getattr(p, "subifds", None) for p in pages):
            raise _Refused("SubIFD pyramid (OpenSlide does not read SubIFDs as levels)")
        if vendor == "aperio":
            # Every tiled directory is a level, in file order; the stripped ones (thumbnail,
            # label, macro) are associated images and are never touched here.
            level_pages = [i for i, p in enumerate(pages) if p.is_tiled]
        else:
            # generic-tiff: page 0 and tiled reduced-resolution pages, widest first.
            level_pages = [
                i for i, p in enumerate(pages) if p.is_tiled and (i == 0 or int(p.subfiletype) & 1)
            ]
            widths = [pages[i].imagewidth for i in level_pages]
            if len(set(widths)) != len(widths):
                raise _Refused("two level pages share a width (OpenSlide's order is ambiguous)")
            level_pages.sort(key=lambda i: -pages[i].imagewidth)
        levels = [_level_of(path, pages[i], i) for i in level_pages]

    dims = tuple(lv.size_px for lv in levels)
    if dims != ref_dims:
        raise _Refused(
            f"TIFF level pages {list(dims)} do not match OpenSlide's levels {list(ref_dims)}"
        )
    for i, (lv, ref) in enumerate(zip(levels, ref_tiles, strict=True)):
        if ref is not None and ref != lv.tile_px:
            raise _Refused(f"level {i} tile size {lv.tile_px} differs from OpenSlide's {ref}")
    if vendor == "aperio":
        levels = _mark_synthesized(levels)
    return DirectTiffSource(path, vendor, tuple(levels), ref_downs)


def _openslide_reference(
    path: Path, info: SlideInfo | None
) -> tuple[str, tuple[tuple[int, int], ...], tuple[float, ...], list[tuple[int, int] | None]]:
    """OpenSlide's vendor, level sizes, downsamples and tile sizes for ``path``."""
    if info is not None:
        props = info.properties
        dims, downs, vendor = info.level_dimensions, info.level_downsamples, info.vendor
    else:
        import openslide

        try:
            if openslide.OpenSlide.detect_format(str(path)) is None:
                raise _Refused("not a format OpenSlide opens")
            with openslide.OpenSlide(str(path)) as osr:
                props = dict(osr.properties)
                dims = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
                downs = tuple(float(d) for d in osr.level_downsamples)
        except openslide.OpenSlideError as exc:
            raise _Refused(f"OpenSlide cannot open it ({_one_line(exc)})") from None
        vendor = props.get("openslide.vendor", "unknown")
    tiles: list[tuple[int, int] | None] = []
    for i in range(len(dims)):
        tw, th = (
            props.get(f"openslide.level[{i}].tile-width"),
            props.get(f"openslide.level[{i}].tile-height"),
        )
        tiles.append((int(tw), int(th)) if tw and th else None)
    return vendor, dims, downs, tiles


def _level_of(path: Path, page: Any, index: int) -> DirectLevel:
    """Check one tiled page and describe it; raise :class:`_Refused` with the first problem."""
    where = f"page {index}"
    code = int(page.compression)
    if code not in _CODECS:
        name = _KNOWN_REFUSED.get(code, f"compression {code}")
        raise _Refused(f"{where}: {name} tiles (direct path decodes JPEG, deflate, LZW, none)")
    compression = _CODECS[code]
    checks = [
        (int(page.planarconfig) == 1, "planar configuration is not contiguous (chunky)"),
        (int(page.bitspersample) == 8, f"{page.bitspersample} bits per sample, expected 8"),
        (
            int(page.samplesperpixel) == 3 and not page.extrasamples,
            f"{page.samplesperpixel} samples per pixel, expected 3 (RGB, no alpha)",
        ),
        (int(page.sampleformat) == 1, "sample format is not unsigned integer"),
        (int(page.fillorder) == 1, "fill order is not MSB-first"),
        (
            int(getattr(page, "imagedepth", 1)) == 1 and int(getattr(page, "tiledepth", 1)) == 1,
            "volumetric tiles",
        ),
        (_tag(page, "Orientation", 1) == 1, "orientation is not top-left"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _Refused(f"{where}: {problem}")
    photometric = int(page.photometric)
    allowed = (
        (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR) if compression == "jpeg" else (_PHOTOMETRIC_RGB,)
    )
    if photometric not in allowed:
        raise _Refused(f"{where}: photometric {photometric} with {compression} tiles")
    predictor = int(page.predictor)
    if predictor not in (1, 2) or (predictor == 2 and compression not in ("deflate", "lzw")):
        raise _Refused(f"{where}: predictor {predictor} with {compression} tiles")

    tw, th = int(page.tilewidth), int(page.tilelength)
    w, h = int(page.imagewidth), int(page.imagelength)
    if tw <= 0 or th <= 0 or w <= 0 or h <= 0:
        raise _Refused(f"{where}: empty image or tile size")
    cols, rows = -(-w // tw), -(-h // th)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape != (cols * rows,) or counts.shape != (cols * rows,):
        raise _Refused(f"{where}: {offsets.size} tile offsets for {cols}x{rows} tiles")

    tables = jpeg_cs = stream_cs = None
    subsampling = None
    if compression == "jpeg":
        tables = bytes(page.jpegtables) if page.jpegtables else None
        jpeg_cs = "RGB" if photometric == _PHOTOMETRIC_RGB else "YCbCr"
        stream_cs, subsampling = _jpeg_stream_info(path, tables, offsets, counts, where)
    return DirectLevel(
        page=index,
        size_px=(w, h),
        tile_px=(tw, th),
        tiles_cr=(cols, rows),
        compression=compression,
        photometric="rgb" if photometric == _PHOTOMETRIC_RGB else "ycbcr",
        predictor=predictor,
        jpeg_tables=tables,
        jpeg_colorspace=jpeg_cs,
        jpeg_stream_colorspace=stream_cs,
        jpeg_subsampling=subsampling,
        offsets=offsets,
        bytecounts=counts,
        synthesized=frozenset(),
    )


def _tag(page: Any, name: str, default: int) -> int:
    tag = page.tags.get(name)
    return int(tag.value) if tag is not None else default


def _jpeg_stream_info(
    path: Path,
    tables: bytes | None,
    offsets: NDArray[np.int64],
    counts: NDArray[np.int64],
    where: str,
) -> tuple[str, tuple[int, int]]:
    """Colour signalling and chroma subsampling of the first non-empty tile's JPEG header."""
    nonempty = np.flatnonzero(counts)
    if nonempty.size == 0:
        return "none (no tile data)", (1, 1)
    k = int(nonempty[0])
    with path.open("rb") as fh:
        fh.seek(int(offsets[k]))
        head = fh.read(min(int(counts[k]), 65536))
    seen: dict[str, Any] = {}
    for chunk in (tables or b"", head):
        _scan_jpeg_markers(chunk, seen)
    comps = seen.get("components")
    if not comps or seen.get("precision") != 8:
        raise _Refused(f"{where}: first JPEG tile has no 8-bit frame header")
    if len(comps) != 3:
        raise _Refused(f"{where}: JPEG tiles have {len(comps)} components, expected 3")
    ids = tuple(c[0] for c in comps)
    # libjpeg's own guess for a 3-component stream (jdapimin.c): JFIF -> YCbCr; Adobe APP14
    # transform 0 -> RGB, else YCbCr; component ids 'R','G','B' -> RGB; otherwise YCbCr.
    if seen.get("jfif"):
        stream = "YCbCr (JFIF)"
    elif "adobe_transform" in seen:
        t = seen["adobe_transform"]
        stream = f"{'RGB' if t == 0 else 'YCbCr'} (Adobe APP14 transform {t})"
    elif ids == (82, 71, 66):
        stream = "RGB (component ids R,G,B)"
    else:
        stream = f"YCbCr (libjpeg default for component ids {','.join(map(str, ids))})"
    (h0, v0), rest = comps[0][1], [c[1] for c in comps[1:]]
    hs, vs = h0 // max(1, min(r[0] for r in rest)), v0 // max(1, min(r[1] for r in rest))
    return stream, (hs, vs)


def _scan_jpeg_markers(data: bytes, seen: dict[str, Any]) -> None:
    """Record JFIF/Adobe markers and the frame header of a JPEG stream, stopping at its scan."""
    i, n = 2 if data[:2] == b"\xff\xd8" else 0, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: header is over
            return
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        seg = data[i + 4 : i + 2 + length]
        if marker == 0xE0 and seg[:5] == b"JFIF\x00":
            seen["jfif"] = True
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            seen["adobe_transform"] = seg[11]
        elif marker in (0xC0, 0xC1, 0xC2) and len(seg) >= 6:
            ncomp = seg[5]
            seen["precision"] = seg[0]
            seen["components"] = [
                (seg[6 + 3 * c], (seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15))
                for c in range(ncomp)
                if 8 + 3 * c < len(seg)
            ]
        i += 2 + length


def _mark_synthesized(levels: list[DirectLevel]) -> list[DirectLevel]:
    """Aperio: tiles OpenSlide paints from a finer level instead of reading them.

    OpenSlide's aperio driver treats zero-length tiles as missing; at level 0 it leaves them
    transparent (white here too), at coarser levels it scales the finer level over them. Each
    missing tile also marks the coarser tile covering it as missing (the encoder bug that drops
    tiles corrupts the tiles built from them), cascading down the pyramid.
    """
    out = [levels[0]]
    missing = set(np.flatnonzero(levels[0].bytecounts == 0).tolist())
    for prev, lv in itertools.pairwise(levels):
        pcols, prows = prev.tiles_cr
        cols, rows = lv.tiles_cr
        concat_x = max(1, round(pcols / cols))
        concat_y = max(1, round(prows / rows))
        inherited = {((k // pcols) // concat_y) * cols + (k % pcols) // concat_x for k in missing}
        missing = set(np.flatnonzero(lv.bytecounts == 0).tolist()) | inherited
        out.append(replace(lv, synthesized=frozenset(missing)))
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- SlideReader over the direct path ---------------------------------------------------------


class DirectTiffReader(_ReaderBase):
    """A :class:`~pathology.slide.SlideReader` that decodes native tiles directly when it is exact.

    ``read_region`` goes to :class:`DirectTiffSource` when the file is supported and OpenSlide
    would place the request on whole level pixels without synthesizing any tile; everything else
    (other formats, sub-pixel origins, Aperio missing tiles at levels >= 1, thumbnails) is left
    to ``base``. The result is pixel-identical to ``base.read_region`` either way.

    Parameters
    ----------
    path : path-like
        Slide file (the one ``base`` reads).
    base : SlideReader
        The reader to fall back on, normally an :class:`~pathology.slide.OpenSlideReader`.
    snap : bool
        Serve sub-pixel origins directly too, from the nearest whole level pixel. Faster for
        levels with non-integer downsamples but no longer equal to OpenSlide there, which
        shifts the level by the fraction of a pixel with bilinear interpolation.

    Attributes
    ----------
    direct : DirectTiffSource or None
        The direct path, None when refused.
    why_not : str or None
        Why the direct path was refused.
    direct_reads, fallback_reads : int
        How many ``read_region`` calls each path served (approximate under threads).
    """

    def __init__(
        self, path: str | os.PathLike[str], base: SlideReader, *, snap: bool = False
    ) -> None:
        self.path = Path(path)
        self.base = base
        self.info = base.info
        self.snap = snap
        self.direct: DirectTiffSource | None = None
        self.why_not: str | None = None
        if base.info.vendor not in _VENDORS:
            self.why_not = f"vendor {base.info.vendor!r} is not one of {', '.join(_VENDORS)}"
        else:
            try:
                self.direct = _probe(self.path, base.info)
            except _Refused as exc:
                self.why_not = str(exc)
        self.direct_reads = 0
        self.fallback_reads = 0

    def level_xy(self, l0_xy: tuple[int, int], level: int) -> tuple[int, int] | None:
        """Level pixel OpenSlide maps ``l0_xy`` to, or None when it is not a whole pixel.

        OpenSlide divides the level-0 origin by the level's downsample in double precision and
        paints tiles at the (possibly fractional) remainder; only a whole result is a plain copy.
        """
        ds = self.base.level_downsamples[level]
        fx, fy = int(l0_xy[0]) / ds, int(l0_xy[1]) / ds
        if fx.is_integer() and fy.is_integer():
            return int(fx), int(fy)
        if self.snap:
            return round(fx), round(fy)
        return None

    def read_region(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """Same contract as :meth:`pathology.slide.OpenSlideReader.read_region`; (h, w, 3) uint8."""
        direct = self.direct
        if direct is not None and 0 <= level < direct.level_count and min(l0_xy) >= 0:
            xy = self.level_xy(l0_xy, level)
            if xy is not None and direct.is_exact(level, xy, size_px):
                self.direct_reads += 1
                return direct.read_region(level, xy, size_px)
        self.fallback_reads += 1
        return self.base.read_region(l0_xy, level, size_px)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        self.base.close()

    def __repr__(self) -> str:
        state = "direct" if self.direct is not None else f"openslide only: {self.why_not}"
        return f"<DirectTiffReader {self.path.name} ({state})>"
