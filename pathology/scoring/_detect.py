"""Nucleus detection as batched tensor operations: scale-normalised Laplacian of Gaussian on the
haematoxylin (or haematoxylin + DAB) channel, peaks by scale-aware max-pooling.

Frames: ``det`` maps live on the detection grid (about 1 um/px: nuclei are >= 6 um across, so
finer grids only cost time); peak coordinates are returned in microns from the top-left corner
of the input tile so the measuring stage can sample at its own resolution.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["DETECT_MPP", "SIGMAS_UM", "Peaks", "detect_nuclei", "gaussian_blur", "log_response"]

#: Microns per pixel of the detection grid.
DETECT_MPP = 1.0
#: LoG scales; a disc of radius r responds most at sigma = r / sqrt(2): radii ~2.8-7.4 um cover
#: lymphocytes (3-4 um) to large vesicular tumour nuclei (6-7 um).
SIGMAS_UM = (2.0, 2.5, 3.1, 3.8, 4.5, 5.2)
#: Minimum scale-normalised LoG response (OD units) for a nucleus candidate.
MIN_RESPONSE = 0.03
#: A peak suppresses weaker peaks within this fraction of its radius.
NMS_FRACTION = 0.85


@dataclass(frozen=True)
class Peaks:
    """Nucleus candidates of a batch.

    Attributes
    ----------
    tile : Tensor (K,) int64
        Index of the tile in the batch.
    yx_um : Tensor (K, 2) float32
        Centre in microns from the tile's top-left corner.
    radius_um : Tensor (K,) float32
        Radius of the best LoG scale (sqrt(2) sigma).
    response : Tensor (K,) float32
        Scale-normalised LoG response at the peak.
    """

    tile: torch.Tensor
    yx_um: torch.Tensor
    radius_um: torch.Tensor
    response: torch.Tensor


def _radius(sigma_px: float) -> int:
    """Half-width (pixels) of the truncated Gaussian kernels: 3 sigma."""
    return max(1, math.ceil(3.0 * sigma_px))


@functools.lru_cache(maxsize=64)
def _gauss_matrix_np(n: int, sigma_px: float, deriv: int) -> NDArray[np.float32]:
    """(n, n) matrix M with ``(img @ M)`` = Gaussian (``deriv`` 0) or its second derivative
    (``deriv`` 2) filtering along the last axis, zero outside the image (OD 0 = glass)."""
    r = _radius(sigma_px)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma_px) ** 2)
    g /= g.sum()
    if deriv == 2:
        k = (x**2 / sigma_px**4 - 1.0 / sigma_px**2) * g
        k -= k.sum() * g  # exact zero response to a constant
    else:
        k = g
    i = np.arange(n)
    d = i[:, None] - i[None, :]  # input index j (row) minus output index i (column)
    m = np.where(np.abs(d) <= r, k[np.clip(d + r, 0, 2 * r)], 0.0)
    return m.astype(np.float32)


def _gauss_matrix(n: int, sigma_px: float, deriv: int, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(_gauss_matrix_np(n, round(sigma_px, 4), deriv)).to(device)


#: Width (pixels) of the output blocks of the banded matmuls below.
_BLOCK_PX = 40


def _blocks(n: int, r: int) -> list[tuple[int, int, int, int]]:
    """Output blocks ``[a, b)`` of an ``n``-long axis with the input span ``[lo, hi)`` a filter of
    half-width ``r`` reads for them."""
    nb = max(1, round(n / _BLOCK_PX))
    e = [round(i * n / nb) for i in range(nb + 1)]
    return [(a, b, max(0, a - r), min(n, b + r)) for a, b in itertools.pairwise(e)]


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W) float with zero padding, as two banded matmuls
    (several times faster than a convolution with a long 1-D kernel on the CPU)."""
    h, w = img.shape[-2:]
    gy = _gauss_matrix(h, sigma_px, 0, img.device)
    gx = _gauss_matrix(w, sigma_px, 0, img.device)
    return gy.T @ (img @ gx)


