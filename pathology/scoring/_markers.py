"""Markers as data: a validated, frozen view of a ``configs/markers/<name>.yaml`` file.

A marker says which cell types it scores, which compartments (nucleus, cytoplasm, membrane)
count and how they combine, the DAB cut, the intensity bins and the slide rule. Adding a marker
(EGFR, Rb, ...) is a new YAML file; nothing in the model is specific to one marker.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathology.errors import ConfigError

__all__ = [
    "COMPARTMENTS",
    "SCORED_TYPES",
    "SLIDE_RULES",
    "CellRule",
    "MarkerConfig",
    "available_markers",
    "load_marker",
    "marker_dirs",
]

COMPARTMENTS = ("nucleus", "cytoplasm", "membrane")
#: Cell groups a marker can score: ``immune`` = lymphocytes + macrophages.
SCORED_TYPES = ("tumor", "immune")
DETECTION = ("haematoxylin", "haematoxylin+dab")
#: Slide rules and the keys each one takes (besides ``rule``).
SLIDE_RULES: dict[str, dict[str, float]] = {
    "p16": {
        "positive_pct": 70,
        "equivocal_pct": 50,
        "weak_diffuse_pct": 70,
        "min_tumor_cells": 100,
    },
    "cps": {"cps_cap": 100, "min_tumor_cells": 100},
    "percent": {"min_tumor_cells": 100},
    "hscore": {"high_hscore": 200, "min_tumor_cells": 100},
}
_LIST_KEYS = {"cps": {"cps_bins": (1.0, 20.0)}}
#: Slide keys every rule takes. ``stained_immune_flag_pct``: flag ``stained_immune`` (see
#: :data:`pathology.calls.QC_FLAGS`) when cells typed immune that meet the tumour cells'
#: positivity rule reach this % of all cells that meet it; 0 (the default) never flags. For
#: markers that immune cells do not take up (p16), where such cells are mistyped tumour cells.
_COMMON_KEYS = {"stained_immune_flag_pct": 0.0}

#: Repository ``configs/markers`` (an editable install or a source checkout).
_REPO_MARKERS = Path(__file__).resolve().parents[2] / "configs" / "markers"


@dataclass(frozen=True)
class CellRule:
    """How one cell group is scored.

    Attributes
    ----------
    compartments : tuple of str
        Compartments whose mean DAB OD is compared with ``cut``.
    combine : {"all", "any"}
        ``all``: every compartment must reach the cut (p16); ``any``: one is enough (PD-L1 immune).
    cut : float
        Positivity threshold on mean DAB OD.
    min_membrane_coverage : float
        For membrane: the stained fraction of the outline needed (partial staining counts).
    """

    compartments: tuple[str, ...]
    combine: str
    cut: float
    min_membrane_coverage: float = 0.15


@dataclass(frozen=True)
class MarkerConfig:
    """A marker: its per-cell rules, intensity bins and slide rule.

    Attributes
    ----------
    name, description : str
    detection : {"haematoxylin", "haematoxylin+dab"}
        Channel nuclei are found and outlined on (nuclear markers: ``haematoxylin+dab``, as a
        positive nucleus is brown).
    intensity_bins : (float, float, float)
        DAB OD edges of 1+, 2+, 3+ (H-score).
    cells : mapping of {"tumor", "immune"} -> CellRule
    slide : mapping
        ``rule`` plus its parameters (defaults filled in).
    source : str
        File the config came from.
    sha256 : str
        Hash of the file's bytes (provenance of every output scored with it).
    """

    name: str
    description: str
    detection: str
    intensity_bins: tuple[float, float, float]
    cells: Mapping[str, CellRule]
    slide: Mapping[str, Any]
    source: str
    sha256: str

    @property
    def scored_value_compartments(self) -> tuple[str, ...]:
        """Compartments of the tumour rule (their minimum/maximum is the cell's scored value)."""
        return self.cells["tumor"].compartments

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "detection": self.detection,
            "intensity_bins": list(self.intensity_bins),
            "cells": {
                k: {
                    "compartments": list(r.compartments),
                    "combine": r.combine,
                    "cut": r.cut,
                    "min_membrane_coverage": r.min_membrane_coverage,
                }
                for k, r in self.cells.items()
            },
            "slide": dict(self.slide),
            "source": self.source,
            "sha256": self.sha256,
        }


def marker_dirs() -> list[Path]:
    """Folders searched for ``<name>.yaml``: ``$PATHOLOGY_MARKERS`` (``os.pathsep``-separated), then
    the repository's ``configs/markers``."""
    extra = os.environ.get("PATHOLOGY_MARKERS", "")
    dirs = [Path(p) for p in extra.split(os.pathsep) if p]
    return [*dirs, _REPO_MARKERS]


