"""Shards of the tile image rendered on the scoring device from the slide's native JPEG tiles.

The CPU path renders a shard's region with OpenSlide or the direct TIFF reader (decode, block
mean, cut) in reading threads, and on a GPU box those threads are the limit: measured on an H100
with 16 cores, ~700 tiles/s rendered against a model at ~17,000. :class:`DeviceJpegImage` does the
same rendering with the decoding and the arithmetic on the device:

1. the level's native tiles under the shard's region (halo included) are read as standalone JPEG
   streams (:meth:`~pathology.tiling._direct.DirectTiffSource.read_jpeg`: a file read each, no
   decoding on the CPU) and decoded in one batch by
   :func:`~pathology.tiling._jpeg.decode_jpeg_batch` (nvJPEG on CUDA);
2. the tiles are laid out as the level's mosaic, the region cut from it (white beyond the image),
   reduced by the grid's exact ``k x k`` block means rounded half up (the tiler's
   :func:`~pathology.slide.block_mean`), and every tile that is not a tissue tile painted white,
   as :class:`~pathology.tiling._image.SlideImage` does;
3. the scorer's tiles (tile + halo on every side) are cut from the region on the device.

On the CPU (libjpeg-turbo) this gives :class:`SlideImage`'s pixels exactly (tested); with nvJPEG,
YCbCr tiles decode to within rounding of a different chroma upsampling (``pathology.tiling._jpeg``
gives the measured differences), so the counts match within a fraction of a percent, not bit for
bit: the decoder is recorded with the results. A shard whose tiles cannot be read this way (a
damaged tile, a decoder error) is rendered by the wrapped :class:`SlideImage` instead, which
flags unreadable tiles as the product always has.

Only grids that are exact block means of a JPEG level qualify (:func:`device_decode_support`):
``snapped`` with an integer level downsample, the usual case (0.25 um/px scans tiled at 0.5).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pathology.errors import TileReadError
from pathology.tiling._direct import open_direct
from pathology.tiling._grid import TileGrid
from pathology.tiling._image import PerThread

if TYPE_CHECKING:
    import torch

    from pathology.tiling._image import SlideImage

__all__ = ["DeviceJpegImage", "device_decode_support"]

log = logging.getLogger(__name__)


def device_decode_support(path: Any, grid: TileGrid) -> str | None:
    """None when :class:`DeviceJpegImage` can render ``grid`` of the slide at ``path``; else why
    not, in one line."""
    from pathology.tiling._direct import why_not

    if not grid.snapped or not float(grid.factor).is_integer():
        return "the grid resamples (not an exact block mean of level pixels)"
    if not float(grid.level_downsample).is_integer():
        return f"level {grid.level}'s downsample {grid.level_downsample} is fractional"
    source = open_direct(path)
    if source is None:
        return f"no direct tile path ({why_not(path)})"
    with source:
        compression = source.levels[grid.level].compression
    if compression != "jpeg":
        return f"level {grid.level} tiles are {compression}, not JPEG"
    return None


class DeviceJpegImage:
    """Reads shards of a slide's tile image on ``device`` (see the module docstring).

    Parameters
    ----------
    image : SlideImage
        The CPU rendering of the same tiles: its grid, tissue tiles and reader spec are used,
        and it renders any shard the device path cannot.
    device : torch.device
        Where tiles are decoded and returned.

    Attributes
    ----------
    shape, dtype
        As the image's.
    fallbacks : int
        Shards rendered by ``image`` because their JPEG tiles could not be read or decoded here.
    """

    def __init__(self, image: SlideImage, device: torch.device) -> None:
        why = device_decode_support(image.spec.path, image.grid)
        if why is not None:
            raise ValueError(f"{image.spec.path}: cannot decode tiles on the device: {why}")
        self.image = image
        self.device = device
        self.grid = image.grid
        self.shape = image.shape
        self.dtype = image.dtype
        self.fallbacks = 0
        self._lock = threading.Lock()
        # One direct TIFF source per reading thread, as SlideImage keeps one reader per thread.
        self._sources = PerThread(lambda: open_direct(image.spec.path))

    def close(self) -> None:
        self._sources.close()
        self.image.close()

    def __enter__(self) -> DeviceJpegImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def any_failed(self, tiles_rc: NDArray[np.integer]) -> bool:
        return bool(self.image.any_failed(tiles_rc))

    def read_shard(self, tiles_rc: NDArray[np.integer], tile_px: int, halo_px: int) -> torch.Tensor:
        """Tiles (k, 3, T + 2 halo, T + 2 halo) uint8 on the device, as
        :func:`~pathology.batch._shards.read_shard_tiles` cuts them from the image."""
        import torch

        rc = np.asarray(tiles_rc, np.int64).reshape(-1, 2)
        t, o = int(tile_px), int(halo_px)
        r0, c0 = (int(v) for v in rc.min(0))
        r1, c1 = (int(v) + 1 for v in rc.max(0))
        box = (c0 * t - o, r0 * t - o, (c1 - c0) * t + 2 * o, (r1 - r0) * t + 2 * o)
        try:
            region = self.read_box(box)
        except (TileReadError, ValueError, RuntimeError) as exc:
            # A damaged tile, or a stream the decoder refuses: the CPU path renders the shard
            # and records which tiles failed.
            from pathology.batch._shards import read_shard_tiles

            with self._lock:
                self.fallbacks += 1
                first = self.fallbacks == 1
            if first:  # once per slide; slide.json counts them all
                log.warning(
                    "%s: a shard's JPEG tiles could not be decoded on %s, rendered on the CPU "
                    "instead (%s)",
                    self.image.spec.path,
                    self.device,
                    " ".join(str(exc).split())[:200],
                )
            cpu = read_shard_tiles(self.image, rc, t, o)
            return torch.from_numpy(cpu).to(self.device)
        side = t + 2 * o
        # (3, H, W) -> every tile's window at once: unfold the rows, then the columns.
        windows = region.unfold(1, side, t).unfold(2, side, t)  # (3, R, C, side, side)
        picked = windows[:, torch.as_tensor(rc[:, 0] - r0), torch.as_tensor(rc[:, 1] - c0)]
        return picked.permute(1, 0, 2, 3).contiguous()

    def read_box(self, out_xywh: tuple[int, int, int, int]) -> torch.Tensor:
        """Pixels (3, h, w) uint8 on the device of an output box (it may leave the image: white
        there), equal to :meth:`SlideImage.read_box` on the CPU decoder."""
        import torch

        from pathology.tiling._jpeg import decode_jpeg_batch

        x0, y0, bw, bh = (int(v) for v in out_xywh)
        grid, dev = self.grid, self.device
        k, t = int(grid.factor), grid.tile_px
        white = torch.full((3, bh, bw), 255, dtype=torch.uint8, device=dev)
        # The part of the box inside the image, and the grid tiles it touches.
        _, hh, ww = self.shape
        ax, ay = max(x0, 0), max(y0, 0)
        bx, by = min(x0 + bw, ww), min(y0 + bh, hh)
        if bx <= ax or by <= ay:
            return white
        tr0, tc0, tr1, tc1 = ay // t, ax // t, (by - 1) // t + 1, (bx - 1) // t + 1
        tissue = self.image._tissue[tr0:tr1, tc0:tc1]
        if not tissue.any():
            return white  # no tissue tile under the box: white glass, as in the store
        # Native tiles under the level pixels of [ax, bx) x [ay, by), decoded in one batch.
        source = self._sources.get()
        lv = source.levels[grid.level]
        (tw, th), (ncols, nrows) = lv.tile_px, lv.tiles_cr
        lw, lh = lv.size_px
        lx0, ly0, lx1, ly1 = ax * k, ay * k, bx * k, by * k
        cc0, rr0 = lx0 // tw, ly0 // th
        cc1 = min((min(lx1, lw) - 1) // tw + 1, ncols)
        rr1 = min((min(ly1, lh) - 1) // th + 1, nrows)
        level = torch.full((3, ly1 - ly0, lx1 - lx0), 255, dtype=torch.uint8, device=dev)
        if cc1 > cc0 and rr1 > rr0:
            tiles_cr = [(c, r) for r in range(rr0, rr1) for c in range(cc0, cc1)]
            streams = [source.read_jpeg(grid.level, c, r) for c, r in tiles_cr]
            present = [i for i, s in enumerate(streams) if s is not None]
            decoded = decode_jpeg_batch([streams[i] for i in present], dev, workers=1)
            tiles = torch.full((len(streams), 3, th, tw), 255, dtype=torch.uint8, device=dev)
            if present:
                tiles[torch.as_tensor(present, device=dev)] = decoded
            nr, nc = rr1 - rr0, cc1 - cc0
            mosaic = tiles.view(nr, nc, 3, th, tw).permute(2, 0, 3, 1, 4)
            mosaic = mosaic.reshape(3, nr * th, nc * tw)
            # Level pixels inside both the image and the decoded tiles; the rest stays white.
            mx1, my1 = min(lx1, lw, cc1 * tw), min(ly1, lh, rr1 * th)
            level[:, : my1 - ly0, : mx1 - lx0] = mosaic[
                :, ly0 - rr0 * th : my1 - rr0 * th, lx0 - cc0 * tw : mx1 - cc0 * tw
            ]
        out = _block_mean(level, k)  # (3, by - ay, bx - ax)
        # Tiles that are not tissue tiles read white.
        if not tissue.all():
            mask = torch.from_numpy(np.ascontiguousarray(tissue)).to(dev)
            mask = mask.repeat_interleave(t, 0).repeat_interleave(t, 1)
            mask = mask[ay - tr0 * t : by - tr0 * t, ax - tc0 * t : bx - tc0 * t]
            out = torch.where(mask, out, torch.full_like(out, 255))
        white[:, ay - y0 : by - y0, ax - x0 : bx - x0] = out
        return white


def _block_mean(img: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` block means of (3, H, W) uint8 (H, W multiples of k), rounded half up as
    :func:`pathology.slide.block_mean`: ``floor(sum / n + 1/2) = (2 sum + n) // (2 n)``."""
    import torch

    if k == 1:
        return img
    c, h, w = img.shape
    sums = img.view(c, h // k, k, w // k, k).sum(dim=(2, 4), dtype=torch.int32)
    n = k * k
    return torch.div(2 * sums + n, 2 * n, rounding_mode="floor").to(torch.uint8)