@functools.lru_cache(maxsize=64)
def _log_plan(h: int, w: int, sigma_px: float, device: torch.device) -> tuple[list, list]:
    """Block matrices of :func:`log_response` for an (h, w) image, cached per device: x blocks
    ``(a, b, lo, hi, [Gx | Gxx][lo:hi, a:b])`` and y blocks ``(a, b, lo, hi, Gy^T, Gyy^T)``."""
    import torch

    r = _radius(sigma_px)
    gx = torch.from_numpy(_gauss_matrix_np(w, sigma_px, 0))
    gxx = torch.from_numpy(_gauss_matrix_np(w, sigma_px, 2))
    gy = torch.from_numpy(_gauss_matrix_np(h, sigma_px, 0))
    gyy = torch.from_numpy(_gauss_matrix_np(h, sigma_px, 2))
    xs = []
    for a, b, lo, hi in _blocks(w, r):
        m = torch.stack([gx[lo:hi, a:b], gxx[lo:hi, a:b]], 1).reshape(hi - lo, 2 * (b - a))
        xs.append((a, b, lo, hi, m.to(device)))
    ys = []
    for a, b, lo, hi in _blocks(h, r):
        ys.append(
            (
                a,
                b,
                lo,
                hi,
                gy.T[a:b, lo:hi].contiguous().to(device),
                gyy.T[a:b, lo:hi].contiguous().to(device),
            )
        )
    return xs, ys


