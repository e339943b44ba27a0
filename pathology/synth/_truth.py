"""Ground truth of a synthetic slide: per-cell records, the rules, slide values, JSON I/O.

The truth file ``X.truth.json`` sits next to ``X.svs``::

    {
      "format": "pathology.synth.truth", "format_version": 1, "generator": "pathology 0.1.0",
      "params": {...SynthParams...},
      "slide": {"width", "height", "mpp", "marker", "objective_power", "background_rgb"},
      "stains": {"haematoxylin": [r, g, b], "dab": [r, g, b], "background": [r, g, b]},
      "rules": {...thresholds and rule text...},
      "values": {...SlideValues...},
      "tissue_mask": {"file", "downsample", "width", "height", "tissue_fraction"},
      "units": {...},
      "cells": [{"id", "x", "y", "type", "nucleus_dab", "cytoplasm_dab", "membrane_dab",
                 "membrane_coverage", "nucleus_area_um2", "nucleus_diameter_um", "positive"}, ...]
    }

Cell positions are level-0 pixels (``x`` right, ``y`` down, pixel ``(i, j)`` spans
``[j, j + 1) x [i, i + 1)``); only cells whose centre lies inside the slide are listed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pathology.synth._marker import BIN_EDGES, MARGIN, POSITIVE_CUT
from pathology.synth._shapes import CELL_TYPES, LYMPHOCYTE, MACROPHAGE, TUMOR

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RULES",
    "CellTruth",
    "SlideValues",
    "SynthTruth",
    "load_truth",
    "score_cells",
]

FORMAT = "pathology.synth.truth"
FORMAT_VERSION = 1

#: The rules the slide values follow; stored verbatim in every truth file.
RULES: dict[str, Any] = {
    "intensity_bins_od": list(BIN_EDGES),
    "bin_margin_od": MARGIN,
    "h_score": "1 x %1+ + 2 x %2+ + 3 x %3+ over tumour cells, bins on the scored value",
    "evaluable_min_tumor_cells": 100,
    "p16": {
        "cell_positive": "tumor and nucleus_dab >= 0.4 and cytoplasm_dab >= 0.4 (2+/3+, CAP 2018)",
        "scored_value": "min(nucleus_dab, cytoplasm_dab)",
        "weak": "tumor and 0.2 <= min(nucleus_dab, cytoplasm_dab) < 0.4 (1+ only)",
        "call": "positive if p16_positive_pct >= 70; equivocal if p16_positive_pct >= 50 or "
        "p16_positive_pct + p16_weak_pct >= 70 (extensive weak, CAP 2025); else negative",
        "cut_od": POSITIVE_CUT["p16"],
    },
    "pdl1": {
        "cell_positive": "tumor: membrane_coverage > 0 and membrane_dab >= 0.2 (partial or complete); "
        "lymphocyte/macrophage: membrane_dab >= 0.2 or cytoplasm_dab >= 0.2",
        "scored_value": "membrane_dab",
        "cps": "min(100, 100 x (positive tumor + positive lymphocytes/macrophages) / tumor cells)",
        "tps": "100 x positive tumor / tumor cells",
        "call": "not_evaluable if tumor cells < 100, else CPS bin <1, 1-19, >=20",
        "cut_od": POSITIVE_CUT["pdl1"],
    },
    "ki67": {
        "cell_positive": "tumor and nucleus_dab >= 0.2",
        "scored_value": "nucleus_dab",
        "ki67_pct": "100 x positive tumor / tumor cells",
        "cut_od": POSITIVE_CUT["ki67"],
    },
}

_UNITS = {
    "x, y": "level-0 pixels",
    "*_dab": "optical density along the unit DAB vector (base 10)",
    "membrane_coverage": "fraction of the membrane ring stained at membrane_dab",
    "nucleus_area_um2": "square microns",
    "nucleus_diameter_um": "diameter of the circle of equal area, microns",
    "positive": "under the marker's rule; null where the marker does not score the cell type",
}


@dataclass(frozen=True)
class CellTruth:
    """One cell of the truth file (see module docstring for units)."""

    id: int
    x: float
    y: float
    type: str
    nucleus_dab: float
    cytoplasm_dab: float
    membrane_dab: float
    membrane_coverage: float
    nucleus_area_um2: float
    nucleus_diameter_um: float
    positive: bool | None


@dataclass(frozen=True)
class SlideValues:
    """Slide-level truth; values not applicable to the marker are None."""

    marker: str
    tumor_cells: int
    tumor_positive: int
    immune_cells: int
    immune_positive: int | None
    p16_positive_pct: float | None
    p16_weak_pct: float | None
    cps: float | None
    tps: float | None
    ki67_pct: float | None
    h_score: float | None
    call: str | None
    evaluable: bool


@dataclass(frozen=True)
class SynthTruth:
    """Everything a synthetic slide's truth file holds."""

    params: dict[str, Any]
    width: int
    height: int
    mpp: float
    marker: str
    objective_power: int
    background_rgb: tuple[float, float, float]
    stains: dict[str, tuple[float, float, float]]
    values: SlideValues
    cells: tuple[CellTruth, ...]
    tissue_mask: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=lambda: RULES)
    generator: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON document (see module docstring)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generator": self.generator,
            "params": self.params,
            "slide": {
                "width": self.width,
                "height": self.height,
                "mpp": self.mpp,
                "marker": self.marker,
                "objective_power": self.objective_power,
                "background_rgb": list(self.background_rgb),
            },
            "stains": {k: list(v) for k, v in self.stains.items()},
            "rules": self.rules,
            "values": asdict(self.values),
            "tissue_mask": self.tissue_mask,
            "units": _UNITS,
            "cells": [asdict(c) for c in self.cells],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON file (compact: one cell per line)."""
        doc = self.to_json_dict()
        cells = doc.pop("cells")
        head = json.dumps(doc, indent=1)
        # One cell per line keeps 100k-cell files diffable and fast to write.
        lines = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cells)
        text = head[:-2] + ',\n "cells": [\n' + lines + "\n ]\n}\n"
        p = Path(path)
        p.write_text(text, encoding="utf-8")
        return p


def _pct(num: int, den: int) -> float | None:
    return None if den == 0 else round(100.0 * num / den, 4)


def score_cells(
    marker: str,
    types: NDArray[np.integer],
    nucleus: NDArray[np.floating],
    cytoplasm: NDArray[np.floating],
    membrane: NDArray[np.floating],
    coverage: NDArray[np.floating],
) -> tuple[list[bool | None], SlideValues]:
    """Apply :data:`RULES` to per-cell DAB values.

    Parameters
    ----------
    marker : {"p16", "pdl1", "ki67"}
    types : ndarray (N,) int
        Cell type codes.
    nucleus, cytoplasm, membrane, coverage : ndarray (N,) float
        DAB OD per compartment and membrane coverage fraction.

    Returns
    -------
    positive : list of bool or None, length N
        Per-cell positivity; None for cell types the marker does not score.
    values : SlideValues
    """
    types = np.asarray(types)
    tum = types == TUMOR
    imm = (types == LYMPHOCYTE) | (types == MACROPHAGE)
    n_t, n_i = int(tum.sum()), int(imm.sum())
    cut = POSITIVE_CUT[marker]
    nucleus, cytoplasm = np.asarray(nucleus), np.asarray(cytoplasm)
    membrane, coverage = np.asarray(membrane), np.asarray(coverage)
    if marker == "p16":
        scored = np.minimum(nucleus, cytoplasm)
        cell_pos = tum & (nucleus >= cut) & (cytoplasm >= cut)
        scored_types = tum
    elif marker == "ki67":
        scored = nucleus
        cell_pos = tum & (nucleus >= cut)
        scored_types = tum
    else:
        scored = membrane
        cell_pos = (tum & (coverage > 0) & (membrane >= cut)) | (
            imm & ((membrane >= cut) | (cytoplasm >= cut))
        )
        scored_types = tum | imm
    t_pos = int((cell_pos & tum).sum())
    i_pos = int((cell_pos & imm).sum())
    bins = np.digitize(scored[tum], BIN_EDGES)  # 0, 1, 2, 3
    h = None if n_t == 0 else round(float(sum(k * np.mean(bins == k) * 100 for k in (1, 2, 3))), 4)
    evaluable = n_t >= RULES["evaluable_min_tumor_cells"]
    p16_pct = p16_weak = cps = tps = ki67 = None
    call: str | None = None
    if marker == "p16":
        p16_pct = _pct(t_pos, n_t)
        p16_weak = _pct(int((bins == 1).sum()), n_t)
        if p16_pct is not None and p16_weak is not None:
            if p16_pct >= 70:
                call = "positive"
            elif p16_pct >= 50 or p16_pct + p16_weak >= 70:
                call = "equivocal"
            else:
                call = "negative"
    elif marker == "ki67":
        ki67 = _pct(t_pos, n_t)
    else:
        tps = _pct(t_pos, n_t)
        cps = None if n_t == 0 else round(min(100.0, 100.0 * (t_pos + i_pos) / n_t), 4)
        if not evaluable or cps is None:
            call = "not_evaluable"
        else:
            call = "<1" if cps < 1 else ("1-19" if cps < 20 else ">=20")
    positive = [
        bool(p) if s else None
        for p, s in zip(cell_pos.tolist(), scored_types.tolist(), strict=True)
    ]
    values = SlideValues(
        marker=marker,
        tumor_cells=n_t,
        tumor_positive=t_pos,
        immune_cells=n_i,
        immune_positive=i_pos if marker == "pdl1" else None,
        p16_positive_pct=p16_pct,
        p16_weak_pct=p16_weak,
        cps=cps,
        tps=tps,
        ki67_pct=ki67,
        h_score=h,
        call=call,
        evaluable=bool(evaluable),
    )
    return positive, values


def _triple(v: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return a, b, c


def load_truth(path: str | os.PathLike[str]) -> SynthTruth:
    """Read a truth file written by :func:`pathology.synth.synthesize_slide`.

    Raises
    ------
    ConfigError
        The file is not a synth truth file or has an unknown format version.
    """
    from pathology.errors import ConfigError

    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read synth truth JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{p}: not a pathology synth truth file (format != {FORMAT!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{p}: truth format_version {doc.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; regenerate the slide with this version"
        )
    s = doc["slide"]
    cells = tuple(CellTruth(**c) for c in doc["cells"])
    return SynthTruth(
        params=doc["params"],
        width=s["width"],
        height=s["height"],
        mpp=s["mpp"],
        marker=s["marker"],
        objective_power=s["objective_power"],
        background_rgb=_triple(s["background_rgb"]),
        stains={k: _triple(v) for k, v in doc["stains"].items()},
        values=SlideValues(**doc["values"]),
        cells=cells,
        tissue_mask=doc.get("tissue_mask", {}),
        rules=doc["rules"],
        generator=doc.get("generator", ""),
    )


def cells_from_arrays(
    x_px: NDArray[np.floating],
    y_px: NDArray[np.floating],
    types: NDArray[np.integer],
    nucleus: NDArray[np.floating],
    cytoplasm: NDArray[np.floating],
    membrane: NDArray[np.floating],
    coverage: NDArray[np.floating],
    area_um2: NDArray[np.floating],
    positive: list[bool | None],
) -> tuple[CellTruth, ...]:
    """CellTruth records from layout arrays (ids = array index)."""
    diam = 2.0 * np.sqrt(np.asarray(area_um2) / math.pi)
    cols = zip(
        np.round(x_px, 2).tolist(),
        np.round(y_px, 2).tolist(),
        np.asarray(types).tolist(),
        np.round(nucleus, 4).tolist(),
        np.round(cytoplasm, 4).tolist(),
        np.round(membrane, 4).tolist(),
        np.round(coverage, 4).tolist(),
        np.round(area_um2, 2).tolist(),
        np.round(diam, 3).tolist(),
        positive,
        strict=True,
    )
    return tuple(
        CellTruth(i, x, y, CELL_TYPES[t], n, c, m, cv, a, d, p)
        for i, (x, y, t, n, c, m, cv, a, d, p) in enumerate(cols)
    )
