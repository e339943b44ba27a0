"""Slide readers: one OpenSlide-shaped interface over whole-slide images and plain images.

Coordinate planes (named in variables throughout the package):

- ``l0_xy``: (x, y) pixel position at level 0 (full resolution), as OpenSlide uses.
- ``level``: pyramid level index, 0 = full resolution; ``level_downsamples[level]`` level-0 px per level px.
- ``size_px`` / ``(w, h)``: a width and height in pixels *of the level being read*.
- ``mpp``: microns per level-0 pixel (``mpp * downsample`` at other levels).

Every reader returns RGB ``uint8`` arrays of shape (h, w, 3); transparent regions (outside a
scanned area) are composited on white, like glass. Label and macro images are never read: they
can carry patient names and barcodes. Only whitelisted metadata leaves the reader
(:func:`SlideInfo.safe_properties`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from pathology.errors import (
    CorruptSlideError,
    EmptySlideError,
    MissingMppError,
    NotASlideError,
    SlideNotFoundError,
    TileReadError,
)

__all__ = [
    "ArraySlide",
    "OpenSlideReader",
    "SlideInfo",
    "SlideReader",
    "block_mean",
    "open_slide",
    "read_downsampled",
]

_log = logging.getLogger(__name__)

#: A pixel size outside this range (um/px) is treated as absent: 72-dpi defaults in TIFF/PNG
#: headers give ~353 um/px, which is no scan.
MPP_RANGE = (0.05, 50.0)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}

# OpenSlide properties that describe the scan without identifying anyone. Everything else
# (aperio.Filename, aperio.User, aperio.Date, barcodes, tiff.DateTime, tiff.ImageDescription,
# openslide.comment, ...) is dropped. Whitelist, never blacklist: vendors add fields.
_SAFE_PROPERTY = re.compile(
    r"^(openslide\.(vendor|mpp-x|mpp-y|objective-power|level-count|quickhash-1|bounds-(x|y|width|height)"
    r"|background-color|level\[\d+\]\.(width|height|downsample|tile-width|tile-height))"
    r"|aperio\.(AppMag|MPP)|hamamatsu\.SourceLens|tiff\.(ResolutionUnit|XResolution|YResolution))$"
)


def _mpp_ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


@dataclass(frozen=True)
class SlideInfo:
    """PHI-free description of a slide.

    Attributes
    ----------
    name : str
        File name (not the directory: paths can name patients; callers decide what to print).
    vendor : str
        OpenSlide vendor (``aperio``, ``generic-tiff``, ``hamamatsu``, ...) or ``image`` for plain images.
    level_dimensions : tuple of (w, h)
        Pixel size of each pyramid level.
    level_downsamples : tuple of float
        Level-0 pixels per level pixel, per level.
    mpp : float or None
        Microns per level-0 pixel (mean of x and y); None when unknown.
    mpp_source : str
        Where ``mpp`` came from: ``override``, ``openslide``, ``tiff-resolution``, ``ome`` or ``none``.
    objective_power : float or None
        Scanner objective magnification (20, 40, ...), when recorded.
    tile_size : (w, h) or None
        Native tile size of level 0, when the format is tiled.
    file_bytes : int
        Size of the file on disk.
    properties : dict
        Whitelisted scanner properties only (see module docstring).
    """

    name: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None
    tile_size: tuple[int, int] | None
    file_bytes: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (used by ``pathology info --json`` and provenance records)."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 6) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "tile_size": list(self.tile_size) if self.tile_size else None,
            "file_bytes": self.file_bytes,
            "properties": dict(self.properties),
        }


@runtime_checkable
class SlideReader(Protocol):
    """What every stage needs from a slide. Implementations: :class:`OpenSlideReader`, :class:`ArraySlide`."""

    path: Path
    info: SlideInfo

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp(self) -> float: ...

    def read_region(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]
    ) -> NDArray[np.uint8]: ...

    def get_thumbnail(self, max_size: tuple[int, int]) -> NDArray[np.uint8]: ...

    def get_best_level_for_downsample(self, downsample: float) -> int: ...

    def close(self) -> None: ...


class _ReaderBase:
    """Shared behaviour: mpp checks, best level, thumbnail, context manager."""

    path: Path
    info: SlideInfo

    @property
    def level_count(self) -> int:
        return self.info.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.info.level_downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.dimensions

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel; raises :class:`MissingMppError` when the slide records none."""
        if self.info.mpp is None:
            raise MissingMppError(
                self.path,
                "no pixel size (microns per pixel) recorded in the file; pass the scan's pixel size with "
                "--slide-mpp (e.g. --slide-mpp 0.25 for a 40x scan, 0.5 for 20x) or open_slide(path, mpp=...)",
            )
        return self.info.mpp

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Highest-index level whose downsample is <= ``downsample`` (never coarser than asked)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]
    ) -> NDArray[np.uint8]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_region_reduced(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int], k: int
    ) -> NDArray[np.uint8]:
        """A region reduced by exact ``k x k`` block means: ``block_mean(read_region(...), k)``.

        Readers override it when they can do it with fewer copies; the result is the same.
        """
        return block_mean(self.read_region(l0_xy, level, size_px), k)

    def get_thumbnail(self, max_size: tuple[int, int]) -> NDArray[np.uint8]:
        """Whole slide averaged down to fit within ``max_size`` (w, h), aspect kept; (h, w, 3) uint8.

        Exact area means of whole pixel blocks of the best level (see :func:`read_downsampled`), read
        in chunks, so memory stays bounded whatever the slide size.
        """
        w0, h0 = self.dimensions
        ds = max(w0 / max_size[0], h0 / max_size[1], 1.0)
        return read_downsampled(self, ds, round_up=True)[0]

    def close(self) -> None:
        pass

    def __enter__(self) -> _ReaderBase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.info.name} {w}x{h} {self.info.vendor} mpp={self.info.mpp}>"


