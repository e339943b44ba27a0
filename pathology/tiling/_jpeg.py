"""Batched JPEG decoding of native slide tiles: nvJPEG on a CUDA device, libjpeg-turbo threads on CPU.

The building block for decoding past the CPU limit: :meth:`DirectTiffSource.read_jpeg
<pathology.tiling._direct.DirectTiffSource.read_jpeg>` hands out each native tile as a
standalone JPEG stream (tables merged, colour space stated by an Adobe APP14 marker), and
:func:`decode_jpeg_batch` decodes a list of them in one call:

- ``cuda``: ``torchvision.io.decode_jpeg(list_of_tensors, device=...)``, nvJPEG's batched decoder
  (the hardware JPEG engine on A100/H100, CUDA cores elsewhere). torchvision is optional (the
  ``gpu`` extra) and imported only here, only for a CUDA device. Measured on an H100
  (2026-11-24, ``tests/test_jpeg.py``): on YCbCr 4:2:0 tiles nvJPEG's pixels differ from
  libjpeg-turbo's by 0.2-0.4 grey levels on average (99.9 % within 6-10 levels; up to 36 at
  sharp colour edges: its chroma upsampling is not libjpeg-turbo's "fancy" one), and scoring
  the decoded mosaic gives tumour counts within 0.6 %. nvJPEG ignores the Adobe APP14 transform
  flag, even when asked for the components unchanged: RGB-coded tiles (old Aperio files such
  as CMU-1) came back colour-converted (43 levels off on average), so a batch of RGB-coded
  streams is decoded on the CPU and copied to the device instead.
- ``cpu``: ``imagecodecs.jpeg8_decode`` (libjpeg-turbo, releases the GIL) in a thread pool,
  straight into one preallocated array. Bit-identical to :meth:`DirectTiffSource.read_tile` and
  therefore to OpenSlide.

:func:`read_jpeg_tiles` does both steps for a list of ``tile_cr`` of one level and gives the
tiles as :meth:`~pathology.tiling._direct.DirectTiffSource.read_tile` ``(pad=True)`` does: full
native size, white for missing tiles and beyond the image's right and bottom edge.

Coordinate planes as in :mod:`pathology.tiling._direct` (``tile_cr``: (col, row) of a native tile).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np

from pathology.tiling._direct import _jpeg_header_segments

if TYPE_CHECKING:
    import torch

    from pathology.tiling._direct import DirectTiffSource

__all__ = ["decode_jpeg_batch", "nvjpeg_unavailable", "read_jpeg_tiles"]


def _frame(stream: bytes) -> tuple[tuple[int, int], bool]:
    """((w, h), RGB by an Adobe APP14 transform 0?) from a JPEG's header."""
    segments, _ = _jpeg_header_segments(stream)
    rgb = any(s[1] == 0xEE and s[4:9] == b"Adobe" and len(s) >= 16 and s[15] == 0 for s in segments)
    for s in segments:
        if s[1] in (0xC0, 0xC1, 0xC2) and len(s) >= 10:
            h, w = int.from_bytes(s[5:7], "big"), int.from_bytes(s[7:9], "big")
            return (w, h), rgb
    raise ValueError("JPEG stream has no frame header (SOF0/1/2)")


def decode_jpeg_batch(
    streams: Sequence[bytes], device: str | torch.device = "cpu", *, workers: int = 2
) -> torch.Tensor:
    """Decode JPEG streams of one size into one tensor, on ``device``.

    Parameters
    ----------
    streams : sequence of bytes
        Complete JPEG files of the same width and height, e.g. from
        :meth:`~pathology.tiling._direct.DirectTiffSource.read_jpeg`. A stream whose components
        are RGB must say so with an Adobe APP14 marker (transform 0), as ``read_jpeg``'s do.
    device : str or torch.device
        ``cpu`` (libjpeg-turbo in ``workers`` threads) or a CUDA device (batched nvJPEG through
        torchvision).
    workers : int
        Decoding threads on CPU (ignored on CUDA).

    Returns
    -------
    torch.Tensor (N, 3, H, W) uint8 on ``device``
        RGB. On CPU a channels-last view of an (N, H, W, 3) array (no copy); call
        ``.contiguous()`` for NCHW memory. An empty batch gives (0, 3, 0, 0).

    Raises
    ------
    ValueError
        The streams differ in size or colour space (CUDA), or a header cannot be parsed.
    ImportError
        CUDA device but no usable torchvision (install the ``gpu`` extra on a CUDA machine).
    """
    import torch

    dev = torch.device(device)
    if not streams:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=dev)
    frames = [_frame(s) for s in streams]
    sizes = {f[0] for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"JPEG streams of one batch must share a size, got {sorted(sizes)}")
    (w, h) = sizes.pop()
    if dev.type == "cuda":
        rgb = {f[1] for f in frames}
        if len(rgb) != 1:
            raise ValueError("JPEG streams of one batch must share a colour space (RGB or YCbCr)")
        if rgb.pop():  # nvJPEG would colour-convert RGB components (see the module docstring)
            return _decode_cpu(streams, w, h, workers).contiguous().to(dev)
        return _decode_cuda(streams, dev)
    if dev.type != "cpu":
        raise ValueError(f"device {dev}: JPEG batches decode on cpu or cuda")
    return _decode_cpu(streams, w, h, workers)


