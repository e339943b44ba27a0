"""Bilinear sampling of the stain maps at points around cell centres, all tiles of a batch at once.

Frames: maps are (N, C, H, W) at ``meas_mpp``; centres and offsets are in microns from the
top-left corner of each point's own tile, as (y, x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["sample_points"]


def sample_points(
    maps: torch.Tensor,
    meas_mpp: float,
    tile: torch.Tensor,
    centre_um: torch.Tensor,
    offset_um: torch.Tensor,
    dirs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bilinear samples of ``maps`` (N, C, H, W) at ``centre_um + offset_um``: centres (K, 2) in um
    from the top-left corner of tile ``tile`` (K,), offsets (M, 2) shared by all items or (K, M, 2);
    returns (K, C, M), a transposed view of channel-major (C, K, M) storage. With ``dirs`` (A, 2),
    ``offset_um`` (K, A, P) are distances along those directions instead: the points
    ``offset_um[k, a, p] * dirs[a]`` (M = A * P), written straight into the grid.

    Points are clamped to their own tile (border padding), then all tiles are sampled as one tall
    (C, N*H, W) image (stain-major maps, see :func:`deconvolve`, are viewed that way without a
    copy): no padded per-tile grid and no gather afterwards. The CPU ``grid_sample`` runs one
    thread per batch item and computes each point's corners and weights once for all channels of
    its item, so every item holds all C channels: one item on one thread (the output is then
    channel-major as it comes), else the points are split into one item per thread.
    """
    import torch
    import torch.nn.functional as F

    n_tiles, c, hh, ww = maps.shape
    k = centre_um.shape[0]
    m = offset_um.shape[-2] if dirs is None else offset_um.shape[1] * offset_um.shape[2]
    dt, dev = maps.dtype, maps.device
    tall = maps.transpose(0, 1)
    tall = (tall if tall.is_contiguous() else tall.contiguous()).view(1, c, n_tiles * hh, ww)
    # Normalised (x, y) coordinates for align_corners=True (-1 / +1 = centres of the first / last
    # pixel) of the tall image, where tile t occupies rows [t H, (t + 1) H). Clamping y to each
    # point's own tile's pixel centres is padding_mode="border" per tile; x needs no clamp, the
    # tall image's own border is every tile's. Both planes are written in place into the
    # interleaved grid (a stack of two planes is a slow strided copy).
    sx = 2.0 / max(ww - 1, 1) / meas_mpp
    sy = 2.0 / max(n_tiles * hh - 1, 1) / meas_mpp
    top = (tile.to(dt) * (hh * meas_mpp * sy) - 1.0).view(-1, 1)  # first row of each tile
    bottom = top + (hh - 1) * meas_mpp * sy
    cx = ((centre_um[:, 1] - 0.5 * meas_mpp) * sx - 1.0).view(-1, 1)
    cy = (centre_um[:, 0] - 0.5 * meas_mpp).view(-1, 1) * sy + top
    threads = torch.get_num_threads() if dev.type == "cpu" else 1
    parts = max(1, min(threads, k))
    kp = -(-k // parts) if k else 0  # centres per batch item
    # Every item gets at least one centre: 17 centres on 16 threads are 9 items of 2, not 16.
    parts = max(1, -(-k // kp)) if kp else 1
    # Planar grid storage (item, x/y, centre, point): every plane is written contiguously (fast
    # vectorised adds and clamps; strided writes into an interleaved (..., 2) grid are several
    # times slower), and grid_sample reads planar grids on its fast path as well.
    grid = torch.empty((parts, 2, kp, m), dtype=dt, device=dev)
    if dirs is None and offset_um.dim() == 2:
        shared = (offset_um[:, 1] * sx, offset_um[:, 0] * sy)
    for p in range(parts):
        r0, r1 = p * kp, min((p + 1) * kp, k)
        gx, gy = grid[p, 0, : r1 - r0], grid[p, 1, : r1 - r0]
        if r1 - r0 < kp:
            grid[p, :, r1 - r0 :] = 0.0
        if dirs is None and offset_um.dim() == 2:
            torch.add(cx[r0:r1], shared[0], out=gx)
            torch.add(cy[r0:r1], shared[1], out=gy)
        elif dirs is None:
            torch.add(cx[r0:r1], offset_um[r0:r1, :, 1] * sx, out=gx)
            torch.add(cy[r0:r1], offset_um[r0:r1, :, 0] * sy, out=gy)
        else:
            # The same products and sums as for offsets ``t * dirs``, with no (K, M, 2) offsets.
            t = offset_um[r0:r1]
            for plane, col, scale, base in ((gx, 1, sx, cx), (gy, 0, sy, cy)):
                torch.mul(t, dirs[:, col].view(1, -1, 1), out=plane.view(t.shape))
                plane.mul_(scale).add_(base[r0:r1])
        torch.maximum(gy, top[r0:r1], out=gy)
        torch.minimum(gy, bottom[r0:r1], out=gy)
    samp = F.grid_sample(
        tall.expand(parts, -1, -1, -1),
        grid.view(parts, 2, 1, kp * m).permute(0, 2, 3, 1),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )  # (parts, C, 1, kp * m)
    if parts == 1 or c == 1:
        flat = samp.view(c, parts * kp, m)
    else:
        flat = samp.view(parts, c, kp, m).transpose(0, 1).reshape(c, parts * kp, m)
    return flat[:, :k].transpose(0, 1)
