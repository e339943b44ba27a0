"""Synthetic IHC whole-slide images with per-cell ground truth.

The project's ground truth for tests, the demo and benchmarks: Aperio-style SVS pyramids of
p16, PD-L1 or Ki-67 stained tissue (tumour nests, lymphocytes, macrophages, fibroblasts in pale
counterstained stroma) rendered by Beer-Lambert optics from per-cell stain amounts, plus a truth
JSON (every cell with its compartment DAB OD and positivity, the slide-level p16 %, CPS, TPS,
Ki-67 %, H-score) and a true tissue mask.

>>> from pathology.synth import SynthParams, synthesize_slide
>>> slide = synthesize_slide(SynthParams.preset("pdl1_cps_1_19", width=4096), "demo.svs")  # doctest: +SKIP
>>> slide.values.cps  # doctest: +SKIP

The SVS files carry deliberately FAKE patient identifiers (:data:`FAKE_PHI`) in their description
and label image so PHI filtering downstream can be tested.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathology.synth._api import (
        RegionRender,
        SynthSlide,
        render_region,
        synthesize_region,
        synthesize_slide,
        synthesize_truth,
    )
    from pathology.synth._params import PRESETS, SynthParams
    from pathology.synth._svs import FAKE_PHI
    from pathology.synth._truth import CellTruth, SlideValues, SynthTruth, load_truth

__all__ = [
    "FAKE_PHI",
    "PRESETS",
    "CellTruth",
    "RegionRender",
    "SlideValues",
    "SynthParams",
    "SynthSlide",
    "SynthTruth",
    "load_truth",
    "render_region",
    "synthesize_region",
    "synthesize_slide",
    "synthesize_truth",
]

# Resolved on first use, so ``pathology --help`` (which only needs the preset names from
# ``_params``) does not import scipy and the renderer.
_WHERE = {
    "RegionRender": "_api",
    "SynthSlide": "_api",
    "render_region": "_api",
    "synthesize_region": "_api",
    "synthesize_slide": "_api",
    "synthesize_truth": "_api",
    "PRESETS": "_params",
    "SynthParams": "_params",
    "FAKE_PHI": "_svs",
    "CellTruth": "_truth",
    "SlideValues": "_truth",
    "SynthTruth": "_truth",
    "load_truth": "_truth",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"pathology.synth.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathology.synth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
