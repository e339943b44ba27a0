"""Cell typing: a small multinomial logistic regression over nucleus morphology.

Features (all marker-independent, so one fit serves p16, PD-L1 and Ki-67): nucleus area, darkness
(haematoxylin OD inside and just outside), elongation, LoG response and scale, local cell
density (tumour cells sit in packed nests) and the size and darkness of the nearest neighbours'
nuclei against the cell's own (tumour cells sit among nuclei like their own, macrophages among
smaller, darker stromal and inflammatory ones). Classes: tumour, lymphocyte, macrophage, fibroblast
(other) and ``none`` (a detection that is not a nucleus: stroma texture, debris).

The parameters live in ``models/<model>/cell_types.json`` with what they were fitted on; anyone
with annotated cells can refit them (:func:`fit_cell_types`, ``scripts/fit_cell_types.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pathology.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from pathology.scoring._measure import Rays

__all__ = [
    "CELL_CLASSES",
    "FEATURES",
    "CellTypeModel",
    "cell_features",
    "fit_cell_types",
    "load_cell_types",
]

CELL_CLASSES = ("tumor", "lymphocyte", "macrophage", "fibroblast", "none")
TUMOR, LYMPHOCYTE, MACROPHAGE, FIBROBLAST, NONE = range(5)
FEATURES = (
    "log_area_um2",
    "h_nucleus",
    "h_around",
    "log_elongation",
    "log1p_density",
    "log_response",
    "log_radius_um",
    "neighbour_log_area_ratio",
    "neighbour_log_darkness_ratio",
)
#: Nearest detections whose nucleus size describes a cell's surroundings.
CONTEXT_NEIGHBOURS = 4


def cell_features(rays: Rays, response: torch.Tensor, radius_um: torch.Tensor) -> torch.Tensor:
    """(K, len(FEATURES)) float32 feature matrix in :data:`FEATURES` order.

    The two ``neighbour_*`` features describe a cell's surroundings against the cell itself: the
    mean over the :data:`CONTEXT_NEIGHBOURS` nearest detections of the tile of log nucleus area,
    and of log nuclear haematoxylin, minus the cell's own (0 where it has no neighbour). Tumour
    cells sit among nuclei like their own; macrophages among smaller, darker lymphocytes and
    fibroblasts (synthetic slides, mean +- sd: area -0.09 +- 0.23 against -0.52 +- 0.38,
    darkness 0.09 +- 0.18 against 0.37 +- 0.27). As ratios they do not change with the scan's
    pixel size or the counterstain's strength.
    """
    import torch

    log_area = rays.area_um2.clamp_min(1.0).log()
    log_dark = rays.h_nucleus.clamp_min(1e-3).log()
    nb = rays.nb_index[:, :CONTEXT_NEIGHBOURS]
    valid = (nb >= 0).to(log_area.dtype)
    n_valid = valid.sum(1).clamp_min(1.0)
    j = nb.clamp_min(0)
    area_ratio = ((log_area[j] - log_area.unsqueeze(1)) * valid).sum(1) / n_valid
    dark_ratio = ((log_dark[j] - log_dark.unsqueeze(1)) * valid).sum(1) / n_valid
    return torch.stack(
        [
            log_area,
            rays.h_nucleus,
            rays.h_around,
            rays.elongation.log(),
            rays.density.log1p(),
            response.clamp_min(1e-4).log(),
            radius_um.log(),
            area_ratio,
            dark_ratio,
        ],
        dim=1,
    )


@dataclass(frozen=True)
class CellTypeModel:
    """Standardised-feature softmax regression.

    Attributes
    ----------
    weights : ndarray (C, F) float32
    bias : ndarray (C,) float32
    mean, scale : ndarray (F,) float32
        Feature standardisation.
    classes, features : tuple of str
    meta : mapping
        Provenance: what it was fitted on, when, accuracy.
    """

    weights: NDArray[np.float32]
    bias: NDArray[np.float32]
    mean: NDArray[np.float32]
    scale: NDArray[np.float32]
    classes: tuple[str, ...] = CELL_CLASSES
    features: tuple[str, ...] = FEATURES
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c, f = len(self.classes), len(self.features)
        if self.weights.shape != (c, f) or self.bias.shape != (c,):
            raise ConfigError(f"cell-type model: weights must be ({c}, {f}) and bias ({c},)")
        if self.mean.shape != (f,) or self.scale.shape != (f,) or (self.scale <= 0).any():
            raise ConfigError(f"cell-type model: mean/scale must be ({f},) with scale > 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "features": list(self.features),
            "weights": np.round(self.weights, 6).tolist(),
            "bias": np.round(self.bias, 6).tolist(),
            "mean": np.round(self.mean, 6).tolist(),
            "scale": np.round(self.scale, 6).tolist(),
            "meta": dict(self.meta),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, p)
        return p

    def predict_proba(self, x: NDArray[np.floating]) -> NDArray[np.float32]:
        z = ((np.asarray(x, np.float32) - self.mean) / self.scale) @ self.weights.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load_cell_types(path: str | os.PathLike[str]) -> CellTypeModel:
    """Read a cell-type model JSON; a clear ConfigError names the file on any problem."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
        model = CellTypeModel(
            weights=np.asarray(raw["weights"], np.float32),
            bias=np.asarray(raw["bias"], np.float32),
            mean=np.asarray(raw["mean"], np.float32),
            scale=np.asarray(raw["scale"], np.float32),
            classes=tuple(raw["classes"]),
            features=tuple(raw["features"]),
            meta=raw.get("meta", {}),
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: cell-type model file not found") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{p}: not a valid cell-type model ({type(exc).__name__}: {exc})"
        ) from exc
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    if model.classes != CELL_CLASSES or model.features != FEATURES:
        raise ConfigError(
            f"{p}: cell-type model has classes {model.classes} / features {model.features}; this "
            f"version expects {CELL_CLASSES} / {FEATURES} (refit with scripts/fit_cell_types.py)"
        )
    return model