def available_markers() -> list[str]:
    """Names of the markers found in :func:`marker_dirs`."""
    names: set[str] = set()
    for d in marker_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _number(src: str, key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{src}: {key} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{src}: {key} must be between {lo} and {hi}, got {value!r}")
    return float(value)


def _unknown(src: str, where: str, got: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise ConfigError(
            f"{src}: unknown key(s) {', '.join(extra)} in {where}; expected {', '.join(sorted(allowed))}"
        )


def _cell_rule(src: str, group: str, raw: Any) -> CellRule:
    where = f"cells.{group}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: {where} must be a mapping")
    _unknown(src, where, raw, {"compartments", "combine", "cut", "min_membrane_coverage"})
    comps = raw.get("compartments")
    if isinstance(comps, str):
        comps = [comps]
    if not comps or not isinstance(comps, list):
        raise ConfigError(
            f"{src}: {where}.compartments must list some of {', '.join(COMPARTMENTS)}"
        )
    for c in comps:
        if c not in COMPARTMENTS:
            raise ConfigError(
                f"{src}: unknown compartment {c!r} in {where}; expected one of {', '.join(COMPARTMENTS)}"
            )
    combine = raw.get("combine", "all")
    if combine not in ("all", "any"):
        raise ConfigError(f"{src}: {where}.combine must be 'all' or 'any', got {combine!r}")
    if "cut" not in raw:
        raise ConfigError(f"{src}: {where}.cut (DAB OD threshold) is required")
    cut = _number(src, f"{where}.cut", raw["cut"], 0.01, 3.0)
    cov = _number(
        src, f"{where}.min_membrane_coverage", raw.get("min_membrane_coverage", 0.15), 0.0, 1.0
    )
    return CellRule(tuple(comps), combine, cut, cov)


def _slide_rule(src: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or "rule" not in raw:
        raise ConfigError(f"{src}: slide.rule is required, one of {', '.join(SLIDE_RULES)}")
    rule = raw["rule"]
    if rule not in SLIDE_RULES:
        raise ConfigError(
            f"{src}: unknown slide rule {rule!r}; expected one of {', '.join(SLIDE_RULES)}"
        )
    defaults = SLIDE_RULES[rule]
    lists = _LIST_KEYS.get(rule, {})
    _unknown(src, "slide", raw, {"rule", *defaults, *lists, *_COMMON_KEYS})
    out: dict[str, Any] = {"rule": rule}
    for key, default in {**defaults, **_COMMON_KEYS}.items():
        hi = {"min_tumor_cells": 100000.0, "stained_immune_flag_pct": 100.0}.get(key, 300.0)
        out[key] = _number(src, f"slide.{key}", raw.get(key, default), 0.0, hi)
    for key, default_list in lists.items():
        vals = raw.get(key, list(default_list))
        if not isinstance(vals, list) or len(vals) != len(default_list):
            raise ConfigError(f"{src}: slide.{key} must be a list of {len(default_list)} numbers")
        nums = tuple(_number(src, f"slide.{key}", v, 0.0, 100.0) for v in vals)
        if list(nums) != sorted(nums):
            raise ConfigError(f"{src}: slide.{key} must be increasing, got {vals!r}")
        out[key] = nums
    if rule == "p16" and out["equivocal_pct"] > out["positive_pct"]:
        raise ConfigError(f"{src}: slide.equivocal_pct must not exceed slide.positive_pct")
    return out


def parse_marker(data: Any, src: str, sha256: str = "") -> MarkerConfig:
    """Validate a marker mapping (as loaded from YAML) into a :class:`MarkerConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: a marker file must be a YAML mapping")
    _unknown(
        src,
        "the marker",
        data,
        {"name", "description", "detection", "intensity_bins", "cells", "slide"},
    )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{src}: name is required")
    detection = data.get("detection", "haematoxylin")
    if detection not in DETECTION:
        raise ConfigError(
            f"{src}: detection must be one of {', '.join(DETECTION)}, got {detection!r}"
        )
    bins = data.get("intensity_bins", [0.2, 0.4, 0.6])
    if not isinstance(bins, list) or len(bins) != 3:
        raise ConfigError(f"{src}: intensity_bins must be 3 DAB OD edges (1+, 2+, 3+)")
    edges = tuple(_number(src, "intensity_bins", b, 0.01, 3.0) for b in bins)
    if not edges[0] < edges[1] < edges[2]:
        raise ConfigError(f"{src}: intensity_bins must increase, got {bins!r}")
    cells_raw = data.get("cells")
    if not isinstance(cells_raw, Mapping) or "tumor" not in cells_raw:
        raise ConfigError(f"{src}: cells.tumor is required (every marker scores tumour cells)")
    _unknown(src, "cells", cells_raw, set(SCORED_TYPES))
    cells = {g: _cell_rule(src, g, r) for g, r in cells_raw.items()}
    slide = _slide_rule(src, data.get("slide"))
    if slide["rule"] == "cps" and "immune" not in cells:
        raise ConfigError(f"{src}: the cps rule needs a cells.immune rule (immune cells count)")
    return MarkerConfig(
        name=name,
        description=str(data.get("description", "")),
        detection=detection,
        intensity_bins=edges,  # type: ignore[arg-type]
        cells=dict(cells),
        slide=slide,
        source=src,
        sha256=sha256,
    )


def load_marker(marker: str | os.PathLike[str] | MarkerConfig) -> MarkerConfig:
    """Load a marker by name (``p16``, ``pdl1``, ``ki67``, ``egfr``, ...) or from a YAML path.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the known ones), unreadable or invalid YAML, or a value
        out of range; the message names the file and the key.
    """
    import yaml

    if isinstance(marker, MarkerConfig):
        return marker
    text = os.fspath(marker)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        for d in marker_dirs():
            cand = d / f"{text}.yaml"
            if cand.is_file():
                path = cand
                break
        else:
            known = ", ".join(available_markers()) or "none found"
            raise ConfigError(
                f"unknown marker {text!r}; known markers: {known} (or give a path to a YAML file)"
            )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read marker file ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return parse_marker(data, str(path), hashlib.sha256(raw).hexdigest())