def _decode_cpu(streams: Sequence[bytes], w: int, h: int, workers: int) -> torch.Tensor:
    """libjpeg-turbo in ``workers`` threads into one (N, H, W, 3) array, as (N, 3, H, W) view."""
    import torch

    out = np.empty((len(streams), h, w, 3), np.uint8)

    def one(i: int) -> None:
        # Straight into the batch (no copy); the frame headers above fixed every tile's shape.
        imagecodecs.jpeg8_decode(streams[i], outcolorspace="RGB", out=out[i])

    if workers <= 1 or len(streams) == 1:
        for i in range(len(streams)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(streams))))
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def nvjpeg_unavailable() -> str | None:
    """None when torchvision's nvJPEG decoder can be imported; else why not, one line (with the
    install hint). The first successful import costs seconds (~5 s on the H100 box)."""
    try:
        import torchvision.io  # noqa: F401
    except Exception as exc:  # ImportError, or a CPU torch's "operator torchvision::nms" error
        return (
            f"GPU JPEG decoding needs torchvision with nvJPEG (pip install -e '.[gpu]' on a CUDA "
            f"machine); import failed: {' '.join(str(exc).split())}"
        )
    return None


def _decode_cuda(streams: Sequence[bytes], dev: torch.device) -> torch.Tensor:
    """nvJPEG batch decode of YCbCr streams through torchvision (>= 0.19 takes a list)."""
    import torch

    why = nvjpeg_unavailable()
    if why is not None:
        raise ImportError(why)
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    tiles: Any = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)  # YCbCr -> RGB by nvJPEG
    return torch.stack(list(tiles))


def read_jpeg_tiles(
    source: DirectTiffSource,
    level: int,
    tiles_cr: Sequence[tuple[int, int]],
    device: str | torch.device = "cpu",
    *,
    workers: int = 2,
) -> torch.Tensor:
    """Native JPEG tiles of one level, read and batch-decoded on ``device``.

    Parameters
    ----------
    source : DirectTiffSource
        The slide's direct tile path.
    level : int
        Pyramid level; its tiles must be JPEG.
    tiles_cr : sequence of (col, row)
        Native tiles to decode.
    device : str or torch.device
        ``cpu`` or a CUDA device, as in :func:`decode_jpeg_batch`.
    workers : int
        Decoding threads on CPU.

    Returns
    -------
    torch.Tensor (N, 3, tile_h, tile_w) uint8 on ``device``
        Equal (on CPU bit for bit) to ``source.read_tile(level, col, row, pad=True)`` per tile:
        white where the tile is missing or lies beyond the image.

    Raises
    ------
    ValueError
        The level's tiles are not JPEG (from ``read_jpeg``).
    TileReadError
        A tile is truncated or damaged.
    """
    import torch

    lv = source.levels[level]
    tw, th = lv.tile_px
    lw, lh = lv.size_px
    streams = [source.read_jpeg(level, int(c), int(r)) for c, r in tiles_cr]
    present = [i for i, s in enumerate(streams) if s is not None]
    decoded = decode_jpeg_batch([s for s in streams if s is not None], device, workers=workers)
    dev = decoded.device
    if len(present) == len(streams):
        out = decoded
    else:
        out = torch.full((len(streams), 3, th, tw), 255, dtype=torch.uint8, device=dev)
        if present:
            out[torch.tensor(present, device=dev)] = decoded
    for i, (c, r) in enumerate(tiles_cr):
        vis_w, vis_h = min(tw, lw - int(c) * tw), min(th, lh - int(r) * th)
        if vis_w < tw or vis_h < th:
            out[i, :, :, vis_w:] = 255
            out[i, :, vis_h:, :] = 255
    return out
