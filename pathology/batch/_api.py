"""``score_slides``: a batch of slides into one output folder, one failure never stopping the rest.

The folder's batch files are rebuilt from the finished slides' ``slide.json`` after every slide,
so ``slides.csv`` is always complete for the slides done so far, whatever happens later:

    OUT/slides.csv     one row per finished slide in OUT (columns: :data:`SLIDE_COLUMNS`)
    OUT/failures.csv   slide_id, path, marker, error: the slides this run could not score
    OUT/report.html    the table, the failures and every slide's heatmap
"""

from __future__ import annotations

import functools
import json
import logging
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pathology._io import write_csv
from pathology.batch._manifest import SlideJob
from pathology.batch._slide import SLIDE_COLUMNS, ScoreSettings, SlideOutcome, score_slide
from pathology.errors import OutputExistsError, PathologyError

__all__ = [
    "BatchProgress",
    "BatchResult",
    "SlideFailure",
    "collect_rows",
    "finish_batch",
    "score_slides",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideFailure:
    """A slide that could not be scored, with a one-line reason that names the file."""

    slide_id: str
    path: str
    marker: str
    error: str


@dataclass(frozen=True)
class BatchResult:
    """What a batch did: finished slides (scored now or reused) and failures."""

    out: Path
    done: list[SlideOutcome] = field(default_factory=list)
    failures: list[SlideFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class BatchProgress(Protocol):
    """Receives progress events (the CLI draws bars from them)."""

    def slide_started(self, index: int, total: int, job: SlideJob) -> None: ...
    def stage(self, job: SlideJob, name: str) -> None: ...
    def tiles(self, done: int, total: int) -> None: ...
    def slide_finished(self, job: SlideJob, outcome: SlideOutcome | SlideFailure) -> None: ...


def _one_line(exc: BaseException, job: SlideJob) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PathologyError):
        return text if str(job.path) in text or str(job.slide_id) in text else f"{job.path}: {text}"
    return f"{job.path}: internal error ({type(exc).__name__}: {text}); rerun with -v for the traceback"


def collect_rows(out: Path) -> list[dict[str, Any]]:
    """The ``slides.csv`` rows of every finished slide in ``out``, sorted by slide_id."""
    rows = []
    for done in sorted(out.glob("*/slide.json")):
        try:
            rows.append(json.loads(done.read_text())["row"])
        except (ValueError, KeyError, OSError) as exc:
            log.warning("%s: unreadable, left out of slides.csv (%s)", done, exc)
    return sorted(rows, key=lambda r: str(r["slide_id"]))


def write_batch_files(
    out: Path, failures: Sequence[SlideFailure], provenance: dict[str, Any]
) -> Any:
    """Rebuild ``slides.csv`` (and ``failures.csv``) from the finished slides; returns the table."""
    import pandas as pd

    rows = collect_rows(out)
    frame = pd.DataFrame(rows, columns=list(SLIDE_COLUMNS))
    frame["evaluable"] = frame["evaluable"].map(
        lambda v: "" if v is None or v != v else ("true" if v else "false")
    )
    write_csv(out / "slides.csv", frame)
    fail_path = out / "failures.csv"
    if failures:
        write_csv(
            fail_path,
            pd.DataFrame(
                [f.__dict__ for f in failures], columns=["slide_id", "path", "marker", "error"]
            ),
        )
    elif fail_path.exists():
        fail_path.unlink()  # our own file from an earlier run whose failures are now fixed
    return frame


def score_slides(
    jobs: Sequence[SlideJob],
    out: str | os.PathLike[str],
    settings: ScoreSettings | None = None,
    *,
    overwrite: bool = False,
    progress: BatchProgress | None = None,
    on_error: Callable[[SlideJob, BaseException], None] | None = None,
) -> BatchResult:
    """Score ``jobs`` into ``out``; finished slides with the same settings are reused.

    A slide that fails (bad file, missing mpp, unknown marker, unreadable store, ...) is recorded
    with a one-line reason and the batch goes on. ``slides.csv`` is rewritten atomically after each
    slide; ``report.html`` at the end.

    Parameters
    ----------
    jobs : sequence of SlideJob
    out : path
        Output folder (created).
    settings : ScoreSettings
    overwrite : bool
        Replace slides' results made with other settings (otherwise such a slide fails).
    progress : BatchProgress, optional
    on_error : callable(job, exception), optional
        Called for every failed slide (the CLI prints tracebacks there under ``-v``).
    """
    from pathology import __version__

    settings = settings or ScoreSettings()
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root}: exists and is not a folder; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    provenance: dict[str, Any] = {
        "software": f"pathology {__version__}",
        "model": settings.model,
        "target_mpp": settings.target_mpp,
        "tile_px": settings.tile_px,
        "device_requested": settings.device,
    }
    result = BatchResult(out=root)
    for i, job in enumerate(jobs):
        if progress is not None:
            progress.slide_started(i, len(jobs), job)
        outcome: SlideOutcome | SlideFailure
        on_stage: Callable[[str], None] | None = None
        if progress is not None:
            on_stage = functools.partial(progress.stage, job)
        try:
            outcome = score_slide(
                job,
                root,
                settings,
                overwrite=overwrite,
                on_stage=on_stage,
                on_tiles=progress.tiles if progress else None,
            )
            result.done.append(outcome)
        except Exception as exc:  # one slide's failure never stops the others
            log.debug("slide %s failed:\n%s", job.slide_id, traceback.format_exc())
            if on_error is not None:
                on_error(job, exc)
            outcome = SlideFailure(job.slide_id, str(job.path), job.marker, _one_line(exc, job))
            result.failures.append(outcome)
        write_batch_files(root, result.failures, provenance)
        if progress is not None:
            progress.slide_finished(job, outcome)
    finish_batch(result, provenance)
    return result


def finish_batch(result: BatchResult, provenance: dict[str, Any]) -> None:
    """Final ``slides.csv`` / ``failures.csv`` and ``report.html`` (serial and distributed runs)."""
    from pathology.batch._report import write_batch_report

    frame = write_batch_files(result.out, result.failures, provenance)
    markers = {o.row["marker"]: o.row["marker_sha256"] for o in result.done}
    write_batch_report(
        result.out / "report.html",
        frame,
        out_dir=result.out,
        failures=[(f.path, f.error) for f in result.failures],
        provenance={**provenance, **{f"marker {k} sha256": v for k, v in markers.items()}},
    )
