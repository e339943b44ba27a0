"""Parameters of a synthetic IHC slide: one frozen, validated dataclass plus named presets.

Everything that changes what the slide *shows* (and therefore its truth) is a field of
:class:`SynthParams`; how fast it is written (threads, progress) is not. Look parameters left at
``None`` (counterstain strength, glass tint) are drawn from ``seed``, so a batch of slides differs
in appearance without anyone tuning each one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pathology.errors import ConfigError

__all__ = ["INTENSITY_OD", "MARKERS", "PRESETS", "SynthParams"]

#: Markers the generator renders, with their staining pattern (see ``_marker.py``).
MARKERS = ("p16", "pdl1", "ki67")

#: Typical DAB optical density of positive cells per named intensity (QuPath bins 0.2/0.4/0.6
#: make these 1+, 2+ and 3+).
INTENSITY_OD = {"weak": 0.30, "moderate": 0.50, "strong": 0.78}

# Slide sizes: below one tile the pyramid is meaningless; above 200k px no scanner writes.
_MIN_SIZE, _MAX_SIZE = 256, 200_000

# Named presets: the demo, the tests and the benchmarks use these. Each is a dict of overrides of
# the dataclass defaults; ``SynthParams.preset(name, **more)`` applies further overrides on top.
PRESETS: dict[str, dict[str, Any]] = {
    # p16 (CAP: positive >= 70% of tumour cells with moderate-strong nuclear AND cytoplasmic stain)
    "p16_positive": {
        "marker": "p16",
        "positive_fraction": 0.85,
        "weak_fraction": 0.05,
        "intensity": "strong",
    },
    "p16_equivocal": {
        "marker": "p16",
        "positive_fraction": 0.60,
        "weak_fraction": 0.05,
        "intensity": "strong",
    },
    "p16_negative": {
        "marker": "p16",
        "positive_fraction": 0.08,
        "weak_fraction": 0.07,
        "intensity": "moderate",
    },
    "p16_weak_diffuse": {
        "marker": "p16",
        "positive_fraction": 0.15,
        "weak_fraction": 0.70,
        "intensity": "moderate",
    },
    # Deliberately hard: a quarter of the tumour cells sit within 0.03 OD of the 0.4 cut.
    "p16_borderline": {
        "marker": "p16",
        "positive_fraction": 0.75,
        "weak_fraction": 0.05,
        "intensity": "moderate",
        "borderline_fraction": 0.25,
    },
    # PD-L1 22C3 CPS bins (<1, 1-19, >=20) and a slide under the 100-tumour-cell minimum.
    "pdl1_cps_lt1": {
        "marker": "pdl1",
        "positive_fraction": 0.003,
        "immune_positive_fraction": 0.004,
        "intensity": "moderate",
    },
    "pdl1_cps_1_19": {
        "marker": "pdl1",
        "positive_fraction": 0.04,
        "immune_positive_fraction": 0.10,
        "intensity": "moderate",
        "complete_membrane_fraction": 0.4,
    },
    "pdl1_cps_ge20": {
        "marker": "pdl1",
        "positive_fraction": 0.40,
        "immune_positive_fraction": 0.35,
        "intensity": "strong",
        "complete_membrane_fraction": 0.6,
    },
    "pdl1_few_tumor": {
        "marker": "pdl1",
        "positive_fraction": 0.30,
        "immune_positive_fraction": 0.20,
        "intensity": "moderate",
        "tumor_fraction": 0.05,
        "tumor_cell_limit": 60,
    },
    "ki67": {"marker": "ki67", "positive_fraction": 0.35, "intensity": "moderate"},
}

Vector3 = tuple[float, float, float]


def _err(msg: str) -> ConfigError:
    return ConfigError(msg)


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise _err(f"{name} must be a fraction between 0 and 1, got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float, unit: str = "") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        u = f" {unit}" if unit else ""
        raise _err(f"{name} must be between {lo} and {hi}{u}, got {value!r}")


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines a synthetic IHC slide. Same params => byte-identical slide.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels (``height`` defaults to ``width``), 256-200000.
    mpp : float
        Microns per level-0 pixel (0.25 = 40x, 0.5 = 20x, 1.0 = 10x). Cells keep their size in
        microns at every mpp.
    marker : {"p16", "pdl1", "ki67"}
        Staining pattern: p16 nuclear + cytoplasmic in tumour cells; PD-L1 membranous in tumour
        cells and membranous/cytoplasmic in lymphocytes and macrophages; Ki-67 nuclear.
    positive_fraction : float
        Fraction of tumour cells positive under the marker's rule (p16: nucleus and cytoplasm
        >= 0.4 OD; PD-L1: membrane >= 0.2, i.e. TPS/100; Ki-67: nucleus >= 0.2). Exact up to
        rounding to whole cells.
    weak_fraction : float
        p16 only: fraction of tumour cells with weak (1+, 0.2-0.4 OD) staining, below the cut.
    immune_positive_fraction : float
        PD-L1 only: fraction of lymphocytes and macrophages with membrane/cytoplasm >= 0.2 OD.
    complete_membrane_fraction : float
        PD-L1: fraction of positive tumour cells with a complete ring; the rest are partial arcs
        (25-75 % of the circumference).
    decoy_fraction : float
        PD-L1: fraction of tumour cells with cytoplasmic-only DAB (0.28-0.5 OD) and an unstained
        membrane; negative by the 22C3 rule, a trap for whole-cell means.
    intensity : {"weak", "moderate", "strong"} or float
        DAB optical density of positive cells (0.30 / 0.50 / 0.78 OD, or a number 0.05-2.0).
    borderline_fraction : float
        Fraction of tumour cells placed within 0.03 OD of the positivity cut (split in proportion
        between positives and negatives). 0 keeps every cell >= 0.05 OD clear of all bin edges.
    immune_density : float
        Lymphocytes + macrophages per mm^2 of tissue (0-20000); denser next to tumour nests.
    tissue_fraction : float
        Fraction of the slide area covered by tissue (0.05-0.95).
    tumor_fraction : float
        Fraction of the tissue area in tumour nests (0-0.95).
    tumor_cell_limit : int or None
        Keep at most this many tumour cells, in one small nest (for "< 100 cells" slides).
    stain_vectors : ((3,), (3,)) or None
        Haematoxylin and DAB absorbance vectors; default Ruifrok-Johnston (pathology.stain).
    stain_jitter : float
        Standard deviation of per-slide Gaussian noise added to each vector component before
        renormalising (0 = exact vectors). The vectors used are recorded in the truth.
    counterstain : float or None
        Haematoxylin strength multiplier; None draws 0.75-1.3 from the seed.
    background_od : float
        Neutral optical density of the section itself (mounting, thickness), 0-0.2.
    blur_um : float
        Optical point-spread sigma in microns (0-3).
    noise : float
        Sensor noise standard deviation in 8-bit levels (0-20).
    jpeg_quality : int
        JPEG quality of the SVS tiles (1-100).
    variety : float
        Extra variety of the look between slides and cells, for fitting cell classifiers (0-1;
        0, the default, is the reference look that presets, tests and benchmarks use, and leaves
        a slide byte-identical; cells, types and DAB amounts never change). At 1: cytoplasm
        haematoxylin raised per slide by up to 0.12 OD (a counterstain that soaks the
        cytoplasm), each nucleus's haematoxylin scaled by 0.5-1.25 (pale and dark nuclei side by
        side), tumour nuclei up to 1.65:1 elongated instead of 1.35:1, and a neutral share of the
        DAB absorbance growing with its density (dense precipitate scatters and reads darker
        than its hue, so some of it unmixes as haematoxylin, as on scanned slides).
    artifacts : bool
        Add pen marks (green/blue/black ink), dust specks and a black scanner border strip.
    seed : int
        Seed of every random choice (layout, look, artifacts).
    """

    width: int = 4096
    height: int | None = None
    mpp: float = 0.25
    marker: str = "p16"
    positive_fraction: float = 0.8
    weak_fraction: float = 0.0
    immune_positive_fraction: float = 0.0
    complete_membrane_fraction: float = 0.5
    decoy_fraction: float = 0.03
    intensity: str | float = "strong"
    borderline_fraction: float = 0.0
    immune_density: float = 800.0
    tissue_fraction: float = 0.6
    tumor_fraction: float = 0.45
    tumor_cell_limit: int | None = None
    stain_vectors: tuple[Vector3, Vector3] | None = None
    stain_jitter: float = 0.04
    counterstain: float | None = None
    background_od: float = 0.02
    blur_um: float = 0.3
    noise: float = 2.0
    jpeg_quality: int = 90
    variety: float = 0.0
    artifacts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.height is None:
            object.__setattr__(self, "height", self.width)
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not _MIN_SIZE <= v <= _MAX_SIZE:
                raise _err(
                    f"{name} must be a whole number of pixels {_MIN_SIZE}-{_MAX_SIZE}, got {v!r}"
                )
        _check_range("mpp", self.mpp, 0.1, 2.0, "um/px")
        if self.marker not in MARKERS:
            raise _err(f"marker must be one of {', '.join(MARKERS)}; got {self.marker!r}")
        for name in (
            "positive_fraction",
            "weak_fraction",
            "immune_positive_fraction",
            "complete_membrane_fraction",
            "decoy_fraction",
            "borderline_fraction",
        ):
            _check_fraction(name, getattr(self, name))
        if isinstance(self.intensity, str):
            if self.intensity not in INTENSITY_OD:
                raise _err(
                    f"intensity must be weak, moderate, strong or a DAB OD number; got {self.intensity!r}"
                )
        else:
            _check_range("intensity", self.intensity, 0.05, 2.0, "OD")
        if self.marker != "p16" and self.weak_fraction > 0:
            raise _err(
                f"weak_fraction applies to p16 only (weak {self.marker} staining is positive); "
                "set intensity='weak' instead"
            )
        if self.marker == "p16":
            if self.positive_fraction + self.weak_fraction > 1.0 + 1e-9:
                raise _err(
                    f"positive_fraction + weak_fraction must be <= 1, got "
                    f"{self.positive_fraction} + {self.weak_fraction}"
                )
            if self.positive_fraction > 0 and self.intensity_od < 0.45:
                raise _err(
                    f"p16-positive cells need moderate or strong staining (>= 0.45 OD) but intensity "
                    f"is {self.intensity!r} ({self.intensity_od:.2f} OD); use weak_fraction for 1+ staining"
                )
        if self.marker != "pdl1" and self.immune_positive_fraction > 0:
            raise _err("immune_positive_fraction applies to PD-L1 only")
        if self.marker == "pdl1" and self.positive_fraction + self.decoy_fraction > 1.0 + 1e-9:
            raise _err("positive_fraction + decoy_fraction must be <= 1 for PD-L1")
        _check_range("immune_density", self.immune_density, 0.0, 20000.0, "cells/mm^2")
        _check_range("tissue_fraction", self.tissue_fraction, 0.05, 0.95)
        _check_range("tumor_fraction", self.tumor_fraction, 0.0, 0.95)
        if self.tumor_cell_limit is not None and (
            isinstance(self.tumor_cell_limit, bool)
            or not isinstance(self.tumor_cell_limit, int)
            or self.tumor_cell_limit < 0
        ):
            raise _err(
                f"tumor_cell_limit must be a non-negative whole number or None, got {self.tumor_cell_limit!r}"
            )
        if self.stain_vectors is not None:
            vecs = self.stain_vectors
            ok = isinstance(vecs, (tuple, list)) and len(vecs) == 2
            if ok:
                try:
                    clean = tuple(tuple(float(c) for c in v) for v in vecs)
                except (TypeError, ValueError):
                    ok = False
                else:
                    ok = all(
                        len(v) == 3 and all(math.isfinite(c) and c >= 0 for c in v) and sum(v) > 0
                        for v in clean
                    )
            if not ok:
                raise _err(
                    "stain_vectors must be ((h_r, h_g, h_b), (dab_r, dab_g, dab_b)) with "
                    f"non-negative numbers, got {vecs!r}"
                )
            object.__setattr__(self, "stain_vectors", clean)
        _check_range("stain_jitter", self.stain_jitter, 0.0, 0.3)
        if self.counterstain is not None:
            _check_range("counterstain", self.counterstain, 0.2, 3.0)
        _check_range("background_od", self.background_od, 0.0, 0.2, "OD")
        _check_range("blur_um", self.blur_um, 0.0, 3.0, "um")
        _check_range("noise", self.noise, 0.0, 20.0, "levels")
        _check_range("variety", self.variety, 0.0, 1.0)
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise _err(f"jpeg_quality must be a whole number 1-100, got {q!r}")
        if not isinstance(self.artifacts, bool):
            raise _err(f"artifacts must be true or false, got {self.artifacts!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise _err(f"seed must be a whole number 0 <= seed < 2**63, got {s!r}")

    # --- derived values -------------------------------------------------------------------

    @property
    def intensity_od(self) -> float:
        """DAB optical density of a typical positive cell."""
        if isinstance(self.intensity, str):
            return INTENSITY_OD[self.intensity]
        return float(self.intensity)

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return int(self.width), int(self.height)  # type: ignore[arg-type]

    @property
    def objective_power(self) -> int:
        """Nominal scanner magnification for this pixel size (0.25 -> 40, 0.5 -> 20, 1.0 -> 10)."""
        return max(1, round(10.0 / self.mpp))

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthParams:
        """Parameters of a named preset (see :data:`PRESETS`) with ``overrides`` applied.

        Raises
        ------
        ConfigError
            Unknown preset or parameter name, or an invalid value.
        """
        if name not in PRESETS:
            raise _err(f"unknown synth preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthParams:
        """Build from a plain dict (e.g. ``truth["params"]``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _err(
                f"unknown synth parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        vals = dict(values)
        if vals.get("stain_vectors") is not None:
            vals["stain_vectors"] = tuple(tuple(v) for v in vals["stain_vectors"])
        return cls(**vals)

    def replace(self, **changes: Any) -> SynthParams:
        """A copy with ``changes`` applied (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        if d["stain_vectors"] is not None:
            d["stain_vectors"] = [list(v) for v in d["stain_vectors"]]
        return d
