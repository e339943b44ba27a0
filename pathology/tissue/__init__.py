"""Tissue mask at thumbnail scale, built from transmitted-light optics so pale IHC tissue survives.

Coordinate planes (as in :mod:`pathology.slide`):

- ``l0_xy`` / ``l0_size``: (x, y) position / (w, h) size in level-0 pixels.
- mask pixel ``(row, col)`` covers level-0 ``[col * ds_x, (col + 1) * ds_x) x [row * ds_y, (row + 1) * ds_y)``
  with ``(ds_x, ds_y) = TissueMask.downsample_xy``.
- ``mpp`` in :func:`tissue_mask_from_rgb`: microns per pixel *of the image given* (the thumbnail);
  ``TissueMask.mpp``: microns per level-0 pixel.

Why not Otsu: Otsu on grey or saturation splits the two largest intensity populations. On IHC the
counterstain is pale and often grey, and pen ink or a black border is the darkest population, so the
threshold lands between tissue and ink and pale tissue is called glass. Here glass is modelled
instead of tissue, from transmitted-light optics:

1. Glass. Its intensity ``I0`` per RGB channel is the median of the brightest pixels (pure-white
   scanner padding left out when its edges run along the tile grid), refined as a smooth quadratic
   surface fitted to glass seeds: pixels with no stain anywhere near them, grown outward from the
   brightest glass. Tinted and unevenly lit glass is OD 0; the surface is trusted only near glass it
   has seen, so it never extrapolates into tissue. A view without glass-like pixels (a field inside
   tissue) gets white-balanced glass.
2. Stain. Optical density relative to that glass, ``od = log10(I0 / I)`` (Beer-Lambert), is
   thresholded at 5 robust standard deviations of the glass OD, clamped to [``min_od``, 0.04], with
   1.5x hysteresis: any stain, however pale, absorbs light; glass does not.
3. Ink. Haematoxylin, eosin and DAB all absorb green, and their OD ratios ``r/g``, ``b/g`` lie on
   an H-E arm and an H-DAB arm. Green ink absorbs red and blue more than green, blue ink red but not
   blue (and darker than a counterstain), red ink too much blue for its red, black ink and scanner
   borders everything about equally. Such regions, if long (strokes, borders) rather than round
   (dark nuclei), are removed with their soft edges (same OD direction as the nearest ink).
4. Shape, in microns when ``mpp`` is known: a closing joins loose stroma, holes below
   ``max_hole_um2`` are filled (lumina, fat cells), regions below ``min_object_um2`` dropped (dust).
"""

from pathology.tissue._detect import tissue_mask_from_rgb
from pathology.tissue._mask import TissueMask, compute_tissue_mask, mask_downsample, overlay

__all__ = [
    "TissueMask",
    "compute_tissue_mask",
    "mask_downsample",
    "overlay",
    "tissue_mask_from_rgb",
]
