"""Cell typing: a small classifier (softmax regression, optionally through one hidden tanh
layer) over nucleus morphology.

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
    "HIDDEN_UNITS",
    "STAINED_NUCLEUS_OD",
    "CellTypeModel",
    "cell_features",
    "fit_cell_types",
    "load_cell_types",
    "stained_nuclei",
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
#: Hidden tanh units of a fitted classifier (:func:`fit_cell_types`, ``--hidden``); 0, the
#: shipped model, is a linear softmax regression. A hidden layer types synthetic cells better
#: (16 units, synthetic slides with look variety: 2 % of lymphocytes typed tumour instead of 9 %,
#: 11 % of macrophages instead of 29 %) but, fitted on synthetic cells only, it discarded a third
#: of the real BCData nuclei as ``none`` (22_2: 67-97 kept cells instead of 108; model card). It
#: is for refits on annotated real cells, where it does not have to extrapolate.
HIDDEN_UNITS = 0
#: Mean nuclear DAB OD from which a nucleus's haematoxylin is not read for typing, when DAB is
#: also its larger stain (see :func:`stained_nuclei`).
STAINED_NUCLEUS_OD = 0.3


def stained_nuclei(dab_od: torch.Tensor, h_od: torch.Tensor, h_scale: float = 1.0) -> torch.Tensor:
    """(K,) bool: nuclei whose DAB masks their haematoxylin, so that their darkness says nothing
    of their chromatin: mean nuclear DAB >= :data:`STAINED_NUCLEUS_OD` and >= the mean nuclear
    haematoxylin before counterstain scaling (``h_od / h_scale``; DAB is never scaled).

    Why: a strongly Ki-67-stained nucleus reads haematoxylin that is mostly DAB misread, in either
    direction. Scanned brown is often off the plane of the two stain vectors (saturated, near
    black, JPEG-blocked), and the unmixing splits it into large readings of opposite sign: the
    labelled positive nuclei of BCData 6_2 read 0.87 OD haematoxylin (median, x2.5 scaling; 10-90 %
    0.12-3.31), those of 22_2 0.02. Read as chromatin, a dark one looks like a lymphocyte: 13 of
    22 of 6_2's positives were typed lymphocyte, and on synthetic Ki-67 at 2.0 OD DAB (seed 33,
    look variety 1) 80 of 138 positive tumour cells. The second condition keeps dark blue nuclei
    with some DAB cross-talk readable: synthetic lymphocytes (never Ki-67-positive there) read
    up to 0.74 OD DAB next to 0.7-1.2 haematoxylin, the positive tumour nuclei 1.0-2.2 times
    more DAB than haematoxylin (10th percentile), BCData's 1.1-530 times.
    """
    return (dab_od >= STAINED_NUCLEUS_OD) & (dab_od * h_scale >= h_od)


def cell_features(
    rays: Rays, response: torch.Tensor, radius_um: torch.Tensor, h_scale: float = 1.0
) -> torch.Tensor:
    """(K, len(FEATURES)) float32 feature matrix in :data:`FEATURES` order.

    NaN marks a feature that is not read: ``h_nucleus`` and ``neighbour_log_darkness_ratio`` of
    a nucleus whose DAB masks its haematoxylin (:func:`stained_nuclei`; measured where the rays
    carry every nucleus's DAB, ``Rays.nucleus_dab_od``: markers whose nuclei are found on
    haematoxylin + DAB, such as Ki-67). Such neighbours are also left out of the other cells'
    darkness ratio. The classifier standardises a NaN to 0, the training mean: it types those
    cells on the other features. ``h_scale``: the counterstain scaling of the haematoxylin map.

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
    # Darkness: only neighbours whose haematoxylin is read count (all, but where DAB masks it).
    h_nucleus, seen, stained = rays.h_nucleus, valid, None
    if rays.nucleus_dab_od is not None:
        stained = stained_nuclei(rays.nucleus_dab_od, rays.h_nucleus, h_scale)
        seen = valid * (~stained[j]).to(valid.dtype)
    dark_ratio = ((log_dark[j] - log_dark.unsqueeze(1)) * seen).sum(1) / seen.sum(1).clamp_min(1.0)
    if stained is not None:
        dark_ratio = dark_ratio.masked_fill(stained, math.nan)
        h_nucleus = h_nucleus.masked_fill(stained, math.nan)
    return torch.stack(
        [
            log_area,
            h_nucleus,
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
    """Standardised-feature softmax classifier, linear or through one hidden tanh layer.

    Logits are ``W z + b`` with ``z`` the standardised features ``(x - mean) / scale`` (linear),
    or with ``z = tanh(Wh ((x - mean) / scale) + bh)`` when ``hidden_weights`` is given. A
    feature that was not read (NaN) has ``z = 0``.

    Attributes
    ----------
    weights : ndarray (C, F) float32, or (C, H) with a hidden layer
    bias : ndarray (C,) float32
    mean, scale : ndarray (F,) float32
        Feature standardisation.
    classes, features : tuple of str
    meta : mapping
        Provenance: what it was fitted on, when, accuracy.
    hidden_weights : ndarray (H, F) float32, optional
    hidden_bias : ndarray (H,) float32, optional
    """

    weights: NDArray[np.float32]
    bias: NDArray[np.float32]
    mean: NDArray[np.float32]
    scale: NDArray[np.float32]
    classes: tuple[str, ...] = CELL_CLASSES
    features: tuple[str, ...] = FEATURES
    meta: Mapping[str, Any] = field(default_factory=dict)
    hidden_weights: NDArray[np.float32] | None = None
    hidden_bias: NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        c, f = len(self.classes), len(self.features)
        if (self.hidden_weights is None) != (self.hidden_bias is None):
            raise ConfigError("cell-type model: hidden_weights and hidden_bias come together")
        if self.hidden_weights is not None and self.hidden_bias is not None:
            h = len(self.hidden_bias)
            if self.hidden_weights.shape != (h, f) or self.hidden_bias.shape != (h,) or h < 1:
                raise ConfigError(
                    f"cell-type model: hidden_weights must be (H, {f}) and hidden_bias (H,)"
                )
            if self.weights.shape != (c, h) or self.bias.shape != (c,):
                raise ConfigError(f"cell-type model: weights must be ({c}, {h}) and bias ({c},)")
        elif self.weights.shape != (c, f) or self.bias.shape != (c,):
            raise ConfigError(f"cell-type model: weights must be ({c}, {f}) and bias ({c},)")
        if self.mean.shape != (f,) or self.scale.shape != (f,) or (self.scale <= 0).any():
            raise ConfigError(f"cell-type model: mean/scale must be ({f},) with scale > 0")

    @property
    def hidden(self) -> int:
        """Units of the hidden layer (0: a linear softmax regression)."""
        return 0 if self.hidden_bias is None else len(self.hidden_bias)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "classes": list(self.classes),
            "features": list(self.features),
        }
        if self.hidden_weights is not None and self.hidden_bias is not None:
            out["hidden_weights"] = np.round(self.hidden_weights, 6).tolist()
            out["hidden_bias"] = np.round(self.hidden_bias, 6).tolist()
        out.update(
            weights=np.round(self.weights, 6).tolist(),
            bias=np.round(self.bias, 6).tolist(),
            mean=np.round(self.mean, 6).tolist(),
            scale=np.round(self.scale, 6).tolist(),
            meta=dict(self.meta),
        )
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, p)
        return p

    def predict_proba(self, x: NDArray[np.floating]) -> NDArray[np.float32]:
        """(M, C) class probabilities of (M, F) feature rows (NaN: not read, see
        :func:`cell_features`)."""
        z = np.nan_to_num((np.asarray(x, np.float32) - self.mean) / self.scale, nan=0.0)
        if self.hidden_weights is not None and self.hidden_bias is not None:
            z = np.tanh(z @ self.hidden_weights.T + self.hidden_bias)
        z = z @ self.weights.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load_cell_types(path: str | os.PathLike[str]) -> CellTypeModel:
    """Read a cell-type model JSON; a clear ConfigError names the file on any problem."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
        hw, hb = raw.get("hidden_weights"), raw.get("hidden_bias")
        model = CellTypeModel(
            hidden_weights=None if hw is None else np.asarray(hw, np.float32),
            hidden_bias=None if hb is None else np.asarray(hb, np.float32),
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
    hidden: int = HIDDEN_UNITS,
    l2: float | None = None,
    class_weight: Sequence[float] | None = None,
    meta: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> CellTypeModel:
    """Fit the classifier to annotated cells (full-batch L-BFGS on the weighted cross-entropy).

    Parameters
    ----------
    features : ndarray (M, F)
        Rows of :func:`cell_features` for M annotated detections. NaN (a feature not read) is
        left out of the standardisation and fitted as 0, as the model reads it.
    labels : ndarray (M,) int
        Index into :data:`CELL_CLASSES` (``none`` for detections matching no annotated cell).
    hidden : int
        Units of one hidden tanh layer; 0 (the default, :data:`HIDDEN_UNITS`) fits a linear
        softmax regression, the shipped model. Try 8-16 units when fitting on annotated real
        cells and compare on held-out annotated images.
    l2 : float, optional
        Ridge penalty on the weights (sum of squares); default 1e-3 linear, 1e-4 with a hidden
        layer.
    class_weight : sequence of float, optional
        Per-class loss weights; default: square root of the inverse class frequency (full
        balancing over-calls the rare macrophage class at the expense of tumour cells).
    seed : int
        Seed of the hidden layer's random start: the same rows and seed give the same model.
    """
    import torch

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"features must be (M, {len(FEATURES)}) with one label per row")
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0 units, got {hidden}")
    c = len(CELL_CLASSES)
    if np.isnan(x).all(0).any():
        raise ValueError("a feature column has no value (all NaN)")
    mean = np.nanmean(x, 0)
    scale = np.nanstd(x, 0)
    scale[scale < 1e-6] = 1.0
    xs = torch.tensor(np.nan_to_num((x - mean) / scale, nan=0.0), dtype=torch.float64)
    yt = torch.tensor(y)
    counts = np.bincount(y, minlength=c).astype(np.float64)
    if class_weight is None:
        cw = np.where(counts > 0, np.sqrt(len(y) / (c * np.maximum(counts, 1))), 0.0)
    else:
        cw = np.asarray(class_weight, np.float64)
    gen = torch.Generator().manual_seed(int(seed))
    f = x.shape[1]
    if hidden:
        wh = (torch.randn((hidden, f), generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
        bh = torch.zeros(hidden, dtype=torch.float64, requires_grad=True)
        w = (torch.randn((c, hidden), generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
        params = [wh, bh]
    else:
        w = torch.zeros((c, f), dtype=torch.float64, requires_grad=True)
        params = []
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    params += [w, b]
    penalty = (1e-4 if hidden else 1e-3) if l2 is None else float(l2)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(cw))
    opt = torch.optim.LBFGS(
        params,
        max_iter=1000 if hidden else 500,
        history_size=50 if hidden else 100,
        tolerance_grad=1e-9 if hidden else 1e-7,
        tolerance_change=1e-12 if hidden else 1e-9,
        line_search_fn="strong_wolfe",
    )

    def logits() -> torch.Tensor:
        z = torch.tanh(xs @ wh.T + bh) if hidden else xs
        return z @ w.T + b

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ridge = (w**2).sum() + ((wh**2).sum() if hidden else 0.0)
        loss = loss_fn(logits(), yt) + penalty * ridge
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        z = logits()
        if not bool(torch.isfinite(z).all()):
            raise ValueError("cell-type fit diverged (non-finite logits)")
        pred = z.argmax(1).numpy()
    acc = float((pred == y).mean())
    info = dict(meta or {})
    info.setdefault("training_accuracy", round(acc, 4))
    info.setdefault("n_cells", {CELL_CLASSES[i]: int(counts[i]) for i in range(c)})
    if hidden:
        info.setdefault("hidden_units", int(hidden))

    def f32(t: torch.Tensor) -> NDArray[np.float32]:
        return t.detach().numpy().astype(np.float32)

    return CellTypeModel(
        weights=f32(w),
        bias=f32(b),
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        meta=info,
        hidden_weights=f32(wh) if hidden else None,
        hidden_bias=f32(bh) if hidden else None,
    )
