"""The built-in demo: synthesise a p16 and a PD-L1 slide and run the whole scoring path on them.

The demo is the quick start's proof that an install works end to end: it writes exactly what
``pathology score`` writes (``slides.csv``, ``report.html``, per-slide tile store, ``tiles.parquet``,
cells, heatmap) and puts each measured call next to the synthetic truth in :class:`DemoResult`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathology.errors import OutputExistsError, PathologyError

if TYPE_CHECKING:
    from pathology.batch import BatchProgress

__all__ = ["DEMO_SLIDES", "DemoResult", "default_demo_dir", "run_demo"]

log = logging.getLogger(__name__)

#: slide_id -> synth preset. A p16-positive (HPV-surrogate positive) slide and a PD-L1 CPS >= 20 slide.
DEMO_SLIDES: dict[str, str] = {"demo-p16": "p16_positive", "demo-pdl1": "pdl1_cps_ge20"}

# A demo folder holds this file; a non-empty folder without it belongs to someone else.
_STAMP = ".pathology-demo"


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured on one slide, next to the synthetic truth."""

    slide_id: str
    marker: str
    svs: str
    width: int
    height: int
    mpp: float
    vendor: str
    tissue_fraction: float
    tissue_iou: float
    truth_tissue_fraction: float
    truth_tumor_cells: int
    truth_call: str | None
    truth_p16_positive_pct: float | None
    truth_cps: float | None
    truth_tps: float | None
    tissue_tiles: int
    call: str
    tumor_cells: int
    immune_cells: int
    positive_pct: float | None
    cps: float | None
    tps: float | None
    evaluable: bool
    qc_flags: str
    device: str
    seconds_synth: float
    seconds_tissue: float
    seconds_scoring: float


def default_demo_dir() -> Path:
    """``$XDG_CACHE_HOME/pathology/demo``, else ``~/.cache/pathology/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pathology" / "demo"


def _claim_dir(out_dir: Path, overwrite: bool) -> None:
    if (
        out_dir.exists()
        and any(out_dir.iterdir())
        and not (out_dir / _STAMP).exists()
        and not overwrite
    ):
        raise OutputExistsError(
            f"{out_dir}: folder is not empty and was not made by 'pathology demo'; "
            "choose another --out or pass --overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _STAMP).write_text("made by 'pathology demo'; safe to delete\n")


def _iou(a: Any, b: Any) -> float:
    import numpy as np

    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run_demo(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    size_px: tuple[int, int] = (4096, 3072),
    mpp: float = 0.5,
    seed: int = 7,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    batch_progress: BatchProgress | None = None,
) -> list[DemoResult]:
    """Synthesise the demo slides (reusing them when already there) and score them.

    Parameters
    ----------
    out_dir : path, optional
        Where slides and results go; default :func:`default_demo_dir`.
    size_px : (width, height)
        Level-0 size of each synthetic slide in pixels.
    mpp : float
        Microns per level-0 pixel of the synthetic slides.
    seed : int
        Seed of the first slide (the next gets ``seed + 1``).
    device : str
        Scoring device (``auto`` = CUDA when present).
    overwrite : bool
        Allow writing into a non-empty folder that the demo did not make.
    progress : callable, optional
        Called with a short message as each step starts.
    batch_progress : BatchProgress, optional
        Receives the scoring progress events (the CLI's bars).

    Returns
    -------
    list of DemoResult, one per slide in :data:`DEMO_SLIDES`.
    """
    import numpy as np
    from skimage.transform import resize

    from pathology.batch import ScoreSettings, SlideJob, score_slides
    from pathology.slide import open_slide
    from pathology.synth import SynthParams, load_truth, synthesize_slide
    from pathology.tissue import compute_tissue_mask

    say = progress or (lambda msg: log.info(msg))
    root = Path(out_dir) if out_dir is not None else default_demo_dir()
    _claim_dir(root, overwrite)
    prepared = []
    for i, (slide_id, preset) in enumerate(DEMO_SLIDES.items()):
        params = SynthParams.preset(
            preset, width=size_px[0], height=size_px[1], mpp=mpp, seed=seed + i
        )
        svs = root / f"{slide_id}.svs"
        truth_path = svs.with_suffix(".truth.json")
        t0 = time.perf_counter()
        reuse = (
            svs.exists()
            and truth_path.exists()
            and load_truth(truth_path).params == params.to_dict()
        )
        if reuse:
            say(f"{slide_id}: reusing {svs}")
        else:
            say(
                f"{slide_id}: synthesising {preset} ({size_px[0]} x {size_px[1]} px at {mpp} um/px)"
            )
            synthesize_slide(params, svs, overwrite=True)
        truth = load_truth(truth_path)
        t_synth = time.perf_counter() - t0

        say(f"{slide_id}: tissue mask")
        t0 = time.perf_counter()
        with open_slide(svs) as reader:
            info = reader.info
            tissue = compute_tissue_mask(reader)
        t_tissue = time.perf_counter() - t0
        slide_dir = root / slide_id
        slide_dir.mkdir(exist_ok=True)
        tissue.to_png(slide_dir / "tissue.png")
        prepared.append((slide_id, svs, truth, info, tissue, reuse, t_synth, t_tissue))

    say("scoring")
    jobs = [
        SlideJob(slide_id=sid, path=svs, marker=truth.marker) for sid, svs, truth, *_ in prepared
    ]
    # The folder is the demo's own (claimed above): results made with other settings (a slide
    # synthesised anew, another model or engine version) are replaced; up-to-date ones are reused.
    batch = score_slides(
        jobs,
        root,
        ScoreSettings(device=device),
        overwrite=True,
        progress=batch_progress,
    )
    if batch.failures:
        raise PathologyError(f"demo scoring failed: {batch.failures[0].error}")
    rows = {o.slide_id: o.row for o in batch.done}

    from PIL import Image

    results: list[DemoResult] = []
    for slide_id, svs, truth, info, tissue, _reuse, t_synth, t_tissue in prepared:
        true_mask = np.asarray(Image.open(root / truth.tissue_mask["file"])) > 0
        ours = resize(tissue.mask, true_mask.shape, order=0, anti_aliasing=False) > 0
        v = truth.values
        row = rows[slide_id]
        results.append(
            DemoResult(
                slide_id=slide_id,
                marker=truth.marker,
                svs=str(svs),
                width=info.dimensions[0],
                height=info.dimensions[1],
                mpp=float(info.mpp or 0.0),
                vendor=info.vendor,
                tissue_fraction=round(tissue.fraction(), 4),
                tissue_iou=round(_iou(ours, true_mask), 4),
                truth_tissue_fraction=round(float(true_mask.mean()), 4),
                truth_tumor_cells=v.tumor_cells,
                truth_call=v.call,
                truth_p16_positive_pct=v.p16_positive_pct,
                truth_cps=v.cps,
                truth_tps=v.tps,
                tissue_tiles=int(row["tissue_tiles"]),
                call=str(row["call"]),
                tumor_cells=int(row["tumor_cells"]),
                immune_cells=int(row["immune_cells"]),
                positive_pct=row["positive_pct"],
                cps=row["cps"],
                tps=row["tps"],
                evaluable=bool(row["evaluable"]),
                qc_flags=str(row["qc_flags"]),
                device=str(row["device"]),
                seconds_synth=round(t_synth, 2),
                seconds_tissue=round(t_tissue, 2),
                seconds_scoring=float(row["seconds"]),
            )
        )
    (root / "demo.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return results
