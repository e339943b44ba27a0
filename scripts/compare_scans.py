"""Compare two scans of the same glass slide: how each scanner renders optical density, and what
that does to the marker's readouts.

A lab that adds a scanner, or pools slides from two sites, needs to know whether the intensity
cuts of its marker files (``configs/markers/*.yaml``: p16's moderate-to-strong cut, the intensity
bins behind the H-score) mean the same on both. Two scans of one slide answer it:

1. Scan B's field is found in scan A (A resampled to B's microns per pixel, translation by phase
   correlation) and both are smoothed over ~1 um, so the pairs of pixels show the same tissue.
2. Per RGB channel, optical density ``log10(glass / I)`` (glass: each scan's own, estimated as
   scoring does, :func:`pathology.scoring.estimate_stains`) is binned on A's value and B's median read in each bin: a constant ratio means the
   scanners differ by one OD scale (a different tone curve: ``I_B = glass (I_A / glass)^k`` scales
   every OD by k), a ratio that moves with the OD means a non-linear response.
3. Both scans go through :func:`pathology.scoring.score_image` with the marker and their own mpp,
   and their cell counts, positive %, intensity bins and H-score are printed side by side.

    python scripts/compare_scans.py ../shared/data/openslide-os2-ki67-crops/OS-2-ndpi.ome.tif \\
        ../shared/data/openslide-os2-ki67-crops/OS-2-vsi.ome.tif --marker ki67

Scans are read whole at level 0, so give crops of the same field (a few thousand pixels a side),
not whole slides. The OD ratio compares the files as stored; it does not say which scanner is
right (linear in transmitted light, as Beer-Lambert and the intensity cuts assume).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

#: Largest side (pixels) of a scan read whole.
MAX_SIDE_PX = 12_000
#: OD bins (on scan A) of the per-channel comparison.
OD_EDGES = (0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.2, 1.6)
#: Bins whose ratio makes the single OD scale (away from glass, where noise and JPEG dominate).
SCALE_RANGE = (0.3, 1.2)
#: Fewest pixel pairs for a bin to be reported.
MIN_PAIRS = 200


@dataclass(frozen=True)
class Registration:
    """Where scan B's field lies in scan A resampled to B's grid."""

    shift_px: tuple[float, float]  # (y, x), B pixels, applied to resampled A
    correlation: float  # of the smoothed grey images over the overlap


@dataclass(frozen=True)
class OdBin:
    channel: int  # 0 R, 1 G, 2 B
    lo: float
    hi: float
    pairs: int
    od_a: float  # medians
    od_b: float

    @property
    def ratio(self) -> float:
        return self.od_b / self.od_a if self.od_a > 0 else float("nan")


@dataclass(frozen=True)
class ScanReadout:
    name: str
    mpp: float
    tumor_cells: int
    immune_cells: int
    positive_pct: float | None
    bin_pct: tuple[float, float, float, float]  # tumour cells in intensity bins 0, 1+, 2+, 3+
    h_score: float | None


@dataclass(frozen=True)
class Comparison:
    registration: Registration
    bins: list[OdBin]
    od_scale: float  # B's OD / A's OD over SCALE_RANGE, all channels
    readouts: tuple[ScanReadout, ScanReadout]


def register(
    a: NDArray[np.uint8], mpp_a: float, b: NDArray[np.uint8], mpp_b: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], Registration]:
    """Scan A resampled to B's grid and moved onto B: (A on B's grid, B, as float, smoothed over
    ~1 um and cropped to the overlap; the registration)."""
    from scipy.ndimage import gaussian_filter
    from scipy.ndimage import shift as nd_shift
    from skimage.registration import phase_cross_correlation
    from skimage.transform import resize

    f = mpp_a / mpp_b
    size = (round(a.shape[0] * f), round(a.shape[1] * f))
    a2 = resize(a.astype(np.float64), (*size, 3), anti_aliasing=f < 1, preserve_range=True)
    h, w = min(size[0], b.shape[0]), min(size[1], b.shape[1])
    a2, b2 = a2[:h, :w], b[:h, :w].astype(np.float64)
    shift, _, _ = phase_cross_correlation(b2.mean(2), a2.mean(2), upsample_factor=10)
    a2 = np.stack([nd_shift(a2[..., c], shift, order=1, mode="nearest") for c in range(3)], 2)
    # Crop what the shift brought in from outside, smooth over ~1 um (two scanners' optics and
    # JPEG differ most at the finest scale).
    m = int(np.ceil(np.abs(shift).max())) + 4
    sig = max(0.5, 0.5 / mpp_b)
    a2 = gaussian_filter(a2, (sig, sig, 0))[m : h - m, m : w - m]
    b2 = gaussian_filter(b2, (sig, sig, 0))[m : h - m, m : w - m]
    corr = float(np.corrcoef(a2.mean(2).ravel(), b2.mean(2).ravel())[0, 1])
    return a2, b2, Registration((float(shift[0]), float(shift[1])), corr)


def od_bins(
    a: NDArray[np.float64],
    glass_a: tuple[float, float, float],
    b: NDArray[np.float64],
    glass_b: tuple[float, float, float],
) -> tuple[list[OdBin], float]:
    """Per-channel OD of B against A, each against its own glass (as scoring estimates it),
    binned on A (:data:`OD_EDGES`), and one OD scale: the median of B / A over the pixels whose A
    OD lies in :data:`SCALE_RANGE`, all channels."""
    from pathology.stain import rgb_to_od

    oa, ob = rgb_to_od(a, glass_a).reshape(-1, 3), rgb_to_od(b, glass_b).reshape(-1, 3)
    out = []
    for c in range(3):
        for lo, hi in itertools.pairwise(OD_EDGES):
            sel = (oa[:, c] >= lo) & (oa[:, c] < hi)
            if int(sel.sum()) >= MIN_PAIRS:
                out.append(
                    OdBin(
                        c,
                        lo,
                        hi,
                        int(sel.sum()),
                        float(np.median(oa[sel, c])),
                        float(np.median(ob[sel, c])),
                    )
                )
    sel = (oa >= SCALE_RANGE[0]) & (oa < SCALE_RANGE[1])
    scale = float(np.median(ob[sel] / oa[sel])) if sel.any() else float("nan")
    return out, scale


def readout(name: str, img: NDArray[np.uint8], mpp: float, marker: str, device: str) -> ScanReadout:
    """The marker's slide values of one scan, as ``pathology score`` sums them."""
    from pathology.calls import call_slide
    from pathology.scoring import load_marker, score_image

    cfg = load_marker(marker)
    res = score_image(img, cfg, mpp=mpp, device=device)
    totals = res.total()
    call = call_slide(totals, cfg)
    bins = np.array([totals[f"tumor_bin{i}"] for i in range(4)], np.float64)
    pct = 100.0 * bins / bins.sum() if bins.sum() else np.zeros(4)
    return ScanReadout(
        name=name,
        mpp=mpp,
        tumor_cells=totals["tumor_cells"],
        immune_cells=totals["immune_cells"],
        positive_pct=call.positive_pct,
        bin_pct=(float(pct[0]), float(pct[1]), float(pct[2]), float(pct[3])),
        h_score=call.h_score,
    )


