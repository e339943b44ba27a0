"""``cells.geojson``: every scored cell as a QuPath detection, streamed to disk.

The file is a GeoJSON FeatureCollection (RFC 7946) in QuPath's own dialect, which QuPath 0.4 and
later import with *File > Import objects* or by drag and drop onto the open slide:

- ``properties.objectType`` is ``"detection"``;
- ``properties.classification`` is ``{"name": ..., "color": [r, g, b]}``; QuPath splits the name
  on ``":"``, so ``"Tumor: Positive"`` becomes the derived class *Tumor: Positive* that its
  positive-cell summaries count. QuPath only reads this short form when ``color`` is present;
- ``properties.measurements`` is an object of name -> number (QuPath >= 0.4; older versions
  wrote a list of ``{"name", "value"}``). Non-finite values are left out: JSON has no NaN;
- ``properties.name`` holds the finer immune type (``Lymphocyte`` / ``Macrophage``), since both
  share the class *Immune cells*.

Coordinate frame: level-0 (full-resolution) pixels, x to the right, y down, pixel ``i`` spanning
``[i, i + 1)``, as QuPath uses. Each nucleus is a regular 12-gon centred on the cell with the
nucleus's area, closed (last vertex = first), counter-clockwise in (x, y) as numbers (RFC 7946's
right-hand rule; QuPath does not depend on orientation), vertices rounded to 0.1 px.

Run provenance goes in a top-level ``provenance`` member (a foreign member, RFC 7946 section 6.1);
``frame`` states the coordinate frame and pixel size. QuPath reads ``features`` and ignores both.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np
from numpy.typing import NDArray

from pathology._io import atomic_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CELL_CLASSES", "MEASUREMENTS", "write_cells_geojson"]

#: Cell types of the ``type`` column, in the order of their integer codes.
CELL_TYPES = ("tumor", "lymphocyte", "macrophage", "other")

#: QuPath class name -> display colour (RGB). Derived classes follow QuPath's own naming.
CELL_CLASSES: dict[str, tuple[int, int, int]] = {
    "Tumor: Positive": (200, 50, 50),
    "Tumor: Negative": (70, 110, 210),
    "Immune cells: Positive": (240, 150, 20),
    "Immune cells: Negative": (30, 170, 150),
    "Immune cells": (160, 90, 160),
    "Other": (150, 150, 150),
}

#: ``cells`` column -> (QuPath measurement name, printf format). Names follow QuPath's cell
#: detection (``Nucleus: DAB OD mean`` ...), so existing QuPath scripts find them.
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "intensity_bin": ("Intensity bin (0-3)", "%d"),
    "type_prob": ("Type probability", "%.3f"),
    "nucleus_area_um2": ("Nucleus: Area \u00b5m^2", "%.2f"),
    "nucleus_dab": ("Nucleus: DAB OD mean", "%.4f"),
    "cytoplasm_dab": ("Cytoplasm: DAB OD mean", "%.4f"),
    "membrane_dab": ("Membrane: DAB OD mean", "%.4f"),
    "membrane_coverage": ("Membrane: stained fraction", "%.3f"),
    "scored_dab": ("Scored DAB OD", "%.4f"),
}

_N_VERTICES = 12
#: Area of a regular n-gon of circumradius 1; the radius is scaled so the polygon keeps the
#: nucleus area (a 12-gon inscribed in the circle would have 4.5 % less).
_UNIT_POLYGON_AREA = 0.5 * _N_VERTICES * math.sin(2.0 * math.pi / _N_VERTICES)
#: Smallest radius in level-0 px: keeps the 0.1 px vertices distinct, so QuPath's precision
#: reduction on import can never collapse a polygon.
_MIN_RADIUS_PX = 1.0
_CHUNK = 32768

# A measurement whose value printed as nan/inf, with the comma that separates it from the others.
_NON_FINITE_AFTER = re.compile(rb',"[^"]*":-?(?:nan|inf)(?=[,}])')
_NON_FINITE_FIRST = re.compile(rb'(?<=\{)"[^"]*":-?(?:nan|inf)(?:,|(?=\}))')


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as null and unknown objects as strings (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return str(value)


def _immune_scored(marker: str, cells: pd.DataFrame, type_code: NDArray[np.int64]) -> bool:
    """Whether ``marker`` scores lymphocytes and macrophages (its YAML has ``cells.immune``).

    A marker that cannot be loaded by name (a config given by path elsewhere) falls back to the
    data: immune cells are shown as scored when at least one of them is positive.
    """
    from pathology.errors import ConfigError
    from pathology.scoring._markers import load_marker

    try:
        return "immune" in load_marker(marker).cells
    except ConfigError:
        immune = (type_code == 1) | (type_code == 2)
        return bool(np.asarray(cells["positive"], dtype=bool)[immune].any())


def _type_codes(column: pd.Series) -> NDArray[np.int64]:
    import pandas as pd

    if pd.api.types.is_integer_dtype(column):
        codes = column.to_numpy(dtype=np.int64)
    else:
        # Unknown names map to -1 (pandas 3 deprecates building a Categorical from values
        # outside its categories, so the lookup is an Index, not a Categorical).
        codes = pd.Index(list(CELL_TYPES)).get_indexer(column.astype(str)).astype(np.int64)
    bad = (codes < 0) | (codes >= len(CELL_TYPES))
    if bad.any():
        found = sorted({str(v) for v in column[bad].unique()[:5]})
        raise ValueError(
            f"cells.type has unknown cell types {found}; expected {', '.join(CELL_TYPES)} "
            f"(or their codes 0-{len(CELL_TYPES) - 1})"
        )
    return codes


def _class_fragments(immune_scored: bool) -> list[bytes]:
    """JSON fragments (name + classification, trailing comma) by ``type_code * 2 + positive``."""

    def frag(cls: str, name: str | None = None) -> bytes:
        rgb = list(CELL_CLASSES[cls])
        out = "" if name is None else f'"name":{json.dumps(name)},'
        body = json.dumps({"name": cls, "color": rgb}, separators=(",", ":"))
        return (out + f'"classification":{body},').encode("ascii")

    def immune(kind: str) -> tuple[bytes, bytes]:
        if not immune_scored:
            return frag("Immune cells", kind), frag("Immune cells", kind)
        return (
            frag("Immune cells: Negative", kind),
            frag("Immune cells: Positive", kind),
        )

    return [
        frag("Tumor: Negative"),
        frag("Tumor: Positive"),
        *immune("Lymphocyte"),
        *immune("Macrophage"),
        frag("Other"),
        frag("Other"),
    ]


def _polygon_tenths(
    x: NDArray[np.float64], y: NDArray[np.float64], radius: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Vertices (n, 13) of each closed ring in tenths of a level-0 pixel."""
    angle = 2.0 * np.pi * np.arange(_N_VERTICES) / _N_VERTICES
    vx = np.rint((x[:, None] + radius[:, None] * np.cos(angle)) * 10.0).astype(np.int64)
    vy = np.rint((y[:, None] + radius[:, None] * np.sin(angle)) * 10.0).astype(np.int64)
    return np.concatenate([vx, vx[:, :1]], 1), np.concatenate([vy, vy[:, :1]], 1)


