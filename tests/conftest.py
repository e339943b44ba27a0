"""Shared fixtures: paths to committed test data and to the team's ../shared data folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
SHARED_DATA = TESTS.parents[1] / "shared" / "data"


def shared_file(relpath: str) -> Path:
    """A file from ``../shared/data``; skips the test with the reason when the folder is absent."""
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(
            f"needs ../shared/data/{relpath} (the team's shared data folder beside the checkout)"
        )
    return path


@pytest.fixture
def cmu1_path() -> Path:
    """Real Aperio H&E slide CMU-1-Small-Region.svs (CC0), committed in tests/data."""
    path = DATA / "CMU-1-Small-Region.svs"
    if not path.exists():  # pragma: no cover - committed file
        pytest.fail(f"missing committed test slide {path}")
    return path


def write_generic_tiff(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    levels: int = 1,
    compression: str = "jpeg",
) -> Path:
    """Write a tiled pyramidal TIFF that OpenSlide opens as ``generic-tiff``.

    Each level is its own top-level page marked ``subfiletype=1`` (reduced image); the pixel size goes
    into the resolution tags in centimetres, which OpenSlide turns into ``openslide.mpp-x``.
    """
    import tifffile

    kwargs: dict[str, object] = {}
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            ds = 2**lvl
            img = image[::ds, ::ds]
            if mpp is not None:
                kwargs = {
                    "resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                    "resolutionunit": "CENTIMETER",
                }
            tw.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=1 if lvl else 0,
                **kwargs,
            )
    return path
