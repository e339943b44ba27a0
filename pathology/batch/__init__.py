"""Batch scoring: slides in, per-slide calls with their evidence out (``pathology score``).

>>> from pathology.batch import read_manifest, score_slides  # doctest: +SKIP
>>> result = score_slides(read_manifest("manifest.csv"), "results/")  # doctest: +SKIP
>>> result.ok, [o.row["call"] for o in result.done]  # doctest: +SKIP
(True, ['positive', '>=20'])
"""

from __future__ import annotations

from pathology.batch._api import BatchProgress, BatchResult, SlideFailure, score_slides
from pathology.batch._cluster import (
    ClusterInfo,
    auto_cluster,
    load_cluster_config,
    score_slides_distributed,
)
from pathology.batch._manifest import SlideJob, jobs_from_paths, read_manifest
from pathology.batch._slide import (
    REQUIRED_SLIDE_COLUMNS,
    SLIDE_COLUMNS,
    ScoreSettings,
    SlideOutcome,
    score_slide,
)

__all__ = [
    "REQUIRED_SLIDE_COLUMNS",
    "SLIDE_COLUMNS",
    "BatchProgress",
    "BatchResult",
    "ClusterInfo",
    "ScoreSettings",
    "SlideFailure",
    "SlideJob",
    "SlideOutcome",
    "auto_cluster",
    "jobs_from_paths",
    "load_cluster_config",
    "read_manifest",
    "score_slide",
    "score_slides",
    "score_slides_distributed",
]
