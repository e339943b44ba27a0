"""The TissueMask result type and the slide-level entry point."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from pathology.slide import SlideReader

from pathology.slide import read_downsampled
from pathology.tissue._detect import tissue_mask_from_rgb


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask over a whole slide, with its scale.

    Parameters
    ----------
    mask : ndarray (h, w) bool
        True where there is tissue. Stored read-only.
    downsample_xy : (float, float)
        Level-0 pixels per mask pixel in x and y (``level0_width / w``, ``level0_height / h``).
    l0_dimensions : (int, int)
        Level-0 (width, height) of the slide.
    mpp : float or None
        Microns per level-0 pixel, when known.
    """

    mask: NDArray[np.bool_]
    downsample_xy: tuple[float, float]
    l0_dimensions: tuple[int, int]
    mpp: float | None = None
    # (h + 1, w + 1) float64 summed-area table, for box_fraction.
    _integral: NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.array(self.mask, dtype=bool, copy=True)
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D bool array; got shape {m.shape}")
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        dsx, dsy = (float(d) for d in self.downsample_xy)
        if not (dsx > 0 and dsy > 0 and math.isfinite(dsx) and math.isfinite(dsy)):
            raise ValueError(
                f"downsample_xy must be two positive numbers; got {self.downsample_xy!r}"
            )
        object.__setattr__(self, "downsample_xy", (dsx, dsy))
        object.__setattr__(
            self, "l0_dimensions", (int(self.l0_dimensions[0]), int(self.l0_dimensions[1]))
        )
        integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.float64)
        np.cumsum(np.cumsum(m, axis=0, dtype=np.float64), axis=1, out=integral[1:, 1:])
        integral.setflags(write=False)
        object.__setattr__(self, "_integral", integral)

    @property
    def shape(self) -> tuple[int, int]:
        """Mask (h, w) in pixels."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def mask_mpp(self) -> float | None:
        """Microns per mask pixel (mean of x and y), when the slide's mpp is known."""
        if self.mpp is None:
            return None
        return self.mpp * 0.5 * (self.downsample_xy[0] + self.downsample_xy[1])

    def fraction(self) -> float:
        """Fraction of the slide area that is tissue, 0-1."""
        return float(self.mask.mean())

    def box_fraction(self, l0_xy: tuple[float, float], l0_size: tuple[float, float]) -> float:
        """Tissue fraction (0-1) inside one level-0 box; see :meth:`box_fractions`."""
        return float(self.box_fractions(np.asarray([l0_xy], dtype=np.float64), l0_size)[0])

    def box_fractions(self, l0_xy: ArrayLike, l0_size: ArrayLike) -> NDArray[np.float64]:
        """Tissue fraction inside many level-0 boxes at once (the tiling stage's per-tile test).

        Exact area weighting: the summed-area table of a piecewise-constant mask is bilinear inside
        each cell, so boxes whose edges fall between mask pixels are weighted by the covered area.
        Parts of a box outside the slide count as glass.

        Parameters
        ----------
        l0_xy : array (N, 2) or (2,)
            Top-left (x, y) of each box in level-0 pixels.
        l0_size : array (2,) or (N, 2)
            Box (w, h) in level-0 pixels, one for all boxes or one per box.

        Returns
        -------
        ndarray (N,) float64
            Tissue fraction of each box, 0-1 (0 for empty boxes).
        """
        xy = np.atleast_2d(np.asarray(l0_xy, dtype=np.float64))
        size = np.broadcast_to(np.asarray(l0_size, dtype=np.float64), xy.shape)
        dsx, dsy = self.downsample_xy
        h, w = self.shape
        x0, y0 = xy[:, 0] / dsx, xy[:, 1] / dsy
        x1, y1 = (xy[:, 0] + size[:, 0]) / dsx, (xy[:, 1] + size[:, 1]) / dsy
        area = (x1 - x0) * (y1 - y0)
        x0c, x1c = np.clip(x0, 0, w), np.clip(x1, 0, w)
        y0c, y1c = np.clip(y0, 0, h), np.clip(y1, 0, h)
        inside = (
            self._area_sum(x1c, y1c)
            - self._area_sum(x0c, y1c)
            - self._area_sum(x1c, y0c)
            + self._area_sum(x0c, y0c)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(area > 0, inside / area, 0.0)
        return np.clip(frac, 0.0, 1.0)

    def _area_sum(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
        """Tissue area in [0, x) x [0, y) (mask pixels, fractional), by bilinear lookup."""
        ii = self._integral
        h, w = self.shape
        i = np.minimum(np.floor(x).astype(np.intp), w - 1)
        j = np.minimum(np.floor(y).astype(np.intp), h - 1)
        a, b = x - i, y - j
        return (
            ii[j, i] * (1 - a) * (1 - b)
            + ii[j, i + 1] * a * (1 - b)
            + ii[j + 1, i] * (1 - a) * b
            + ii[j + 1, i + 1] * a * b
        )

    def to_png(self, path: str | os.PathLike[str]) -> None:
        """Write the mask as an 8-bit PNG (255 = tissue) with its scale in PNG text chunks."""
        from PIL import Image, PngImagePlugin

        meta = PngImagePlugin.PngInfo()
        meta.add_text(
            "pathology.downsample_xy", f"{self.downsample_xy[0]!r},{self.downsample_xy[1]!r}"
        )
        meta.add_text("pathology.l0_dimensions", f"{self.l0_dimensions[0]},{self.l0_dimensions[1]}")
        if self.mpp is not None:
            meta.add_text("pathology.mpp", repr(self.mpp))
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(os.fspath(path), pnginfo=meta)

    @classmethod
    def from_png(cls, path: str | os.PathLike[str]) -> TissueMask:
        """Read a mask written by :meth:`to_png`."""
        from PIL import Image

        with Image.open(os.fspath(path)) as im:
            text = dict(getattr(im, "text", {}))
            arr = np.asarray(im.convert("L")) >= 128
        try:
            dsx, dsy = (float(v) for v in text["pathology.downsample_xy"].split(","))
            w0, h0 = (int(v) for v in text["pathology.l0_dimensions"].split(","))
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{path}: not a tissue mask written by TissueMask.to_png (no scale)"
            ) from exc
        mpp = float(text["pathology.mpp"]) if "pathology.mpp" in text else None
        return cls(arr, (dsx, dsy), (w0, h0), mpp)


def mask_downsample(reader: SlideReader, *, mask_mpp: float = 8.0, max_size: int = 4096) -> float:
    """Level-0 pixels per mask pixel that :func:`compute_tissue_mask` asks for (>= 1).

    ``mask_mpp / slide mpp`` when the slide's mpp is known, raised so the longest side fits
    ``max_size``; without mpp, only the ``max_size`` fit.
    """
    if not (mask_mpp > 0 and math.isfinite(mask_mpp)):
        raise ValueError(
            f"mask_mpp must be a positive number of microns per pixel; got {mask_mpp!r}"
        )
    if max_size < 1:
        raise ValueError(f"max_size must be a positive number of pixels; got {max_size!r}")
    w0, h0 = reader.level_dimensions[0]
    ds = max(w0, h0) / max_size
    if reader.info.mpp is not None:
        ds = max(ds, mask_mpp / reader.info.mpp)
    return max(ds, 1.0)


def compute_tissue_mask(
    reader: SlideReader,
    *,
    mask_mpp: float = 8.0,
    max_size: int = 4096,
    min_od: float = 0.02,
    reject_ink: bool = True,
    smooth_px: float = 0.5,
    close_um: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Tissue mask of a slide, computed on a thumbnail read through ``reader``.

    Parameters
    ----------
    reader : SlideReader
        An open slide (:func:`pathology.slide.open_slide`).
    mask_mpp : float
        Wanted microns per mask pixel when the slide's mpp is known (8 um/px: a 20 x 15 mm section
        gives a 2500 x 1900 mask). Never finer than level 0.
    max_size : int
        Longest side of the mask in pixels: the scale when the slide's mpp is unknown, and a cap
        otherwise (huge slides, tiny ``mask_mpp``).
    min_od, reject_ink, smooth_px, close_um, min_object_um2, max_hole_um2
        As in :func:`tissue_mask_from_rgb` (sizes in microns; ignored in favour of image-relative
        sizes when the slide has no mpp).

    Returns
    -------
    TissueMask
        Mask (h, w) bool with its level-0 scale.
    """
    w0, h0 = reader.level_dimensions[0]
    slide_mpp = reader.info.mpp
    ds = mask_downsample(reader, mask_mpp=mask_mpp, max_size=max_size)
    rgb, ds_xy = read_downsampled(reader, ds)
    thumb_mpp = None if slide_mpp is None else slide_mpp * 0.5 * (ds_xy[0] + ds_xy[1])
    mask = tissue_mask_from_rgb(
        rgb,
        mpp=thumb_mpp,
        min_od=min_od,
        reject_ink=reject_ink,
        smooth_px=smooth_px,
        close_um=close_um,
        min_object_um2=min_object_um2,
        max_hole_um2=max_hole_um2,
    )
    return TissueMask(mask, ds_xy, (w0, h0), slide_mpp)


def overlay(
    rgb: NDArray[np.uint8], mask: NDArray[np.bool_], *, alpha: float = 0.35
) -> NDArray[np.uint8]:
    """Thumbnail with non-tissue tinted blue and the tissue outline drawn in green, for review.

    Parameters
    ----------
    rgb : ndarray (h, w, 3) uint8
        Thumbnail.
    mask : ndarray (h, w) bool
        Tissue mask of the same size.
    alpha : float
        Strength of the tint over non-tissue, 0-1.

    Returns
    -------
    ndarray (h, w, 3) uint8
    """
    from scipy import ndimage as ndi

    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size")
    out = rgb.astype(np.float32)
    tint = np.array([40, 80, 200], dtype=np.float32)
    out[~mask] = (1 - alpha) * out[~mask] + alpha * tint
    edge = mask & ~ndi.binary_erosion(mask, border_value=1)
    out[edge] = (0, 200, 0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