def _rgba_to_rgb_on_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite openslide-python's RGBA (straight, not premultiplied, alpha) on white glass.

    Transparent pixels lie outside the scanned area: white is what glass looks like.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideReader(_ReaderBase):
    """Reader over any format OpenSlide opens (Aperio SVS, generic TIFF, NDPI, MRXS, DICOM, ...).

    Not thread-safe across threads sharing one instance during error recovery; tiling code opens one
    reader per worker. OpenSlide itself is safe for concurrent ``read_region`` calls.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        self._osr: openslide.OpenSlide | None
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(
                self.path, f"cannot be opened by OpenSlide ({_one_line(exc)})"
            ) from exc
        except (
            openslide.OpenSlideUnsupportedFormatError
        ) as exc:  # pragma: no cover - caught earlier
            raise NotASlideError(self.path, "not a format OpenSlide reads") from exc
        self._lock = threading.Lock()
        props = self._osr.properties
        try:
            dims = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
            downs = tuple(float(d) for d in self._osr.level_downsamples)
        except Exception as exc:  # pragma: no cover - openslide validates on open
            raise CorruptSlideError(
                self.path, f"unreadable level table ({_one_line(exc)})"
            ) from exc
        if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
            raise CorruptSlideError(self.path, "slide has no pixels (level 0 is empty)")

        mpp_source = "none"
        mpp_value: float | None = None
        if mpp is not None:
            mpp_value, mpp_source = _check_override(self.path, mpp), "override"
        else:
            try:
                mx = float(props.get("openslide.mpp-x", "nan"))
                my = float(props.get("openslide.mpp-y", "nan"))
            except ValueError:
                mx = my = float("nan")
            vals = [v for v in (mx, my) if _mpp_ok(v)]
            if vals:
                mpp_value = sum(vals) / len(vals)
                mpp_source = "openslide"
        try:
            power = float(props["openslide.objective-power"])
        except (KeyError, ValueError):
            power = None
        tw = props.get("openslide.level[0].tile-width")
        th = props.get("openslide.level[0].tile-height")
        tile = (int(tw), int(th)) if tw and th else None
        self.info = SlideInfo(
            name=self.path.name,
            vendor=props.get("openslide.vendor", "unknown"),
            level_dimensions=dims,
            level_downsamples=downs,
            mpp=mpp_value,
            mpp_source=mpp_source,
            objective_power=power,
            tile_size=tile,
            file_bytes=self.path.stat().st_size,
            properties={k: v for k, v in props.items() if _SAFE_PROPERTY.match(k)},
        )

    def read_region(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """Read ``size_px`` (w, h) pixels of ``level`` whose top-left is ``l0_xy`` in level-0 coordinates.

        Returns
        -------
        ndarray (h, w, 3) uint8
            Areas outside the slide or the scanned region are white.
        """
        return _rgba_to_rgb_on_white(np.asarray(self._read_pil(l0_xy, level, size_px)))

    def read_region_reduced(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int], k: int
    ) -> NDArray[np.uint8]:
        """``block_mean(read_region(l0_xy, level, size_px), k)``, with fewer copies (the tiler's hot path)."""
        image = self._read_pil(l0_xy, level, size_px)
        if k == 1 or size_px[0] % k or size_px[1] % k or image.getextrema()[3][0] < 255:
            return block_mean(_rgba_to_rgb_on_white(np.asarray(image)), k)
        # Fully opaque: Pillow's box reduction straight on the RGBA buffer, then drop alpha.
        return np.asarray(image.reduce(k))[..., :3].copy()

    def _read_pil(self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> Any:
        import openslide

        if not 0 <= level < self.level_count:
            raise ValueError(
                f"level {level} out of range 0..{self.level_count - 1} for {self.path}"
            )
        if self._osr is None:
            raise ValueError(f"{self.path}: reader is closed")
        try:
            region = self._osr.read_region(
                (int(l0_xy[0]), int(l0_xy[1])), level, (int(size_px[0]), int(size_px[1]))
            )
        except openslide.OpenSlideError as exc:
            # libopenslide makes errors sticky: every later read on this handle fails too. Reopen so one
            # damaged tile costs one tile, not the rest of the slide.
            self._reopen()
            raise TileReadError(
                self.path,
                f"cannot decode region at level-0 (x={l0_xy[0]}, y={l0_xy[1]}), level {level}, "
                f"size {size_px[0]}x{size_px[1]} ({_one_line(exc)})",
            ) from exc
        return region

    def _reopen(self) -> None:
        import openslide

        with self._lock:
            try:
                if self._osr is not None:
                    self._osr.close()
            except Exception:  # pragma: no cover - closing a handle in error state
                pass
            self._osr = openslide.OpenSlide(str(self.path))

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


class ArraySlide(_ReaderBase):
    """A single-level slide held in memory: plain images (PNG, JPEG, TIFF), TMA cores, tests, notebooks.

    Parameters
    ----------
    image : ndarray (h, w, 3) or (h, w, 4) uint8
        Pixels; RGBA is composited on white.
    mpp : float or None
        Microns per pixel, if known.
    name : str
        Display name (file name for images read from disk).
    """

    def __init__(
        self,
        image: NDArray[np.uint8],
        mpp: float | None = None,
        *,
        name: str = "<array>",
        path: str | os.PathLike[str] | None = None,
        mpp_source: str | None = None,
        file_bytes: int = 0,
    ) -> None:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise ValueError(f"image must be (h, w, 3|4) uint8; got {arr.shape} {arr.dtype}")
        if arr.shape[2] == 4:
            a = arr[..., 3:4].astype(np.uint16)
            arr = ((arr[..., :3].astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)
        self._image = np.ascontiguousarray(arr)
        self.path = Path(path) if path is not None else Path(name)
        h, w = arr.shape[:2]
        if mpp is not None and not _mpp_ok(mpp):
            mpp = None
        self.info = SlideInfo(
            name=name,
            vendor="image",
            level_dimensions=((w, h),),
            level_downsamples=(1.0,),
            mpp=mpp,
            mpp_source=mpp_source or ("none" if mpp is None else "override"),
            objective_power=None,
            tile_size=None,
            file_bytes=file_bytes,
        )

    def read_region(
        self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """Same contract as :meth:`OpenSlideReader.read_region`; only level 0 exists."""
        if level != 0:
            raise ValueError(f"level {level} out of range 0..0 for {self.path}")
        x, y = int(l0_xy[0]), int(l0_xy[1])
        w, h = int(size_px[0]), int(size_px[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = self._image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out


def read_downsampled(
    reader: SlideReader, downsample: float, *, round_up: bool = False
) -> tuple[NDArray[np.uint8], tuple[float, float]]:
    """The whole slide averaged down by about ``downsample``, read in chunks (bounded memory).

    Reads the coarsest pyramid level not coarser than asked and averages blocks of ``k x k`` level
    pixels (an exact area mean, so no aliasing of small dark specks into large ones).

    Parameters
    ----------
    reader : SlideReader
        An open slide.
    downsample : float
        Wanted level-0 pixels per thumbnail pixel (>= 1).
    round_up : bool
        Never average fewer level pixels than asked (the result then fits a size derived from
        ``downsample``); by default the nearest whole block size is used.

    Returns
    -------
    rgb : ndarray (h, w, 3) uint8
        The thumbnail.
    downsample_xy : (float, float)
        Actual level-0 pixels per thumbnail pixel in x and y (close to ``downsample``).
    """
    w0, h0 = reader.level_dimensions[0]
    ds = max(1.0, float(downsample))
    level = reader.get_best_level_for_downsample(ds)
    lw, lh = reader.level_dimensions[level]
    level_ds = float(reader.level_downsamples[level])
    k = max(1, math.ceil(ds / level_ds - 1e-9) if round_up else round(ds / level_ds))
    out_w, out_h = -(-lw // k), -(-lh // k)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    chunk = k * max(1, 2048 // k)  # level pixels per read, a multiple of k
    for y in range(0, lh, chunk):
        for x in range(0, lw, chunk):
            cw, ch = min(chunk, lw - x), min(chunk, lh - y)
            region = _read_tolerant(
                reader, level, level_ds, (x, y), (cw, ch), step=k * max(1, 256 // k)
            )
            block = block_mean(region, k)
            out[y // k : y // k + block.shape[0], x // k : x // k + block.shape[1]] = block
    return out, (w0 / out_w, h0 / out_h)


def _read_tolerant(
    reader: SlideReader,
    level: int,
    level_ds: float,
    level_xy: tuple[int, int],
    size: tuple[int, int],
    step: int,
) -> NDArray[np.uint8]:
    """``read_region`` that survives damaged tiles: on a :class:`TileReadError` the region is re-read
    in ``step``-pixel pieces and the unreadable pieces are left white (glass), with one warning.

    For overviews (thumbnails, tissue masks) only: one damaged tile must not cost the whole slide; the
    tiler reports each unreadable tile itself.
    """
    x, y = level_xy
    try:
        return reader.read_region((round(x * level_ds), round(y * level_ds)), level, size)
    except TileReadError as exc:
        _log.warning("%s; reading around the damaged area for the overview", exc)
    out = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    for dy in range(0, size[1], step):
        for dx in range(0, size[0], step):
            pw, ph = min(step, size[0] - dx), min(step, size[1] - dy)
            try:
                xy = (round((x + dx) * level_ds), round((y + dy) * level_ds))
                out[dy : dy + ph, dx : dx + pw] = reader.read_region(xy, level, (pw, ph))
            except TileReadError:
                continue
    return out


def block_mean(img: NDArray[np.uint8], k: int) -> NDArray[np.uint8]:
    """Area mean of ``k x k`` pixel blocks, rounded half up: an exact, alias-free k-fold reduction.

    Parameters
    ----------
    img : ndarray (h, w, c) uint8
    k : int
        Block edge in pixels (>= 1).

    Returns
    -------
    ndarray (ceil(h / k), ceil(w / k), c) uint8
        Partial blocks at the right/bottom edge average their real pixels only.
    """
    if k == 1:
        return np.ascontiguousarray(img)
    h, w, c = img.shape
    hb, wb = -(-h // k), -(-w // k)
    if h % k == 0 and w % k == 0 and c == 3:
        # Hot path (tiling): Pillow's box reduction in C, ~30x faster than numpy here; it rounds half up.
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(k))
    padded = np.zeros((hb * k, wb * k, c), dtype=np.uint32)
    padded[:h, :w] = img
    sums = padded.reshape(hb, k, wb, k, c).sum(axis=(1, 3))
    rows = np.minimum(k, h - np.arange(hb) * k)
    cols = np.minimum(k, w - np.arange(wb) * k)
    counts = (rows[:, None] * cols[None, :])[..., None]
    return np.clip(np.floor(sums / counts + 0.5), 0, 255).astype(np.uint8)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_override(path: Path, mpp: float) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise MissingMppError(
            path, f"--mpp must be a number of microns per pixel, got {mpp!r}"
        ) from None
    if not _mpp_ok(value):
        raise MissingMppError(
            path,
            f"--mpp {value} is outside the plausible range {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px",
        )
    return value


def _tiff_mpp(tif: object) -> tuple[float | None, str]:
    """Pixel size from OME-XML PhysicalSizeX or the TIFF resolution tags of the first page."""
    import tifffile

    assert isinstance(tif, tifffile.TiffFile)
    ome = tif.ome_metadata
    if ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        if m:
            value = float(m.group(1))
            scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(
                unit.group(1) if unit else "µm", 1.0
            )
            value *= scale
            if _mpp_ok(value):
                return value, "ome"
    page = tif.pages.first
    tags = page.tags
    res = tags.get("XResolution")
    unit_tag = tags.get("ResolutionUnit")
    if res is not None and unit_tag is not None:
        num, den = res.value
        px_per_unit = num / den if den else 0.0
        unit_val = int(unit_tag.value)
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit_val)
        if px_per_unit > 0 and um_per_unit:
            value = um_per_unit / px_per_unit
            if _mpp_ok(value):
                return value, "tiff-resolution"
    return None, "none"


def _read_plain_image(path: Path, mpp: float | None) -> ArraySlide:
    suffix = path.suffix.lower()
    mpp_value: float | None = None
    source = "none"
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                if mpp is None:
                    mpp_value, source = _tiff_mpp(tif)
                series = tif.series[0]
                # The first series, full resolution only; OME pyramids keep level 0 in level 0.
                img = series.levels[0].asarray() if hasattr(series, "levels") else series.asarray()
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if mpp is None:
                    dpi = im.info.get("dpi")
                    if dpi and dpi[0]:
                        value = 25400.0 / float(dpi[0])
                        if _mpp_ok(value):
                            mpp_value, source = value, "image-dpi"
                img = np.asarray(
                    im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
                )
    except Exception as exc:
        raise CorruptSlideError(path, f"image cannot be decoded ({_one_line(exc)})") from exc
    img = np.asarray(img)
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            raise CorruptSlideError(path, f"unsupported pixel type {img.dtype}; expected 8-bit RGB")
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[2] not in (3, 4):
        img = np.moveaxis(img, 0, -1)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise CorruptSlideError(path, f"unsupported image shape {img.shape}; expected RGB")
    if mpp is not None:
        mpp_value, source = _check_override(path, mpp), "override"
    return ArraySlide(
        img, mpp_value, name=path.name, path=path, mpp_source=source, file_bytes=path.stat().st_size
    )


def _sniff_image(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(8)
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    )


def open_slide(
    path: str | os.PathLike[str], mpp: float | None = None
) -> OpenSlideReader | ArraySlide:
    """Open a whole-slide image or a plain image as a :class:`SlideReader`.

    Parameters
    ----------
    path : path-like
        Any format OpenSlide reads (.svs, .tif, .ndpi, .mrxs, .scn, .bif, DICOM, ...), or a plain
        PNG / JPEG / TIFF image, read as a single-level slide.
    mpp : float, optional
        Microns per level-0 pixel; overrides what the file records. Needed for files that record none
        (most PNG/JPEG); ``reader.mpp`` raises :class:`~pathology.errors.MissingMppError` otherwise.

    Raises
    ------
    SlideNotFoundError
        The path does not exist.
    EmptySlideError
        The file has zero bytes.
    NotASlideError
        Neither OpenSlide nor the image readers know the format.
    CorruptSlideError
        The format is known but the file cannot be read.
    """
    import openslide

    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file")
    if p.is_dir():
        # MRXS and DICOM are opened through a file inside the folder; a bare folder is not a slide.
        raise SlideNotFoundError(
            p, "is a directory, not a slide file (for DICOM/MRXS give one file inside it)"
        )
    if p.stat().st_size == 0:
        raise EmptySlideError(p, "file is empty (0 bytes); was the copy interrupted?")
    if mpp is not None:
        _check_override(p, mpp)
    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except openslide.OpenSlideError as exc:
        raise CorruptSlideError(p, f"damaged slide file ({_one_line(exc)})") from exc
    if vendor is not None:
        return OpenSlideReader(p, mpp=mpp)
    if _sniff_image(p) or p.suffix.lower() in _IMAGE_SUFFIXES:
        if not _sniff_image(p):
            raise CorruptSlideError(p, f"has a {p.suffix} name but not the contents of one")
        return _read_plain_image(p, mpp)
    raise NotASlideError(
        p, "not a slide or image format this tool reads (OpenSlide formats, PNG, JPEG, TIFF)"
    )
