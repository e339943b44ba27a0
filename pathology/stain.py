"""Stain optics shared by the synthetic slides, the tissue mask and the scoring model.

Beer-Lambert law: light of intensity ``I0`` passing through stains with optical densities
``od_s`` along unit absorbance vectors ``v_s`` (one component per RGB channel) leaves
``I = I0 * 10 ** -(sum_s od_s * v_s)``. Colour deconvolution inverts it
(Ruifrok & Johnston, Anal Quant Cytol Histol 23:291, 2001).

Planes and units used throughout:

- ``rgb``: uint8 (..., 3) transmitted light, 0-255.
- ``od``: float32 (..., 3) optical density per RGB channel, base-10, >= 0.
- ``conc``: float32 (..., k) stain amounts in OD units along each stain's unit vector
  (``od_dab`` is the DAB component, comparable to QuPath's "DAB OD mean").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DAB",
    "EOSIN",
    "HAEMATOXYLIN",
    "H_DAB",
    "H_E",
    "StainMatrix",
    "od_to_rgb",
    "rgb_to_od",
]

#: Ruifrok & Johnston absorbance vectors (normalised below), as in QuPath and scikit-image.
HAEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)
DAB = (0.268, 0.570, 0.776)

_I0 = 255.0


def _unit(v: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(a)
    if a.shape != (3,) or not np.isfinite(n) or n == 0 or (a < 0).any():
        raise ValueError(f"stain vector must be 3 non-negative numbers, not all zero; got {v!r}")
    return a / n


@dataclass(frozen=True)
class StainMatrix:
    """Named unit absorbance vectors of the stains in a slide.

    Parameters
    ----------
    names : tuple of str
        Stain names, e.g. ``("haematoxylin", "dab")``.
    vectors : tuple of 3-tuples
        One RGB absorbance vector per stain; normalised to unit length on construction.
    """

    names: tuple[str, ...]
    vectors: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.vectors) or not 1 <= len(self.names) <= 3:
            raise ValueError("StainMatrix needs 1-3 stains with one vector each")
        unit = tuple(tuple(float(x) for x in _unit(v)) for v in self.vectors)
        object.__setattr__(self, "vectors", unit)

    @property
    def matrix(self) -> NDArray[np.float64]:
        """(k, 3) array, one unit stain vector per row."""
        return np.array(self.vectors, dtype=np.float64)

    def complete(self) -> NDArray[np.float64]:
        """(3, 3) matrix: the stain vectors plus, where fewer than 3, orthogonal residual rows.

        The residual channel of an H-DAB slide collects what neither stain explains (pen ink, dust).
        """
        m = self.matrix
        if len(m) == 1:
            a = np.cross(m[0], [1.0, 0.0, 0.0])
            if np.linalg.norm(a) < 1e-6:
                a = np.cross(m[0], [0.0, 1.0, 0.0])
            m = np.vstack([m, _unit(np.abs(a))])
        if len(m) == 2:
            r = np.cross(m[0], m[1])
            m = np.vstack([m, r / np.linalg.norm(r)])
        return m

    def unmix(self, od: NDArray[np.floating]) -> NDArray[np.float32]:
        """Stain amounts from optical density.

        Parameters
        ----------
        od : ndarray (..., 3) float
            Optical density per RGB channel.

        Returns
        -------
        ndarray (..., 3) float32
            Amount of each stain (first ``len(names)`` columns) then the residual channel(s).
        """
        inv = np.linalg.inv(self.complete()).astype(np.float32)
        return np.asarray(od, dtype=np.float32) @ inv

    def mix(self, conc: NDArray[np.floating]) -> NDArray[np.float32]:
        """Optical density (..., 3) from stain amounts (..., k) along this matrix's vectors."""
        return (np.asarray(conc, dtype=np.float32) @ self.matrix.astype(np.float32)).astype(
            np.float32
        )


H_DAB = StainMatrix(("haematoxylin", "dab"), (HAEMATOXYLIN, DAB))
H_E = StainMatrix(("haematoxylin", "eosin"), (HAEMATOXYLIN, EOSIN))


def rgb_to_od(
    rgb: NDArray[np.integer] | NDArray[np.floating], background: ArrayLike = _I0
) -> NDArray[np.float32]:
    """Optical density of transmitted light.

    Parameters
    ----------
    rgb : ndarray (..., 3) uint8 or float
        Transmitted intensities, 0-255.
    background : float or (3,) array
        Intensity of unobstructed light (glass) per channel; 255 for a white-balanced scan.

    Returns
    -------
    ndarray (..., 3) float32, >= 0
    """
    i0 = np.asarray(background, dtype=np.float32)
    i = np.asarray(rgb, dtype=np.float32)
    # +1 keeps log finite at 0; the clip keeps glass brighter than the estimate at OD 0.
    od = np.log10((i0 + 1.0) / (i + 1.0))
    return np.maximum(od, 0.0, out=od)


def od_to_rgb(od: NDArray[np.floating], background: ArrayLike = _I0) -> NDArray[np.uint8]:
    """Transmitted light (..., 3) uint8 from optical density (..., 3), the inverse of :func:`rgb_to_od`."""
    i0 = np.asarray(background, dtype=np.float32)
    i = (i0 + 1.0) * np.power(np.float32(10.0), -np.asarray(od, dtype=np.float32)) - 1.0
    return np.clip(np.rint(i), 0, 255).astype(np.uint8)
