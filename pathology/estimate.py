"""``pathology estimate``: how long a cohort will take on this box, from a ``pathology bench`` run.

The bench measures, on one slide, what an end-to-end run costs once per slide and per tissue tile
(``end_to_end_per_slide_s`` + tiles / ``end_to_end_tile_rate``, the same for ``--no-store``; and,
with ``--cohort N``, how a batch of N such slides compares with N single-slide runs). A cohort's
own slides differ in size, so the estimate plans each slide's tissue tiles exactly as scoring
will (:func:`pathology.tiling.plan_tissue_tiles`: the slide's thumbnail and tissue mask, no tile
read) and applies those rates per slide:

    seconds(slide) = per_slide_s + tissue_tiles / tile_rate       (store, and --no-store)
    seconds(batch) = batch_factor x sum of seconds(slide) with the store

where ``batch_factor`` = (cohort seconds / N) / end_to_end seconds, both measured on the bench's
slide in the same run (below 1 where slides overlap, above 1 where the cluster's start and each
worker's imports cost more than they save).

The rates hold for the box, device, ``--workers``, target mpp and tile size the bench ran with
(a mismatch of mpp or tile size is refused); the marker changes the model's cost little (the
bench scores p16). A slide that cannot be planned (corrupt, not a slide, no mpp) is reported in
one line and left out of the sums.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathology.errors import ConfigError, PathologyError

__all__ = ["MODES", "BenchRates", "CohortEstimate", "SlideEstimate", "estimate_cohort"]

#: Estimates made, keyed by name: (bench JSON prefix, what it means).
MODES = {
    "store": ("end_to_end", "pathology score (tile store, the default)"),
    "no_store": ("end_to_end_no_store", "pathology score --no-store"),
}


@dataclass(frozen=True)
class BenchRates:
    """The rates of one ``pathology bench --json`` file that an estimate uses."""

    source: str
    slide: str
    device: str
    workers: int
    mpp: float
    tile_px: int
    #: mode -> (seconds paid once per slide, tissue tiles per second)
    per_slide: dict[str, tuple[float, float]]
    #: Batch time per slide over one slide's end-to-end time (``pathology bench --cohort N``),
    #: and how the batch ran.
    batch_factor: float | None = None
    batch_how: str = ""

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> BenchRates:
        """Rates from a bench JSON; ConfigError naming the file when it is not one or holds no
        end-to-end rates."""
        src = Path(path)
        try:
            data = json.loads(src.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{src}: bench results not found; make them on this box with "
                "`pathology bench [SLIDE] --json FILE`"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{src}: not a pathology bench JSON ({exc})") from None
        if not isinstance(data, dict) or "tile_px" not in data or "mpp" not in data:
            raise ConfigError(f"{src}: not a pathology bench JSON (no tile_px / mpp)")
        per_slide = {}
        for mode, (prefix, _) in MODES.items():
            fixed, rate = data.get(f"{prefix}_per_slide_s"), data.get(f"{prefix}_tile_rate")
            if isinstance(fixed, (int, float)) and isinstance(rate, (int, float)) and rate > 0:
                per_slide[mode] = (float(fixed), float(rate))
        if not per_slide:
            raise ConfigError(
                f"{src}: holds no end-to-end rates; run `pathology bench` with its end_to_end "
                "and end_to_end_no_store stages (the default) and --json"
            )
        raw = data.get("seconds")
        seconds: dict[str, Any] = raw if isinstance(raw, dict) else {}
        n_batch = data.get("cohort_slides")
        parts = [
            float(v) if isinstance(v, (int, float)) and v > 0 else None
            for v in (n_batch, seconds.get("cohort"), seconds.get("end_to_end"))
        ]
        n, t_batch, t_one = parts
        factor = t_batch / n / t_one if n and t_batch and t_one else None
        return cls(
            source=str(src),
            slide=str(data.get("slide", "?")),
            device=str(data.get("device", "?")),
            workers=int(data.get("workers", 0)),
            mpp=float(data["mpp"]),
            tile_px=int(data["tile_px"]),
            per_slide=per_slide,
            batch_factor=factor if "store" in per_slide else None,
            batch_how=f"{n_batch} slides, {data.get('cohort_cluster', '?')}" if factor else "",
        )


@dataclass(frozen=True)
class SlideEstimate:
    """One slide's planned tissue tiles and estimated seconds per mode (empty on error)."""

    slide_id: str
    path: str
    tissue_tiles: int = 0
    tissue_mm2: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class CohortEstimate:
    """Per-slide estimates and the cohort's totals."""

    rates: BenchRates
    slides: list[SlideEstimate]

    @property
    def planned(self) -> list[SlideEstimate]:
        return [s for s in self.slides if s.error is None]

    @property
    def failed(self) -> list[SlideEstimate]:
        return [s for s in self.slides if s.error is not None]

    @property
    def tissue_tiles(self) -> int:
        return sum(s.tissue_tiles for s in self.planned)

    def total_seconds(self) -> dict[str, float]:
        """Seconds for the planned slides, per mode; ``batch``: the store's scaled by the bench's
        batch factor."""
        out = {m: sum(s.seconds[m] for s in self.planned) for m in self.rates.per_slide}
        if self.rates.batch_factor:
            out["batch"] = self.rates.batch_factor * out["store"]
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """One CSV row per slide."""
        rows = []
        for s in self.slides:
            row: dict[str, Any] = {
                "slide_id": s.slide_id,
                "path": s.path,
                "tissue_tiles": s.tissue_tiles if s.error is None else None,
                "tissue_mm2": round(s.tissue_mm2, 3) if s.error is None else None,
            }
            for m in self.rates.per_slide:
                row[f"seconds_{m}"] = round(s.seconds[m], 1) if s.error is None else None
            row["error"] = s.error or ""
            rows.append(row)
        return rows


