"""Cell-level IHC scoring: a torch model that finds, types and measures every cell of a tile.

>>> from pathology.scoring import score_tiles
>>> res = score_tiles(tiles, "p16", mpp=0.5)  # doctest: +SKIP
>>> res.total()["tumor_positive"]  # doctest: +SKIP

Markers are YAML files (``configs/markers``); the model's fitted parts live in ``models/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathology.scoring._api import (
        DEFAULT_MODEL,
        TileScores,
        load_model,
        model_dir,
        model_fingerprint,
        run_model,
        score_image,
        score_tiles,
        tiles_with_halo,
    )
    from pathology.scoring._celltype import (
        CELL_CLASSES,
        CellTypeModel,
        fit_cell_types,
        load_cell_types,
    )
    from pathology.scoring._device import resolve_device
    from pathology.scoring._fit import TrainingCells, training_cells
    from pathology.scoring._markers import MarkerConfig, available_markers, load_marker
    from pathology.scoring._stains import StainEstimate, estimate_stains

__all__ = [
    "CELL_CLASSES",
    "DEFAULT_MODEL",
    "CellTypeModel",
    "MarkerConfig",
    "StainEstimate",
    "TileScores",
    "TrainingCells",
    "available_markers",
    "estimate_stains",
    "fit_cell_types",
    "load_cell_types",
    "load_marker",
    "load_model",
    "model_dir",
    "model_fingerprint",
    "resolve_device",
    "run_model",
    "score_image",
    "score_tiles",
    "tiles_with_halo",
    "training_cells",
]

_WHERE = {
    "DEFAULT_MODEL": "_api",
    "TileScores": "_api",
    "load_model": "_api",
    "model_dir": "_api",
    "model_fingerprint": "_api",
    "run_model": "_api",
    "score_image": "_api",
    "score_tiles": "_api",
    "tiles_with_halo": "_api",
    "CELL_CLASSES": "_celltype",
    "CellTypeModel": "_celltype",
    "fit_cell_types": "_celltype",
    "load_cell_types": "_celltype",
    "resolve_device": "_device",
    "TrainingCells": "_fit",
    "training_cells": "_fit",
    "MarkerConfig": "_markers",
    "available_markers": "_markers",
    "load_marker": "_markers",
    "StainEstimate": "_stains",
    "estimate_stains": "_stains",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"pathology.scoring.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathology.scoring' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