def fit_cell_types(
    features: NDArray[np.floating],
    labels: NDArray[np.integer],
    *,
    l2: float = 1e-3,
    class_weight: Sequence[float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> CellTypeModel:
    """Fit the softmax regression to annotated cells (L-BFGS on the weighted cross-entropy).

    Parameters
    ----------
    features : ndarray (M, F)
        Rows of :func:`cell_features` for M annotated detections.
    labels : ndarray (M,) int
        Index into :data:`CELL_CLASSES` (``none`` for detections matching no annotated cell).
    l2 : float
        Ridge penalty on the weights.
    class_weight : sequence of float, optional
        Per-class loss weights; default: square root of the inverse class frequency (full
        balancing over-calls the rare macrophage class at the expense of tumour cells).
    """
    import torch

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"features must be (M, {len(FEATURES)}) with one label per row")
    c = len(CELL_CLASSES)
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-6] = 1.0
    xs = torch.tensor((x - mean) / scale, dtype=torch.float64)
    yt = torch.tensor(y)
    counts = np.bincount(y, minlength=c).astype(np.float64)
    if class_weight is None:
        cw = np.where(counts > 0, np.sqrt(len(y) / (c * np.maximum(counts, 1))), 0.0)
    else:
        cw = np.asarray(class_weight, np.float64)
    w = torch.zeros((c, x.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(cw))
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(xs @ w.T + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xs @ w.T + b).argmax(1).numpy()
    acc = float((pred == y).mean())
    info = dict(meta or {})
    info.setdefault("training_accuracy", round(acc, 4))
    info.setdefault("n_cells", {CELL_CLASSES[i]: int(counts[i]) for i in range(c)})
    if not math.isfinite(acc):
        raise ValueError("cell-type fit diverged")
    return CellTypeModel(
        weights=w.detach().numpy().astype(np.float32),
        bias=b.detach().numpy().astype(np.float32),
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        meta=info,
    )