def compare(
    a: NDArray[np.uint8],
    mpp_a: float,
    b: NDArray[np.uint8],
    mpp_b: float,
    *,
    marker: str = "ki67",
    names: tuple[str, str] = ("A", "B"),
    device: str = "cpu",
) -> Comparison:
    """Register B onto A, compare their OD per channel, and score both with ``marker``."""
    from pathology.scoring import estimate_stains

    a2, b2, reg = register(a, mpp_a, b, mpp_b)
    bins, scale = od_bins(a2, estimate_stains(a).background, b2, estimate_stains(b).background)
    return Comparison(
        registration=reg,
        bins=bins,
        od_scale=scale,
        readouts=(
            readout(names[0], a, mpp_a, marker, device),
            readout(names[1], b, mpp_b, marker, device),
        ),
    )


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scan_a", type=Path)
    p.add_argument("scan_b", type=Path)
    p.add_argument("--marker", default="ki67", help="marker name or YAML file (default ki67)")
    p.add_argument(
        "--mpp-a", type=float, help="microns per pixel of scan A (default: from the file)"
    )
    p.add_argument(
        "--mpp-b", type=float, help="microns per pixel of scan B (default: from the file)"
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from pathology.errors import PathologyError
    from pathology.slide import open_slide

    scans = []
    for path, mpp in ((args.scan_a, args.mpp_a), (args.scan_b, args.mpp_b)):
        try:
            with open_slide(path, mpp=mpp) as slide:
                w, h = slide.level_dimensions[0]
                if max(w, h) > MAX_SIDE_PX:
                    print(
                        f"{path}: {w} x {h} px is too large to read whole; crop the same field "
                        f"of both scans (at most {MAX_SIDE_PX} px a side)",
                        file=sys.stderr,
                    )
                    return 2
                scans.append((slide.read_region((0, 0), 0, (w, h)), slide.mpp))
        except PathologyError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    (a, mpp_a), (b, mpp_b) = scans
    cmp = compare(
        a,
        mpp_a,
        b,
        mpp_b,
        marker=args.marker,
        names=(args.scan_a.name, args.scan_b.name),
        device=args.device,
    )
    reg = cmp.registration
    print(
        f"B onto A: shift {reg.shift_px[0]:+.1f}, {reg.shift_px[1]:+.1f} px (B's grid), "
        f"correlation {reg.correlation:.3f}"
        + ("" if reg.correlation >= 0.8 else "  (low: are these the same field?)")
    )
    print("OD per channel, binned on A: A median -> B median (ratio), pixel pairs")
    for c, ch in enumerate("RGB"):
        cells = [
            f"{b_.lo:.2f}-{b_.hi:.2f}: {b_.od_a:.3f} -> {b_.od_b:.3f} ({b_.ratio:.2f}), {b_.pairs}"
            for b_ in cmp.bins
            if b_.channel == c
        ]
        print(f"  {ch}: " + "; ".join(cells))
    print(
        f"one OD scale (A OD {SCALE_RANGE[0]}-{SCALE_RANGE[1]}, all channels): B = {cmp.od_scale:.2f} x A"
    )
    print(
        f"{'scan':<24} {'mpp':>6} {'tumour':>7} {'immune':>7} {'pos %':>6}  {'bins 0/1+/2+/3+ %':<24} H-score"
    )
    for r in cmp.readouts:
        bins = " / ".join(f"{v:.1f}" for v in r.bin_pct)
        print(
            f"{r.name:<24} {r.mpp:>6.3f} {r.tumor_cells:>7} {r.immune_cells:>7} "
            f"{_fmt(r.positive_pct):>6}  {bins:<24} {_fmt(r.h_score)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
