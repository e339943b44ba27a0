"""Output folder handling: refuse to overwrite, write every file atomically."""

from __future__ import annotations

from pathlib import Path

from pathology._io import sha256, write_bytes, write_csv, write_text
from pathology.errors import OutputExistsError
from pathology.stratify._vocab import OUTPUT_NAMES

__all__ = ["claim_out_dir", "sha256", "write_bytes", "write_csv", "write_text"]


def claim_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse when it holds outputs of an earlier run, unless ``overwrite``.

    With ``overwrite`` the earlier outputs (only the files named in ``OUTPUT_NAMES``) are removed
    first, so a run that stops on bad data never leaves old results beside its new
    ``problems.csv``. Other files in the folder are never touched.

    Raises
    ------
    OutputExistsError
        ``out`` holds an output and ``overwrite`` is false (nothing is written or removed).
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another --out")
    existing = [out / n for n in OUTPUT_NAMES if (out / n).exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise OutputExistsError(
            f"{out}: already holds stratify outputs ({names}); pass --overwrite "
            "(overwrite=True) to replace them or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
