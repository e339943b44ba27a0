"""Public scoring API: build the model once, score batches of tiles or a whole image.

``score_tiles`` is what the slide stage calls per batch; ``score_image`` cuts an in-memory image
(a DeepLIIF tile, a synthetic region, a notebook crop) into tiles with context and stitches the
cells back into image coordinates.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pathology.errors import ConfigError
from pathology.scoring._celltype import CellTypeModel, load_cell_types
from pathology.scoring._device import (
    default_batch_size,
    resolve_device,
    run_halving,
    torch_threads,
    tune_host_allocator,
)
from pathology.scoring._markers import MarkerConfig, load_marker
from pathology.scoring._stains import StainEstimate

if TYPE_CHECKING:
    import torch

    from pathology.scoring._model import CellScorer

__all__ = [
    "DEFAULT_MODEL",
    "TileScores",
    "load_model",
    "marker_is_nuclear",
    "model_dir",
    "model_fingerprint",
    "score_image",
    "score_tiles",
]

DEFAULT_MODEL = "physics-v1"
_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def model_dir(model: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Folder of a model: a path, or a name under ``$PATHOLOGY_MODELS`` or the repository's ``models/``."""
    p = Path(model)
    if p.is_dir():
        return p
    extra = os.environ.get("PATHOLOGY_MODELS")
    for root in ([Path(extra)] if extra else []) + [_REPO_MODELS]:
        if (root / str(model)).is_dir():
            return root / str(model)
    raise ConfigError(f"unknown model {str(model)!r}: no folder of that name in {_REPO_MODELS}")


def model_fingerprint(model: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """SHA-256 of what a model's results depend on: the files of its folder (the fitted
    parameters; not its Markdown documentation, such as the model card) and the source of the
    scoring engine (``pathology.scoring``, the physics). A finished slide scored under another
    fingerprint is not reused: a refit or a code change that can move a count makes earlier
    results stale, an edit of the model card does not."""
    engine = Path(__file__).resolve().parent
    files = sorted(
        p for p in model_dir(model).resolve().rglob("*") if p.is_file() and p.suffix != ".md"
    )
    files += sorted(engine.glob("*.py"))
    # Hashed once per version of the files (name, size, modification time).
    return _fingerprint(tuple((str(f), *_stamp(f)) for f in files))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        f = Path(name)
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class TileScores:
    """Counts and cells of N scored tiles.

    Attributes
    ----------
    counts : ndarray (N, C) int64
        Per-tile counts, columns ``count_names``.
    count_names : tuple of str
    cells : dict of str -> ndarray (K,)
        Per-cell records (see ``CELL_FIELDS``); ``tile`` indexes the input tiles, ``x``/``y`` are
        pixels in the tile's core at the input mpp.
    device : str
        Device the model ran on.
    model, marker, marker_sha256 : str
        Provenance.
    """

    counts: NDArray[np.int64]
    count_names: tuple[str, ...]
    cells: dict[str, NDArray[Any]]
    device: str
    model: str
    marker: str
    marker_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def total(self) -> dict[str, int]:
        """Counts summed over all tiles."""
        return {k: int(v) for k, v in zip(self.count_names, self.counts.sum(0), strict=True)}


def marker_is_nuclear(cfg: MarkerConfig) -> bool:
    """True when every rule of the marker scores the nucleus only (DAB never seen pure)."""
    return all(r.compartments == ("nucleus",) for r in cfg.cells.values())


def load_model(
    marker: str | os.PathLike[str] | MarkerConfig,
    mpp: float,
    *,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    stains: StainEstimate | None = None,
    halo_px: int | None = None,
    device: str | torch.device = "auto",
    cell_types: CellTypeModel | None = None,
) -> CellScorer:
    """The scorer for ``marker`` at ``mpp``, on ``device`` (``auto`` = CUDA when present), eval mode."""
    from pathology.scoring._model import CellScorer, halo_for

    cfg = load_marker(marker)
    ct = cell_types or load_cell_types(model_dir(model) / "cell_types.json")
    halo = halo_for(mpp) if halo_px is None else int(halo_px)
    scorer = CellScorer(cfg, mpp, ct, stains=stains, halo_px=halo)
    scorer.model_name = Path(model).name  # type: ignore[assignment]
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_host_allocator()
    return scorer.to(dev).eval()


def _as_nchw(tiles: Any) -> torch.Tensor:
    import torch

    t = torch.as_tensor(tiles) if not isinstance(tiles, torch.Tensor) else tiles
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"tiles must be a 4-D uint8 array, got shape {tuple(t.shape)} {t.dtype}")
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"tiles must be (N, H, W, 3) or (N, 3, H, W), got {tuple(t.shape)}")
    return t.contiguous()