def log_response(
    img: torch.Tensor, sigma_px: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale-normalised negative Laplacian of Gaussian, ``-sigma^2 (Gxx + Gyy) * img``.

    The filters are banded matrices (zero padding: OD 0 is glass), applied block by block so each
    matmul only spans the band: the same sums as the dense ``Gy^T (img Gxx) + Gyy^T (img Gx)``
    at about half the multiply-adds. The x pass applies Gx and Gxx in one matmul per block.
    """
    import torch

    h, w = img.shape[-2:]
    xs, ys = _log_plan(h, w, round(sigma_px, 4), img.device)
    xa = torch.empty((*img.shape[:-1], 2, w), dtype=img.dtype, device=img.device)
    for a, b, lo, hi, m in xs:  # xa[..., 0, :] = img Gx, xa[..., 1, :] = img Gxx
        xa[..., a:b] = (img[..., lo:hi] @ m).unflatten(-1, (2, b - a))
    if out is None:
        out = torch.empty(img.shape, dtype=img.dtype, device=img.device)
    for a, b, lo, hi, gy_t, gyy_t in ys:
        blk = out[..., a:b, :]
        blk.copy_(gy_t @ xa[..., lo:hi, 1, :])
        blk.add_(gyy_t @ xa[..., lo:hi, 0, :])
    return out.mul_(-(sigma_px * sigma_px))


def _subpixel(
    r: torch.Tensor, n: torch.Tensor, y: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parabolic refinement of integer peak positions on response map ``r`` (N, h, w)."""
    import torch

    h, w = r.shape[-2:]
    ym, yp = (y - 1).clamp(0, h - 1), (y + 1).clamp(0, h - 1)
    xm, xp = (x - 1).clamp(0, w - 1), (x + 1).clamp(0, w - 1)
    c = r[n, y, x]

    def off(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        den = a - 2 * c + b
        o = torch.where(den < -1e-9, 0.5 * (a - b) / den, torch.zeros_like(den))
        return o.clamp(-0.5, 0.5)

    return off(r[n, ym, x], r[n, yp, x]), off(r[n, y, xm], r[n, y, xp])


def tile_slots(tile: torch.Tensor, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots of items sorted by tile in a padded (n_tiles, kmax) layout.

    Returns ``offsets`` (n_tiles,) (first item of each tile), ``pos`` (K,) (slot of each item in its
    tile) and ``kmax`` (the most items in one tile), so ``pad[tile, pos] = values`` scatters.
    """
    import torch

    counts = torch.bincount(tile, minlength=n_tiles)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(tile.numel(), device=tile.device) - offsets[tile]
    return offsets, pos, int(counts.max()) if tile.numel() else 0


def _suppress(
    n: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    resp: torch.Tensor,
    scale: torch.Tensor,
    sig_px: list[float],
    n_tiles: int,
) -> torch.Tensor:
    """Boolean mask of candidates not within ``NMS_FRACTION`` x radius of a stronger candidate."""
    import torch

    k = n.numel()
    dev = n.device
    if k == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev)
    _, pos, kmax = tile_slots(n, n_tiles)
    rad = torch.tensor(sig_px, device=dev)[scale] * (NMS_FRACTION * math.sqrt(2.0))
    yx = torch.full((n_tiles, kmax, 2), 1e9, device=dev)
    yx[n, pos] = torch.stack([y, x], 1).float()
    r = torch.full((n_tiles, kmax), -math.inf, device=dev)
    r[n, pos] = resp
    rr = torch.zeros((n_tiles, kmax), device=dev)
    rr[n, pos] = rad
    d = torch.cdist(yx, yx)  # (N, kmax, kmax): [i, j]
    stronger = r.unsqueeze(1) > r.unsqueeze(2)  # j stronger than i
    covered = (d < rr.unsqueeze(1)) & stronger
    return ~covered.any(2)[n, pos]


def _max3x3(r: torch.Tensor) -> torch.Tensor:
    """3x3 maximum of (N, h, w) with the outside ignored, as two separable passes of slices
    (``max_pool2d`` with stride 1 is ten times slower on the CPU)."""
    import torch
    import torch.nn.functional as F

    p = F.pad(r, (1, 1, 1, 1), value=-math.inf)
    row = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(row[:, :-2], row[:, 1:-1]), row[:, 2:])


def detect_nuclei(det: torch.Tensor, det_mpp: float, min_response: float = MIN_RESPONSE) -> Peaks:
    """Nucleus centres and scales on a detection map.

    Parameters
    ----------
    det : Tensor (N, 1, h, w) float32
        Haematoxylin (or haematoxylin + DAB) optical density on the detection grid.
    det_mpp : float
        Microns per pixel of ``det``.
    min_response : float
        Smallest scale-normalised LoG response kept.
    """
    import torch

    sig_px = [s / det_mpp for s in SIGMAS_UM]
    # Responses of every scale, written in place; the best response per pixel is one reduction
    # over the scale axis, and the best scale is only looked up at the peaks.
    stack = torch.empty((len(sig_px), *det.shape), dtype=det.dtype, device=det.device)
    for i, s in enumerate(sig_px):
        log_response(det, s, out=stack[i])
    resp = stack.amax(0)[:, 0]  # (N, h, w)
    n_, h, w = resp.shape
    # Deterministic tie-break so a flat-topped peak yields exactly one maximum.
    ramp = torch.arange(h * w, device=det.device, dtype=torch.float32).view(1, h, w) / (h * w)
    resp_t = resp + 1e-6 * ramp
    local = _max3x3(resp_t)
    n, y, x = ((resp_t >= local) & (resp > min_response)).nonzero(as_tuple=True)
    # Scale-aware suppression among the candidates: a peak inside NMS_FRACTION of the radius of
    # a stronger one is the same nucleus (texture, nucleoli, a lobe).
    # First scale reaching the maximum, as a running argmax would pick.
    scale = stack[:, n, 0, y, x].argmax(0)
    keep = _suppress(n, y, x, resp_t[n, y, x], scale, sig_px, n_)
    n, y, x, scale = n[keep], y[keep], x[keep], scale[keep]
    dy, dx = _subpixel(resp, n, y, x)
    yx = torch.stack([(y.float() + 0.5 + dy) * det_mpp, (x.float() + 0.5 + dx) * det_mpp], dim=1)
    sig = torch.tensor(SIGMAS_UM, device=det.device, dtype=torch.float32)
    radius = sig[scale] * math.sqrt(2.0)
    return Peaks(tile=n, yx_um=yx, radius_um=radius, response=resp[n, y, x])