def estimate_cohort(
    slides: Sequence[tuple[str, str | os.PathLike[str], float | None]],
    rates: BenchRates,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    min_tissue: float = 0.25,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> CohortEstimate:
    """Plan every slide's tissue tiles and estimate its seconds from ``rates``.

    Parameters
    ----------
    slides : sequence of (slide_id, path, mpp or None)
        ``mpp`` overrides (or supplies) the scan's microns per pixel, as ``--slide-mpp`` does.
    rates : BenchRates
        From :meth:`BenchRates.read`; its mpp and tile size must be ``target_mpp`` and ``tile_px``.
    workers : int
        Slides planned at once (threads).
    progress : callable(done, total), optional
    """
    if not math.isclose(rates.mpp, target_mpp, rel_tol=0.02) or rates.tile_px != tile_px:
        raise ConfigError(
            f"{rates.source}: measured with {rates.tile_px} px tiles at {rates.mpp:g} um/px, not "
            f"{tile_px} px at {target_mpp:g}: rerun `pathology bench --mpp {target_mpp:g} "
            f"--tile {tile_px}` for these settings"
        )
    from pathology.tiling import plan_tissue_tiles

    def plan(item: tuple[str, str | os.PathLike[str], float | None]) -> SlideEstimate:
        sid, path, mpp = item
        try:
            p = plan_tissue_tiles(
                path,
                target_mpp=target_mpp,
                tile_px=tile_px,
                min_tissue=min_tissue,
                slide_mpp=mpp,
            )
        except PathologyError as exc:
            return SlideEstimate(sid, str(path), error=" ".join(str(exc).split()))
        tiles = len(p.table["row"])
        tile_mm2 = (tile_px * p.grid.mpp / 1000.0) ** 2
        mm2 = float(p.table["tissue"].astype("float64").sum() * tile_mm2)
        seconds = {m: fixed + tiles / rate for m, (fixed, rate) in rates.per_slide.items()}
        return SlideEstimate(sid, str(path), tiles, mm2, seconds)

    done: list[SlideEstimate] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for est in pool.map(plan, slides):
            done.append(est)
            if progress is not None:
                progress(len(done), len(slides))
    return CohortEstimate(rates, done)


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.4 h`` or ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