def run_model(
    scorer: CellScorer, tiles: Any, batch_size: int | None = None, *, workers: int = 1
) -> TileScores:
    """Run a loaded scorer over tiles (N, H, W, 3) / (N, 3, H, W) uint8 in batches of
    ``batch_size`` (default :func:`~pathology.scoring._device.default_batch_size`: 64 on the CPU,
    1024 on CUDA).

    Host tiles are pinned and copied with ``non_blocking`` on CUDA (tiles already on the device
    are used in place); a CUDA out-of-memory error halves the batch and retries. On the CPU,
    ``workers`` > 1 scores that many batches at once, each in its own thread with one torch
    thread (:func:`~pathology.scoring._device.torch_threads`); the results are the same and in
    the same order. On CUDA batches run one after another.
    """
    import torch

    from pathology.scoring._model import COUNT_NAMES

    t = _as_nchw(tiles)
    dev = next(iter(scorer.buffers())).device
    cuda = dev.type == "cuda"
    batch_size = int(batch_size or default_batch_size(dev))
    if cuda and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()

    def one(i: int, j: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.inference_mode():
            out = scorer(t[i:j].to(dev, non_blocking=cuda))
        cells = {k: v.cpu() for k, v in out.cells.items()}
        cells["tile"] = cells["tile"] + i
        return out.counts.cpu(), cells

    n = t.shape[0]
    if workers > 1 and not cuda and n > batch_size:
        starts = range(0, n, max(1, batch_size))
        with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(lambda i: one(i, min(n, i + batch_size)), starts))
    else:
        parts = run_halving(one, 0, n, max(1, batch_size)) if n else []
    if parts:
        counts = torch.cat([p[0] for p in parts]).numpy()
        cells = {k: torch.cat([p[1][k] for p in parts]).numpy() for k in parts[0][1]}
    else:
        counts = np.zeros((0, len(COUNT_NAMES)), np.int64)
        cells = {}
    return TileScores(
        counts=counts,
        count_names=COUNT_NAMES,
        cells=cells,
        device=str(dev),
        model=str(getattr(scorer, "model_name", DEFAULT_MODEL)),
        marker=scorer.marker.name,
        marker_sha256=scorer.marker.sha256,
    )


def score_tiles(
    tiles: Any,
    marker: str | os.PathLike[str] | MarkerConfig,
    *,
    mpp: float,
    device: str = "auto",
    batch_size: int | None = None,
    halo_px: int = 0,
    stains: StainEstimate | None = None,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
) -> TileScores:
    """Cells and per-tile counts of a batch of RGB tiles.

    Parameters
    ----------
    tiles : array (N, H, W, 3) or (N, 3, H, W) uint8
        Tiles at ``mpp`` microns per pixel, each with ``halo_px`` of context on every side
        (cells centred in the halo are measured with their context but not counted).
    marker : name, YAML path or MarkerConfig
    device : {"auto", "cpu", "cuda"}
    batch_size : int, optional
        Tiles per forward pass (default 64 on the CPU, 1024 on CUDA; halved automatically on
        CUDA out-of-memory).
    """
    scorer = load_model(marker, mpp, model=model, stains=stains, halo_px=halo_px, device=device)
    return run_model(scorer, tiles, batch_size)


