"""``report.html``: one self-contained page per batch run.

Provenance, the table of slides with their calls, the slides that failed and each slide's heatmap.
Everything is inline (CSS, PNGs as base64 data URIs): no script, font or image is fetched, so the
file can be mailed or archived as it is. Every value from the inputs is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathology._io import write_text

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["render_batch_report", "write_batch_report"]

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f5f5f5;padding:0 .2em;word-break:break-all}
.call{font-weight:600;padding:0 .4em;border-radius:3px;white-space:nowrap}
.call-positive{background:#f4c7c3}.call-equivocal{background:#fce8b2}
.call-negative{background:#d9ead3}.call-intermediate{background:#fce8b2}
.call-not-evaluable{background:#e0e0e0;color:#555}.call-other{background:#eef}
.failed td{background:#fdecea}figure{margin:1.5em 0}figcaption{font-weight:600}
img{max-width:100%;display:block;border:1px solid #ddd}.small{font-size:.85em;color:#555}
"""

#: Call -> CSS class suffix. p16: positive/equivocal/negative; PD-L1 CPS bins; H-score high/low.
_CALL_CLASS = {
    "positive": "positive",
    "equivocal": "equivocal",
    "negative": "negative",
    ">=20": "positive",
    "1-19": "intermediate",
    "<1": "negative",
    "high": "positive",
    "low": "negative",
    "not_evaluable": "not-evaluable",
}


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (None, NaN, '' and text give None)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fixed(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        x = _number(value)
        return "" if x is None else f"{x:,.{digits}f}"

    return fmt


def _count(value: Any) -> str:
    x = _number(value)
    return "" if x is None else f"{round(x):,d}"


def _yes_no(value: Any) -> str:
    text = _text(value)
    return {"true": "yes", "false": "no", "1": "yes", "0": "no"}.get(text.strip().lower(), text)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return str(value)


#: Slide table: column -> (header, formatter, numeric). Columns absent from the frame are skipped.
_COLUMNS: dict[str, tuple[str, Callable[[Any], str], bool]] = {
    "slide_id": ("slide", _text, False),
    "marker": ("marker", _text, False),
    "call": ("call", _text, False),
    "positive_pct": ("positive %", _fixed(1), True),
    "cps": ("CPS", _fixed(1), True),
    "tps": ("TPS %", _fixed(1), True),
    "h_score": ("H-score", _fixed(0), True),
    "tumor_cells": ("tumour cells", _count, True),
    "immune_cells": ("immune cells", _count, True),
    "evaluable": ("evaluable", _yes_no, False),
    "qc_flags": ("QC flags", _text, False),
    "seconds": ("seconds", _fixed(1), True),
}


def _call_span(call: str) -> str:
    cls = _CALL_CLASS.get(call, "other")
    return f'<span class="call call-{cls}">{html.escape(call)}</span>'


def _slides_table(slides: pd.DataFrame, linked: set[int]) -> str:
    """The slides as an HTML table; the ids of rows in ``linked`` link to their heatmap."""
    cols = [c for c in _COLUMNS if c in slides.columns]
    head = "".join(f"<th>{html.escape(_COLUMNS[c][0])}</th>" for c in cols)
    body = []
    for i, rec in enumerate(slides[cols].to_dict("records")):
        cells = []
        for c in cols:
            _, fmt, numeric = _COLUMNS[c]
            text = fmt(rec[c])
            if c == "call" and text:
                cells.append(f"<td>{_call_span(text)}</td>")
            elif c == "slide_id" and i in linked:
                cells.append(f'<td><a href="#slide-{i}">{html.escape(text)}</a></td>')
            else:
                cls = ' class="num"' if numeric else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _flags_section(slides: pd.DataFrame) -> list[str]:
    """What each QC flag raised in this run means, with how many slides carry it."""
    from pathology.calls import QC_FLAGS

    if "qc_flags" not in slides.columns:
        return []
    seen: dict[str, int] = {}
    for value in slides["qc_flags"].map(_text):
        for flag in filter(None, value.split(";")):
            seen[flag] = seen.get(flag, 0) + 1
    if not seen:
        return []
    items = "".join(
        f"<li><code>{html.escape(flag)}</code> ({n} slide{'s' * (n != 1)}): "
        f"{html.escape(QC_FLAGS.get(flag, 'see the README'))}</li>"
        for flag, n in seen.items()
    )
    return ["<h2>QC flags</h2>", f"<ul>{items}</ul>"]


def _provenance_table(provenance: dict[str, Any]) -> str:
    rows = []
    for key, value in provenance.items():
        if isinstance(value, (dict, list, tuple)):
            shown = json.dumps(value, sort_keys=True, default=str)
        else:
            shown = _text(value)
        rows.append(
            f"<tr><th>{html.escape(str(key))}</th><td><code>{html.escape(shown)}</code></td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _failures_section(failures: Sequence[tuple[str, str]]) -> list[str]:
    rows = []
    for path, reason in failures:
        lines = str(reason).strip().splitlines()
        first = lines[0] if lines else ""
        rows.append(
            f'<tr class="failed"><td><code>{html.escape(str(path))}</code></td>'
            f"<td>{html.escape(first)}</td></tr>"
        )
    return [
        f"<h2>Failed slides ({len(failures)})</h2>",
        '<p class="small">These slides have no results; the others are unaffected.</p>',
        "<table><thead><tr><th>slide</th><th>reason</th></tr></thead>",
        f"<tbody>{''.join(rows)}</tbody></table>",
    ]


def _heatmap_path(out_dir: Path, slide_id: str) -> Path | None:
    """``out_dir/<slide_id>/heatmap.png`` when ``slide_id`` is one plain path component."""
    plain = slide_id not in ("", ".", "..") and not any(sep in slide_id for sep in "/\\")
    if not plain:
        return None  # never read outside out_dir
    path = out_dir / slide_id / "heatmap.png"
    return path if path.is_file() else None


def _heatmaps(slides: pd.DataFrame, out_dir: Path) -> dict[int, str]:
    """``<figure>`` of each slide (by row) whose heatmap exists, its PNG inlined."""
    if "slide_id" not in slides.columns:
        return {}
    figures: dict[int, str] = {}
    for i, value in enumerate(slides["slide_id"].tolist()):
        slide_id = _text(value)
        path = _heatmap_path(out_dir, slide_id)
        if path is None:
            continue
        try:
            png = path.read_bytes()
        except OSError:
            continue  # removed or unreadable since the check: the report is still useful without it
        data = base64.b64encode(png).decode("ascii")
        e = html.escape(slide_id)
        figures[i] = (
            f'<figure id="slide-{i}"><figcaption>{e}</figcaption>'
            f'<img alt="heatmap of {e}" src="data:image/png;base64,{data}"></figure>'
        )
    return figures


def render_batch_report(
    slides: pd.DataFrame,
    *,
    out_dir: Path,
    failures: Sequence[tuple[str, str]],
    provenance: dict[str, Any],
) -> str:
    """The HTML text of :func:`write_batch_report` (parameters there)."""
    n_ok, n_failed = len(slides), len(failures)
    calls = ""
    if "call" in slides.columns and n_ok:
        counts = slides["call"].map(_text).value_counts()
        calls = ", ".join(f"{_call_span(str(k))} {int(v)}" for k, v in counts.items())
    figures = _heatmaps(slides, out_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>pathology score: batch report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch scoring report</h1>",
        f"<p>{n_ok} slide{'s' * (n_ok != 1)} scored, {n_failed} failed."
        + (f" Calls: {calls}." if calls else "")
        + "</p>",
        "<h2>Run provenance</h2>",
        _provenance_table(provenance),
        "<h2>Slides</h2>",
        _slides_table(slides, set(figures)) if n_ok else "<p>No slide was scored.</p>",
        *(_flags_section(slides) if n_ok else []),
    ]
    if failures:
        parts += _failures_section(failures)
    if figures:
        parts += ["<h2>Heatmaps</h2>", *figures.values()]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_batch_report(
    path: Path,
    slides: pd.DataFrame,
    *,
    out_dir: Path,
    failures: Sequence[tuple[str, str]],
    provenance: dict[str, Any],
) -> Path:
    """Write the batch's ``report.html``: one self-contained, escaped HTML file, atomically.

    Parameters
    ----------
    path : Path
        Output file (``DIR/report.html``).
    slides : DataFrame
        ``slides.csv`` rows. Shown when present: ``slide_id``, ``marker``, ``call`` (highlighted
        by class ``call-<kind>``), ``positive_pct``, ``cps``, ``tps`` (0-100), ``h_score``
        (0-300), ``tumor_cells``, ``immune_cells``, ``evaluable``, ``qc_flags``, ``seconds``;
        empty cells for missing values.
    out_dir : Path
        The batch output folder: each slide's heatmap is embedded from
        ``out_dir/<slide_id>/heatmap.png`` when that file exists.
    failures : sequence of (str, str)
        ``(slide path, reason)`` of each slide that failed; only the reason's first line is shown.
    provenance : dict
        Run provenance (software version, model, device, marker config hashes ...), shown as a
        key/value table; nested values as JSON.

    Returns
    -------
    Path
        ``path``.
    """
    text = render_batch_report(
        slides, out_dir=Path(out_dir), failures=failures, provenance=provenance
    )
    return write_text(path, text)
