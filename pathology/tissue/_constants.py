"""Tuning constants of the tissue detector (immutable; see the package docstring)."""

from __future__ import annotations

import math

# --- Tuning constants (immutable). OD is base-10; "OD norm" is the Euclidean norm of the per-channel
# --- OD vector, i.e. the amount of a single stain along its unit absorbance vector.

#: Glass candidates: pixels within this OD of the 99.5th brightness percentile (about 3.5% darker).
_GLASS_TOP_OD = 0.015
#: A pixel is a glass seed for the background surface while its OD norm is below this.
_GLASS_SEED_OD = 0.03
#: The fitted glass surface may be at most this much darker (OD) than the brightest glass.
_GLASS_MAX_DEV_OD = 0.08
#: Glass must look like glass: every channel brighter than OD 0.15 from white (I >= ~180) and
#: nearly grey (channel ODs within 0.05). Otherwise the image has no glass (a field inside tissue)
#: and white-balanced glass of this intensity is assumed.
_GLASS_MAX_OD_WHITE = 0.15
_GLASS_MAX_TINT_OD = 0.05
_DEFAULT_GLASS = 240.0
#: The glass surface is trusted where at least this fraction of the neighbourhood (a Gaussian of
#: 10% of the image size) is glass; deep inside tissue the brightest glass is used, so an
#: extrapolated surface can never make pale tissue look like glass.
_GLASS_SUPPORT = 0.1
#: Pure white is scanner padding when at least this fraction of its edge lies on straight
#: horizontal or vertical runs of this many pixels; otherwise it is saturated glass.
_PADDING_STRAIGHT = 0.8
_PADDING_RUN_PX = 8
#: Longest side of the grid on which the glass surface is fitted.
_GLASS_GRID = 256
#: Threshold = this many robust standard deviations of the glass OD norm ...
_NOISE_K = 5.0
#: ... capped here, so noisy glass cannot push pale tissue (OD ~0.05) under the threshold.
_MAX_THRESHOLD_OD = 0.04
#: Ink colour is judged only where it is reliable (OD norm at least this).
_INK_MIN_OD = 0.15
#: Blue ink has the hue of a blue haematoxylin counterstain (Mayer's, IHC); only its darkness at
#: thumbnail scale tells them apart: counterstain stays below ~0.5 at 4-8 um/px.
_BLUE_INK_OD = 0.45
#: A pixel near ink whose OD direction is within ~20 degrees of the nearest ink pixel's is ink too.
_INK_FRINGE_COS = math.cos(math.radians(20.0))
#: Near-black: every channel at OD >= this (<= 45% transmission) and grey (min >= ratio * max).
_BLACK_OD = 0.35
_BLACK_GREY_RATIO = 0.7
#: Ink regions smaller than this are not ink but dark stain (DAB-saturated nuclei look black and
#: grey; a pen stroke is hundreds of microns long). Without mpp: this fraction of the image.
_MIN_INK_UM2 = 5_000.0
_MIN_INK_FRAC = 2e-4
#: Without mpp, size limits are fractions of the image area.
_MIN_OBJECT_FRAC = 1e-4
_MAX_HOLE_FRAC = 5e-4
