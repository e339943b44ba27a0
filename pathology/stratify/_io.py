"""Output folder handling: refuse to overwrite, write every file atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pathology.errors import OutputExistsError
from pathology.stratify._vocab import OUTPUT_NAMES

if TYPE_CHECKING:
    import pandas as pd

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


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A crash or a full disk leaves the old file (or none), never a truncated one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """:func:`write_bytes` of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` as CSV (no index, full float precision, empty cells for NaN)."""
    return write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of the inputs)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
