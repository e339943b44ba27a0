"""The classical per-tile CPU pipeline the scoring engine is benchmarked against.

What a QuPath-script or scikit-image-notebook user writes to count DAB-positive cells, done with
care so the comparison is fair: ``skimage.color.rgb2hed`` colour deconvolution, a smoothed
haematoxylin image thresholded by Otsu, small objects removed, touching nuclei split by a
distance-transform watershed, ``regionprops`` for area, centroid and mean DAB in each nucleus, a
cytoplasm ring grown around each nucleus by ``expand_labels``, and a cell called positive when
its nuclear or ring mean DAB reaches a threshold. Every size is given in microns and converted to
pixels with the tile's ``mpp``, so the same settings work at 20x and 40x.

Planes and units:

- ``tile_rgb``: uint8 (H, W, 3) transmitted light.
- ``yx``: (row, col) in pixels of the tile; pixel ``(row, col)`` spans ``[row, row + 1) x
  [col, col + 1)`` so its centre is ``(row + 0.5, col + 0.5)``, as in :mod:`pathology.synth`.
- ``*_dab``: DAB optical density, base 10, along the unit DAB vector: the units of
  :mod:`pathology.stain` and of QuPath's "DAB OD mean", so thresholds 0.2 / 0.4 / 0.6 mean the
  same here as in the scoring engine.

DAB units. ``rgb2hed`` computes ``ln(I / 255) / ln(1e-6)`` per channel before unmixing with its
(non-normalised) Ruifrok-Johnston H-E-DAB matrix, i.e. base-10 optical density divided by
``-log10(1e-6) = 6``. Multiplying its output by :data:`SKIMAGE_HED_TO_OD` (6) recovers base-10 OD:
checked numerically on pixels rendered from known stain amounts with :func:`pathology.stain.od_to_rgb`
(DAB 0.2 / 0.4 / 1.0 OD read back as 0.200 / 0.402 / 1.005; the remaining differences come from
skimage's unnormalised vectors, its ``I / 255`` rather than ``(I + 1) / 256`` and its eosin
third channel). Dividing by ``ln 10`` instead would leave values ~14x too small and make a
0.2 threshold call almost nothing positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "SKIMAGE_HED_TO_OD",
    "PeerTileResult",
    "classical_score_tile",
    "classical_score_tiles",
]

#: Factor from ``skimage.color.rgb2hed`` output to base-10 optical density (see module docstring).
SKIMAGE_HED_TO_OD = -math.log10(1e-6)

#: Below this smoothed haematoxylin OD (base 10) nothing is a nucleus, whatever Otsu says: a tile
#: of glass or pale stroma has no nuclei to split from its background.
_MIN_NUCLEUS_H_OD = 0.1

#: Percentile of the haematoxylin OD above which values are clipped before Otsu's threshold.
_OTSU_CLIP_PERCENTILE = 99.0

#: Gaussian sigma (microns) applied to the distance transform before seeding the watershed.
_DIST_SMOOTH_UM = 1.0


@dataclass(frozen=True)
class PeerTileResult:
    """Cells found in one tile by the classical pipeline.

    Attributes
    ----------
    centroid_yx : ndarray (N, 2) float64
        Nucleus centroid (row, col) in pixels of the tile (pixel centres at ``+ 0.5``).
    area_px : ndarray (N,) int64
        Nucleus area in pixels.
    nucleus_dab : ndarray (N,) float32
        Mean DAB OD (base 10) over the nucleus.
    ring_dab : ndarray (N,) float32
        Mean DAB OD (base 10) over the cytoplasm ring; 0 where the ring has no pixels.
    positive : ndarray (N,) bool
        ``max(nucleus_dab, ring_dab) >= dab_threshold``.
    """

    centroid_yx: NDArray[np.float64]
    area_px: NDArray[np.int64]
    nucleus_dab: NDArray[np.float32]
    ring_dab: NDArray[np.float32]
    positive: NDArray[np.bool_]

    @property
    def n_cells(self) -> int:
        """Number of cells (nuclei) detected."""
        return len(self.area_px)

    @property
    def n_positive(self) -> int:
        """Number of DAB-positive cells."""
        return int(np.count_nonzero(self.positive))

    @property
    def centroid_xy(self) -> NDArray[np.float64]:
        """(N, 2) float64 centroids as (x, y), for :func:`pathology.groundtruth.match_cells`."""
        return self.centroid_yx[:, ::-1].copy()


def _empty() -> PeerTileResult:
    return PeerTileResult(
        centroid_yx=np.empty((0, 2), np.float64),
        area_px=np.empty(0, np.int64),
        nucleus_dab=np.empty(0, np.float32),
        ring_dab=np.empty(0, np.float32),
        positive=np.empty(0, bool),
    )


def _check_tile(tile_rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    a = np.asarray(tile_rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"tile_rgb must be an (H, W, 3) uint8 array, got {a.shape} {a.dtype}")
    return a


def classical_score_tile(
    tile_rgb: NDArray[np.uint8],
    mpp: float,
    *,
    dab_threshold: float = 0.2,
    sigma_um: float = 0.5,
    min_nucleus_um2: float = 8.0,
    min_distance_um: float = 3.0,
    ring_um: float = 3.0,
) -> PeerTileResult:
    """Detect nuclei and call DAB-positive cells in one tile, the classical way.

    Parameters
    ----------
    tile_rgb : ndarray (H, W, 3) uint8
        The tile.
    mpp : float
        Microns per pixel of the tile.
    dab_threshold : float
        Positivity cut on mean DAB OD, base 10 (QuPath's default 1+ cut is 0.2).
    sigma_um : float
        Gaussian smoothing of the haematoxylin image before thresholding, microns
        (0.5 um = 1 px at 0.5 mpp).
    min_nucleus_um2 : float
        Objects smaller than this after thresholding are dropped, square microns.
    min_distance_um : float
        Smallest distance between two nucleus centres the watershed may split, microns.
    ring_um : float
        Width of the cytoplasm ring grown around each nucleus, microns.

    Returns
    -------
    PeerTileResult
        Zero cells for a tile without haematoxylin-stained objects (glass, all white).

    Notes
    -----
    The threshold is Otsu's on the smoothed haematoxylin OD of the tile (clipped at its 99th
    percentile), but never below 0.1 OD: on a tile of glass and pale stroma Otsu would
    otherwise split noise. One global threshold is the classical pipeline's weak point: where
    negative nuclei are barely darker than the stroma in the haematoxylin channel (DeepLIIF's
    BCData tile 6_2), it finds a fraction of them.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import regionprops_table
    from skimage.segmentation import expand_labels, watershed

    rgb = _check_tile(tile_rgb)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")

    hed = rgb2hed(rgb).astype(np.float32) * np.float32(SKIMAGE_HED_TO_OD)
    od_h = gaussian(hed[..., 0], sigma=sigma_um / mpp, preserve_range=True)
    od_dab = hed[..., 2]
    if float(od_h.max()) < _MIN_NUCLEUS_H_OD:
        return _empty()
    # Otsu on values clipped at the 99th percentile: near-black DAB (and ink) leaks into the
    # haematoxylin channel and would otherwise pull the cut above every ordinary nucleus.
    od_h_clipped = np.minimum(od_h, np.percentile(od_h, _OTSU_CLIP_PERCENTILE))
    cut = max(float(threshold_otsu(od_h_clipped)), _MIN_NUCLEUS_H_OD)
    # Objects below the smallest nucleus go (debris, noise). By hand rather than with
    # remove_small_objects, whose size argument changed meaning in scikit-image 0.26.
    blobs, n_blobs = ndi.label(od_h > cut)
    blob_px = np.bincount(blobs.ravel(), minlength=n_blobs + 1)
    small = blob_px < min_nucleus_um2 / mpp**2
    small[0] = True
    blobs[small[blobs]] = 0
    fg = blobs > 0
    if not fg.any():
        return _empty()

    # Split touching nuclei: one marker per local maximum of the distance to the background,
    # smoothed over ~1 um so a ragged outline does not seed extra maxima (over-splitting).
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), _DIST_SMOOTH_UM / mpp)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, round(min_distance_um / mpp)),
        labels=blobs,
        exclude_border=False,
    )
    # A blob with no maximum far enough from its edge still gets one seed, at its deepest pixel.
    seeded = np.zeros(n_blobs + 1, bool)
    seeded[blobs[tuple(peaks.T)]] = True
    unseeded = np.flatnonzero(~seeded & ~small)
    if len(unseeded):
        extra = np.array(ndi.maximum_position(dist, blobs, unseeded), dtype=np.intp)
        peaks = np.concatenate([peaks.reshape(-1, 2), extra.reshape(-1, 2)])
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    nuclei = watershed(-dist, markers, mask=fg)

    props = regionprops_table(
        nuclei, intensity_image=od_dab, properties=("label", "area", "centroid", "intensity_mean")
    )
    if len(props["label"]) == 0:
        return _empty()
    cells = expand_labels(nuclei, distance=ring_um / mpp)
    ring = np.where(nuclei == 0, cells, 0)
    ring_props = regionprops_table(
        ring, intensity_image=od_dab, properties=("label", "intensity_mean")
    )
    ring_dab = np.zeros(int(nuclei.max()) + 1, np.float32)
    ring_dab[ring_props["label"]] = ring_props["intensity_mean"]

    labels = np.asarray(props["label"])
    nucleus_dab = np.asarray(props["intensity_mean"], np.float32)
    ring_mean = ring_dab[labels]
    return PeerTileResult(
        centroid_yx=np.stack([props["centroid-0"], props["centroid-1"]], axis=1).astype(np.float64)
        + 0.5,
        area_px=np.asarray(props["area"]).astype(np.int64),
        nucleus_dab=nucleus_dab,
        ring_dab=ring_mean,
        positive=np.maximum(nucleus_dab, ring_mean) >= dab_threshold,
    )


def classical_score_tiles(
    tiles: NDArray[np.uint8],
    mpp: float,
    *,
    dab_threshold: float = 0.2,
    sigma_um: float = 0.5,
    min_nucleus_um2: float = 8.0,
    min_distance_um: float = 3.0,
    ring_um: float = 3.0,
) -> list[PeerTileResult]:
    """Run :func:`classical_score_tile` on each tile of a batch, one after another.

    Parameters
    ----------
    tiles : ndarray (N, H, W, 3) uint8
        The tiles.
    mpp : float
        Microns per pixel of the tiles.
    dab_threshold, sigma_um, min_nucleus_um2, min_distance_um, ring_um
        As in :func:`classical_score_tile`.

    Returns
    -------
    list of PeerTileResult
        One per tile, in order.
    """
    a = np.asarray(tiles)
    if a.ndim != 4:
        raise ValueError(f"tiles must be an (N, H, W, 3) uint8 array, got shape {a.shape}")
    return [
        classical_score_tile(
            t,
            mpp,
            dab_threshold=dab_threshold,
            sigma_um=sigma_um,
            min_nucleus_um2=min_nucleus_um2,
            min_distance_um=min_distance_um,
            ring_um=ring_um,
        )
        for t in a
    ]