def _decimal_text(tenths: NDArray[np.int64]) -> NDArray[np.uint8]:
    """ASCII of ``tenths / 10`` with one decimal, right-aligned to a common width, shape (m, w).

    Numbers are padded with leading spaces (whitespace between JSON tokens is allowed), so the
    digits of a million coordinates are produced with a few array operations instead of millions
    of ``%`` conversions.
    """
    neg = tenths < 0
    mag = np.abs(tenths)
    whole = mag // 10
    n_digits = np.ones(mag.shape, dtype=np.int64)
    power = 10
    while power <= max(int(whole.max(initial=0)), 9):
        n_digits += whole >= power
        power *= 10
    max_digits = int(n_digits.max(initial=1))
    width = max_digits + int(neg.any())
    out = np.full((mag.size, width + 2), ord(" "), dtype=np.uint8)
    for k in range(max_digits):
        digit = (whole // 10**k) % 10
        out[:, width - 1 - k] = np.where(k < n_digits, ord("0") + digit, ord(" "))
    rows = np.flatnonzero(neg)
    out[rows, width - 1 - n_digits[rows]] = ord("-")
    out[:, width] = ord(".")
    out[:, width + 1] = ord("0") + mag % 10
    return out


def _rings_json(vx: NDArray[np.int64], vy: NDArray[np.int64]) -> list[bytes]:
    """GeoJSON Polygon ``coordinates`` of each row of vertices (n, k) in tenths of a pixel."""
    n, k = vx.shape
    tx = _decimal_text(vx.ravel()).reshape(n, k, -1)
    ty = _decimal_text(vy.ravel()).reshape(n, k, -1)
    wx, wy = tx.shape[2], ty.shape[2]
    pair = np.empty((n, k, wx + wy + 4), dtype=np.uint8)  # "[x,y],"
    pair[:, :, 0] = ord("[")
    pair[:, :, 1 : 1 + wx] = tx
    pair[:, :, 1 + wx] = ord(",")
    pair[:, :, 2 + wx : 2 + wx + wy] = ty
    pair[:, :, 2 + wx + wy] = ord("]")
    pair[:, :, 3 + wx + wy] = ord(",")
    ring = pair.reshape(n, -1)[:, :-1]  # drop the last comma
    text = np.empty((n, ring.shape[1] + 4), dtype=np.uint8)
    text[:, :2] = ord("[")
    text[:, 2:-2] = ring
    text[:, -2:] = ord("]")
    # One fixed-width bytes object per row (the rows hold no NUL, which "S" would strip).
    rows: list[bytes] = text.view(f"S{text.shape[1]}").ravel().tolist()
    return rows


def _feature_template(measures: list[tuple[str, str]]) -> bytes:
    meas = ",".join(f"{json.dumps(name)}:{fmt}" for name, fmt in measures)
    text = (
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":%s},'
        '"properties":{"objectType":"detection",%s"measurements":{' + meas + "}}}"
    )
    return text.encode("ascii")


def _format_chunk(
    vx: NDArray[np.int64],
    vy: NDArray[np.int64],
    frags: NDArray[np.object_],
    values: list[NDArray[Any]],
    measures: list[tuple[str, str]],
) -> bytes:
    """Features of one chunk (ASCII JSON), one per line, joined by ``",\\n"``."""
    n = vx.shape[0]
    table = np.empty((n, 2 + len(values)), dtype=object)
    table[:, 0] = _rings_json(vx, vy)
    table[:, 1] = frags
    for j, v in enumerate(values):
        table[:, 2 + j] = v
    text = b",\n".join([_feature_template(measures)] * n) % tuple(table.ravel().tolist())
    if any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in values):
        text = _NON_FINITE_FIRST.sub(b"", _NON_FINITE_AFTER.sub(b"", text))
    return text


