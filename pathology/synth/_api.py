"""Public entry points: whole slides on disk, small regions in memory, truth without pixels."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pathology.errors import ConfigError, OutputExistsError
from pathology.synth._layout import Scene, build_scene
from pathology.synth._params import SynthParams
from pathology.synth._render import (
    Textures,
    build_textures,
    compose_rgb,
    render_band,
    render_maps,
    render_rgb,
)
from pathology.synth._svs import TILE, downsample4, encode_tiles, tile_rows_for, write_svs
from pathology.synth._truth import SlideValues, SynthTruth, cells_from_arrays, score_cells

__all__ = [
    "RegionRender",
    "SynthSlide",
    "output_paths",
    "render_region",
    "synthesize_region",
    "synthesize_slide",
    "synthesize_truth",
]

#: Largest image :func:`synthesize_region` renders in one piece (use a slide beyond that).
MAX_REGION_PX = 6000 * 6000


@dataclass(frozen=True)
class SynthSlide:
    """What :func:`synthesize_slide` wrote.

    Attributes
    ----------
    svs_path, truth_path, tissue_path : Path
        ``X.svs``, ``X.truth.json`` and ``X.tissue.png``.
    values : SlideValues
        Slide-level truth (also in the JSON).
    truth : SynthTruth
        The full truth, cells included.
    levels : int
        Pyramid levels in the SVS.
    seconds : float
        Wall time of the whole write.
    """

    svs_path: Path
    truth_path: Path
    tissue_path: Path
    values: SlideValues
    truth: SynthTruth
    levels: int
    seconds: float


@dataclass(frozen=True)
class RegionRender:
    """A rendered image with its pixel-level truth (for segmentation and scoring tests).

    Attributes
    ----------
    rgb : ndarray (h, w, 3) uint8
        Pixels as they go into the JPEG encoder (blur and sensor noise applied, no JPEG).
    cell_labels, nucleus_labels : ndarray (h, w) int32
        Truth cell id of each body / nucleus pixel, -1 elsewhere.
    membrane : ndarray (h, w) bool
        Membrane ring pixels.
    od_h, od_dab : ndarray (h, w) float32
        Haematoxylin and DAB optical density before blur (the stain amounts placed).
    tissue : ndarray (h, w) bool
        Tissue (anti-aliased outline > 0.5), before artifacts.
    truth : SynthTruth
    """

    rgb: NDArray[np.uint8]
    cell_labels: NDArray[np.int32]
    nucleus_labels: NDArray[np.int32]
    membrane: NDArray[np.bool_]
    od_h: NDArray[np.float32]
    od_dab: NDArray[np.float32]
    tissue: NDArray[np.bool_]
    truth: SynthTruth


def output_paths(out_path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(svs, truth json, tissue png) paths for an output ``X.svs``."""
    p = Path(out_path)
    stem = p.with_suffix("") if p.suffix.lower() == ".svs" else p
    svs = p if p.suffix.lower() == ".svs" else p.with_name(p.name + ".svs")
    return svs, stem.with_name(stem.name + ".truth.json"), stem.with_name(stem.name + ".tissue.png")


def _rounded(v: tuple[float, float, float], digits: int) -> tuple[float, float, float]:
    return round(v[0], digits), round(v[1], digits), round(v[2], digits)


def _truth(scene: Scene, tissue_file: str | None) -> SynthTruth:
    from pathology import __version__

    p, c, look = scene.params, scene.cells, scene.look
    st = c.stain
    # Round once, in float64, and score the very numbers the JSON will hold.
    nuc, cyt, mem, cov = (
        np.round(a.astype(np.float64), 4)
        for a in (st.nucleus, st.cytoplasm, st.membrane, st.coverage)
    )
    positive, values = score_cells(p.marker, c.type, nuc, cyt, mem, cov)
    cells = cells_from_arrays(
        c.ix + 0.5, c.iy + 0.5, c.type, nuc, cyt, mem, cov, c.area_um2, positive
    )
    mask = scene.tissue_mask
    return SynthTruth(
        params=p.to_dict(),
        width=p.size[0],
        height=p.size[1],
        mpp=p.mpp,
        marker=p.marker,
        objective_power=p.objective_power,
        background_rgb=_rounded(look.background_rgb, 3),
        stains={
            "haematoxylin": _rounded(look.stain_h, 6),
            "dab": _rounded(look.stain_dab, 6),
            "background": _rounded(look.stain_neutral, 6),
        },
        values=values,
        cells=cells,
        tissue_mask={
            "file": tissue_file,
            "downsample": scene.fields.ds,
            "width": mask.shape[1],
            "height": mask.shape[0],
            "tissue_fraction": round(float(mask.mean()), 4),
            "excludes": ["glass", "pen", "dust", "border"],
        },
        generator=f"pathology {__version__}",
    )


def synthesize_truth(params: SynthParams) -> SynthTruth:
    """The truth of the slide ``params`` describes, without rendering a pixel (fast)."""
    return _truth(build_scene(params), None)


def _region_size(params: SynthParams) -> tuple[int, int]:
    """(w, h) of an in-memory render; refuses images too large to hold (a slide streams instead)."""
    w, h = params.size
    if w * h > MAX_REGION_PX:
        raise ConfigError(
            f"{w}x{h} px is too large to render in memory (max {MAX_REGION_PX:,} px); "
            "use synthesize_slide to stream it to an SVS"
        )
    return w, h