def tiles_with_halo(
    rgb: NDArray[np.uint8], tile_px: int, halo_px: int
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Cut (H, W, 3) into (N, tile+2 halo, tile+2 halo, 3) tiles padded with white; origins (N, 2) as (y, x)."""
    h, w = rgb.shape[:2]
    ny, nx = -(-h // tile_px), -(-w // tile_px)
    pad = np.full((ny * tile_px + 2 * halo_px, nx * tile_px + 2 * halo_px, 3), 255, np.uint8)
    pad[halo_px : halo_px + h, halo_px : halo_px + w] = rgb
    size = tile_px + 2 * halo_px
    out = np.empty((ny * nx, size, size, 3), np.uint8)
    origins = np.empty((ny * nx, 2), np.int64)
    k = 0
    for r in range(ny):
        for c in range(nx):
            out[k] = pad[r * tile_px : r * tile_px + size, c * tile_px : c * tile_px + size]
            origins[k] = (r * tile_px, c * tile_px)
            k += 1
    return out, origins


def image_stains(
    img: NDArray[np.uint8],
    stains: StainEstimate | str,
    marker: str | os.PathLike[str] | MarkerConfig,
) -> StainEstimate:
    """The unmixing for an in-memory image: ``"estimate"`` fits the vectors and glass to it
    (:func:`estimate_stains`; the reference DAB vector is kept for nuclear markers),
    ``"reference"`` gives the Ruifrok-Johnston vectors and white glass, a :class:`StainEstimate`
    is used as it is."""
    from pathology.scoring._stains import estimate_stains

    if not isinstance(stains, str):
        return stains
    if stains not in ("estimate", "reference"):
        raise ValueError(
            f"stains must be 'estimate', 'reference' or a StainEstimate, got {stains!r}"
        )
    if stains == "reference":
        return StainEstimate()
    return estimate_stains(img, estimate_dab=not marker_is_nuclear(load_marker(marker)))


def score_image(
    rgb: NDArray[np.uint8],
    marker: str | os.PathLike[str] | MarkerConfig,
    *,
    mpp: float,
    tile_px: int = 256,
    device: str = "auto",
    batch_size: int = 16,
    stains: StainEstimate | str = "estimate",
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    cell_types: CellTypeModel | None = None,
) -> TileScores:
    """Score an in-memory RGB image (H, W, 3) uint8; cell ``x``/``y`` are image pixels.

    ``stains="estimate"`` (default) fits the haematoxylin/DAB vectors and glass brightness to this
    image (:func:`estimate_stains`); ``"reference"`` uses the Ruifrok-Johnston vectors and white
    glass; or pass a :class:`StainEstimate` measured elsewhere (e.g. over the whole slide).
    """
    from pathology.scoring._model import halo_for

    img = np.asarray(rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    est = image_stains(img, stains, marker)
    halo = halo_for(mpp)
    tiles, origins = tiles_with_halo(img, tile_px, halo)
    scorer = load_model(
        marker, mpp, model=model, stains=est, halo_px=halo, device=device, cell_types=cell_types
    )
    res = run_model(scorer, tiles, batch_size)
    cells = dict(res.cells)
    if cells:
        cells["x"] = cells["x"] + origins[cells["tile"], 1]
        cells["y"] = cells["y"] + origins[cells["tile"], 0]
        inside = (cells["x"] < img.shape[1]) & (cells["y"] < img.shape[0])
        cells = {k: v[inside] for k, v in cells.items()}
    return TileScores(
        counts=res.counts,
        count_names=res.count_names,
        cells=cells,
        device=res.device,
        model=res.model,
        marker=res.marker,
        marker_sha256=res.marker_sha256,
        extra={"origins": origins, "tile_px": tile_px, "stains": est},
    )
