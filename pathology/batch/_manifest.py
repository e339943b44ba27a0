"""What to score: slide paths (files or folders) or a manifest CSV, as a list of :class:`SlideJob`.

Problems with the list itself (a manifest without a ``path`` column, two slides with the same
``slide_id``) stop the run before anything is scored. Problems with one slide (a missing file, an
unknown marker, a corrupt slide) only fail that slide, when it is scored.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pathology.errors import ConfigError, SlideNotFoundError

__all__ = ["SLIDE_SUFFIXES", "SlideJob", "jobs_from_paths", "read_manifest"]

#: File name endings taken when a folder is given (OpenSlide formats and plain/OME TIFF).
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
)
MANIFEST_COLUMNS = ("path", "marker", "slide_id", "patient_id", "mpp")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class SlideJob:
    """One slide to score.

    Attributes
    ----------
    slide_id : str
        Names the slide's output folder and its row in ``slides.csv`` (default: the file stem).
    path : Path
    marker : str
        Marker name or YAML path.
    patient_id : str
        Copied into ``slides.csv`` (empty when unknown).
    mpp : float or None
        The scan's microns per pixel when the file records none (or a wrong one).
    origin : str
        Where the job came from, for messages (``manifest.csv line 4``, ``command line``).
    """

    slide_id: str
    path: Path
    marker: str
    patient_id: str = ""
    mpp: float | None = None
    origin: str = "command line"


def slide_stem(path: Path) -> str:
    """File name without its slide suffix (``a.ome.tiff`` -> ``a``)."""
    name = path.name
    for suffix in sorted(SLIDE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_id(slide_id: str, where: str) -> None:
    if not _SAFE_ID.match(slide_id) or slide_id in (".", ".."):
        raise ConfigError(
            f"{where}: slide_id {slide_id!r} cannot name a folder; use letters, digits, '.', '_', '+', '-'"
        )


def _check_unique(jobs: list[SlideJob]) -> None:
    seen: dict[str, SlideJob] = {}
    for job in jobs:
        other = seen.get(job.slide_id)
        if other is not None:
            raise ConfigError(
                f"{job.origin}: slide_id {job.slide_id!r} is also used by {other.path} ({other.origin}); "
                "give each slide its own slide_id (a manifest's slide_id column)"
            )
        seen[job.slide_id] = job


def _expand(path: Path) -> list[Path]:
    if path.is_dir() and path.suffix.lower() not in (".zarr",):
        found = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and p.name.lower().endswith(SLIDE_SUFFIXES)
            and not p.name.startswith(".")
        )
        if not found:
            raise SlideNotFoundError(
                path, f"folder holds no slide files ({', '.join(SLIDE_SUFFIXES[:6])}, ...)"
            )
        return found
    return [path]


def jobs_from_paths(
    paths: list[str | os.PathLike[str]], marker: str, *, mpp: float | None = None
) -> list[SlideJob]:
    """Jobs for slide files and folders of slides given on the command line (one marker for all)."""
    jobs = []
    for arg in paths:
        for p in _expand(Path(arg)):
            sid = slide_stem(p)
            _check_id(sid, str(p))
            jobs.append(SlideJob(slide_id=sid, path=p, marker=marker, mpp=mpp))
    _check_unique(jobs)
    return jobs


def read_manifest(
    manifest: str | os.PathLike[str], *, marker: str | None = None, mpp: float | None = None
) -> list[SlideJob]:
    """Jobs from a manifest CSV: columns ``path`` and ``marker`` (unless ``marker`` is given),
    optional ``slide_id``, ``patient_id`` and ``mpp``; relative paths are relative to the manifest."""
    src = Path(manifest)
    if not src.is_file():
        raise ConfigError(f"{src}: manifest not found")
    try:
        with src.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{src}: not a readable CSV manifest ({exc})") from None
    need = ["path"] + ([] if marker else ["marker"])
    missing = [c for c in need if c not in header]
    if missing:
        raise ConfigError(
            f"{src}: manifest lacks column(s) {', '.join(missing)}; "
            f"expected {', '.join(MANIFEST_COLUMNS)} (slide_id, patient_id, mpp optional)"
        )
    jobs = []
    for i, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{src} line {i}"
        if not any(row.values()):
            continue
        if not row.get("path"):
            raise ConfigError(f"{where}: empty path")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = src.parent / path
        row_marker = row.get("marker") or marker
        if not row_marker:
            raise ConfigError(f"{where}: empty marker")
        row_mpp = mpp
        if row.get("mpp"):
            try:
                row_mpp = float(row["mpp"])
            except ValueError:
                raise ConfigError(f"{where}: mpp {row['mpp']!r} is not a number") from None
            if not 0.05 <= row_mpp <= 50:
                raise ConfigError(f"{where}: mpp {row_mpp} is outside 0.05-50 um/px")
        sid = row.get("slide_id") or slide_stem(path)
        _check_id(sid, where)
        jobs.append(
            SlideJob(
                slide_id=sid,
                path=path,
                marker=row_marker,
                patient_id=row.get("patient_id", ""),
                mpp=row_mpp,
                origin=where,
            )
        )
    if not jobs:
        raise ConfigError(f"{src}: manifest lists no slides")
    _check_unique(jobs)
    return jobs