def _measurement_columns(
    cells: pd.DataFrame,
) -> tuple[list[tuple[str, str]], list[NDArray[Any]]]:
    """(name, format) and values of the measurement columns present in ``cells``."""
    import pandas as pd

    measures: list[tuple[str, str]] = []
    values: list[NDArray[Any]] = []
    for column, (name, fmt) in MEASUREMENTS.items():
        if column not in cells.columns:
            continue
        series = cells[column]
        if fmt == "%d" and not (
            pd.api.types.is_integer_dtype(series) or pd.api.types.is_bool_dtype(series)
        ):
            fmt = "%.0f"  # an integer column that holds NaN arrives as float
        measures.append((name, fmt))
        values.append(series.to_numpy(dtype=np.int64 if fmt == "%d" else np.float64))
    return measures, values


class _Prepared(NamedTuple):
    """Validated per-cell arrays (n,) ready to format; ``rows`` indexes the finite centres."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    rows: NDArray[np.intp]
    radius: NDArray[np.float64]
    frags: NDArray[np.object_]
    measures: list[tuple[str, str]]
    values: list[NDArray[Any]]


def _prepare(cells: pd.DataFrame, mpp: float, marker: str, immune_scored: bool | None) -> _Prepared:
    missing = [c for c in ("x_l0", "y_l0", "type", "positive") if c not in cells.columns]
    if missing:
        raise ValueError(
            f"cells lacks column(s) {', '.join(missing)}; expected x_l0, y_l0 (level-0 px), "
            "type and positive (see write_cells_geojson)"
        )
    x = cells["x_l0"].to_numpy(dtype=np.float64)
    y = cells["y_l0"].to_numpy(dtype=np.float64)
    code = _type_codes(cells["type"])
    positive = cells["positive"].to_numpy(dtype=bool)
    scored = _immune_scored(marker, cells, code) if immune_scored is None else immune_scored
    frags = np.array(_class_fragments(bool(scored)), dtype=object)[code * 2 + positive]
    radius = np.full(len(cells), _MIN_RADIUS_PX)
    if "nucleus_area_um2" in cells.columns:
        area_px = cells["nucleus_area_um2"].to_numpy(dtype=np.float64) / mpp**2
        with np.errstate(invalid="ignore"):
            r = np.sqrt(area_px / _UNIT_POLYGON_AREA)
        radius = np.where(r >= _MIN_RADIUS_PX, r, _MIN_RADIUS_PX)  # NaN -> the minimum
    rows = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    measures, values = _measurement_columns(cells)
    return _Prepared(x, y, rows, radius, frags, measures, values)


def _write_features(fh: BinaryIO, prep: _Prepared) -> None:
    """Stream the features chunk by chunk (memory stays ~ one chunk, whatever the cell count)."""
    for start in range(0, prep.rows.size, _CHUNK):
        idx = prep.rows[start : start + _CHUNK]
        vx, vy = _polygon_tenths(prep.x[idx], prep.y[idx], prep.radius[idx])
        values = [v[idx] for v in prep.values]
        fh.write(b"\n" if start == 0 else b",\n")
        fh.write(_format_chunk(vx, vy, prep.frags[idx], values, prep.measures))


def write_cells_geojson(
    path: Path,
    cells: pd.DataFrame,
    *,
    l0_mpp: float,
    marker: str,
    provenance: dict[str, Any],
    immune_scored: bool | None = None,
) -> int:
    """Write the cells of one slide as QuPath detections (GeoJSON), atomically.

    Parameters
    ----------
    path : Path
        Output file (``cells.geojson``); written to a temporary file beside it and renamed, so
        a crash leaves the previous file (or none), never a truncated one.
    cells : DataFrame
        One row per cell. Required: ``x_l0``, ``y_l0`` (float, level-0 px, nucleus centre),
        ``type`` (str ``tumor|lymphocyte|macrophage|other``, or codes 0-3) and ``positive``
        (bool). Optional measurements, written when present: ``intensity_bin`` (int 0-3),
        ``type_prob``, ``nucleus_dab``, ``cytoplasm_dab``, ``membrane_dab`` (mean DAB OD),
        ``membrane_coverage`` (0-1), ``scored_dab`` (DAB OD), ``nucleus_area_um2`` (µm²; sets
        the polygon size, else a 1 px radius). Rows whose centre is not finite are skipped.
    l0_mpp : float
        Level-0 pixel size in µm per pixel (converts the nucleus area to pixels).
    marker : str
        Marker name (``p16``, ``pdl1`` ...): decides whether immune cells get a Positive /
        Negative class (markers that score them, e.g. PD-L1 CPS) or the plain *Immune cells*.
    provenance : dict
        Run provenance (software version, model, marker, marker sha256 ...), written as the
        top-level ``provenance`` member.
    immune_scored : bool, optional
        Overrides the marker lookup described under ``marker``.

    Returns
    -------
    int
        Number of features written.

    Raises
    ------
    ValueError
        ``l0_mpp`` not a positive number, a required column missing or an unknown cell type.
    """
    try:
        mpp = float(l0_mpp)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"l0_mpp must be a positive number of µm per pixel, got {l0_mpp!r}")
    frame = {"coordinates": "level-0 pixels, x right, y down", "l0_mpp": mpp, "marker": marker}
    header = (
        '{"type":"FeatureCollection",\n"provenance":'
        + json.dumps(_jsonable(provenance), separators=(",", ":"), allow_nan=False)
        + ',\n"frame":'
        + json.dumps(_jsonable(frame), separators=(",", ":"), allow_nan=False)
        + ',\n"features":['
    )
    # Everything that can reject the input runs before the output file is opened.
    prep = _prepare(cells, mpp, marker, immune_scored) if len(cells) else None
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header.encode("ascii"))
        if prep is not None:
            _write_features(fh, prep)
        fh.write(b"\n]}\n")
    return 0 if prep is None else int(prep.rows.size)