def render_region(params: SynthParams) -> RegionRender:
    """Render the whole ``params.width x params.height`` image in memory, with label maps.

    Raises
    ------
    ConfigError
        The image is larger than :data:`MAX_REGION_PX` pixels (write a slide instead).
    """
    w, h = _region_size(params)
    scene = build_scene(params)
    tex = build_textures(scene)
    maps = render_maps(scene, tex, 0, h, 0, w)
    rgb = compose_rgb(scene, tex, maps)
    k = maps.halo
    crop = (slice(k, k + h), slice(k, k + w))
    return RegionRender(
        rgb=rgb,
        cell_labels=maps.cell_labels[crop].copy(),
        nucleus_labels=maps.nucleus_labels[crop].copy(),
        membrane=maps.membrane[crop].copy(),
        od_h=maps.od_h[crop].copy(),
        od_dab=maps.od_dab[crop].copy(),
        tissue=maps.alpha[crop] > 0.5,
        truth=_truth(scene, None),
    )


def synthesize_region(params: SynthParams) -> tuple[NDArray[np.uint8], SynthTruth]:
    """Small synthetic image in memory (no file), e.g. for unit tests of the scoring model.

    Returns
    -------
    rgb : ndarray (height, width, 3) uint8
        The pixels the slide writer would JPEG-encode for the same params (blur and noise
        applied): identical to the level 0 of :func:`synthesize_slide` before compression.
    truth : SynthTruth
        Cells in pixel coordinates of ``rgb``.
    """
    w, h = _region_size(params)
    scene = build_scene(params)
    return render_rgb(scene, build_textures(scene), 0, h, 0, w), _truth(scene, None)


def _band_job(
    scene: Scene, tex: Textures, y0: int, rows: int, width_px: int, quality: int
) -> tuple[list[bytes], NDArray[np.uint8]]:
    rgb = render_band(scene, tex, y0, y0 + rows, 0, width_px // TILE, TILE)
    return encode_tiles(rgb, quality), downsample4(rgb)


def _bands(
    scene: Scene, tex: Textures, workers: int
) -> Iterator[tuple[list[bytes], NDArray[np.uint8]]]:
    """Bands of whole tile rows, rendered and encoded by ``workers`` threads, yielded in order.

    At most ``workers + 1`` bands are in flight, which bounds memory at any slide size.
    """
    p = scene.params
    w, h = p.size
    width_px = -(-w // TILE) * TILE
    height_px = -(-h // TILE) * TILE
    rows = tile_rows_for(w) * TILE
    starts = list(range(0, height_px, rows))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="synth") as pool:
        pending: deque[Future[tuple[list[bytes], NDArray[np.uint8]]]] = deque()
        it = iter(starts)
        for y0 in it:
            pending.append(
                pool.submit(
                    _band_job, scene, tex, y0, min(rows, height_px - y0), width_px, p.jpeg_quality
                )
            )
            if len(pending) > workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(
                    pool.submit(
                        _band_job,
                        scene,
                        tex,
                        nxt,
                        min(rows, height_px - nxt),
                        width_px,
                        p.jpeg_quality,
                    )
                )
            yield result


def band_count(params: SynthParams) -> int:
    """Number of bands :func:`synthesize_slide` renders (for progress bars)."""
    w, h = params.size
    rows = tile_rows_for(w) * TILE
    return -(-(-(-h // TILE) * TILE) // rows)


def synthesize_slide(
    params: SynthParams,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSlide:
    """Write ``X.svs``, ``X.truth.json`` and ``X.tissue.png`` for ``params``.

    Parameters
    ----------
    params : SynthParams
    out_path : path-like
        The SVS path (``.svs`` is appended when missing).
    overwrite : bool
        Replace existing outputs; otherwise any existing one raises OutputExistsError.
    workers : int, optional
        Rendering threads (default: CPU count, at most 4). Output is identical for any value.
    progress : callable(done, total), optional
        Called after each band.

    Returns
    -------
    SynthSlide
        Paths written, slide values, full truth, level count and wall time.

    Raises
    ------
    OutputExistsError
        An output exists and ``overwrite`` is false (nothing is written).
    """
    from PIL import Image

    t0 = time.perf_counter()
    svs, truth_path, tissue_path = output_paths(out_path)
    if not overwrite:
        for q in (svs, truth_path, tissue_path):
            if q.exists():
                raise OutputExistsError(
                    f"{q}: already exists; pass --overwrite (overwrite=True) to replace it"
                )
    svs.parent.mkdir(parents=True, exist_ok=True)
    scene = build_scene(params)
    tex = build_textures(scene)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    total = band_count(params)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    # Write under temporary names and rename at the end: a crash never leaves a half slide that
    # looks complete.
    tmp_svs = svs.with_name(svs.name + ".partial")
    try:
        levels = write_svs(
            tmp_svs,
            size=params.size,
            mpp=params.mpp,
            quality=params.jpeg_quality,
            bands=_bands(scene, tex, n_workers),
            marker=params.marker,
            seed=params.seed,
            extra_description={"Synthetic": f"pathology.synth seed {params.seed}"},
            on_band=tick,
        )
        truth = _truth(scene, tissue_path.name)
        mask = (scene.tissue_mask * np.uint8(255)).astype(np.uint8)
        Image.fromarray(mask).save(tissue_path)
        truth.write(truth_path)
        os.replace(tmp_svs, svs)
    finally:
        if tmp_svs.exists():
            tmp_svs.unlink()
    return SynthSlide(
        svs, truth_path, tissue_path, truth.values, truth, levels, time.perf_counter() - t0
    )
