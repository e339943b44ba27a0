"""How the scorer's slide readout holds up as staining gets stronger, on synthetic regions with truth.

For each staining strength (the DAB optical density of positive cells, ``SynthParams.intensity``)
and look variety (``SynthParams.variety``: 0 is the reference look every accuracy test uses; 1 adds
pale and dark nuclei, cytoplasm counterstain, elongated tumour nuclei and a neutral share of dense
DAB that partly unmixes as haematoxylin, as on scanned slides), it renders one region per seed,
scores it as ``score_image`` does and prints, per seed or summarised over the seeds: tumour and
immune cells found / true, the marker's readout found / true (p16 % or Ki-67 index of tumour
cells; PD-L1 TPS and CPS), the slide call found / true, and the slide's QC flags (whether the
``stained_immune`` flag warns of a low reading where the call is wrong).

    python scripts/stain_strength_sweep.py --preset p16_positive --intensity 0.78,1.0,1.2

Seeds default to 31-36, which the cell-type fit (seeds 100-107 and 900-902) never saw.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from pathology.calls import SlideCall, call_slide
from pathology.errors import ConfigError
from pathology.scoring import load_marker, score_image
from pathology.synth import SlideValues, SynthParams, render_region


@dataclass(frozen=True)
class Case:
    """One scored region: truth and found counts, readout (%) and slide call."""

    seed: int
    tumor_true: int
    tumor_found: int
    immune_true: int
    immune_found: int
    readout_true: float
    readout_found: float
    call_true: str
    call_found: str
    qc_flags: tuple[str, ...] = ()

    @property
    def call_wrong(self) -> bool:
        return self.call_found != self.call_true


def _readout(marker: str, values: SlideValues, call: SlideCall) -> tuple[float, float]:
    """(truth, found) of the marker's headline percentage: CPS for PD-L1, else % of tumour
    cells positive."""
    if marker == "pdl1":
        return float(values.cps or 0.0), float(call.cps or 0.0)
    truth = values.p16_positive_pct if marker == "p16" else values.ki67_pct
    return float(truth or 0.0), float(call.positive_pct or 0.0)


def score_case(
    preset: str, *, seed: int, intensity: float, variety: float, size_px: int, mpp: float
) -> Case:
    """Render ``preset`` at ``intensity`` OD and ``variety``, score it on the CPU, compare."""
    params = SynthParams.preset(
        preset,
        width=size_px,
        height=size_px,
        mpp=mpp,
        seed=seed,
        variety=variety,
        intensity=intensity,
    )
    region = render_region(params)
    v = region.truth.values
    found = score_image(region.rgb, params.marker, mpp=mpp, device="cpu").total()
    call = call_slide(found, load_marker(params.marker))
    truth_pct, found_pct = _readout(params.marker, v, call)
    return Case(
        seed=seed,
        tumor_true=v.tumor_cells,
        tumor_found=found["tumor_cells"],
        immune_true=v.immune_cells,
        immune_found=found["immune_cells"],
        readout_true=truth_pct,
        readout_found=found_pct,
        # As call_slide: below the tumour-cell minimum the call is not_evaluable; markers
        # without a categorical call (Ki-67: a percentage) have none on either side.
        call_true=(v.call or "") if v.evaluable else "not_evaluable",
        call_found=call.call,
        qc_flags=call.qc_flags,
    )


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seeds like 31-36 or 31,35, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset", default="p16_positive", help="synthetic preset (SynthParams.preset)"
    )
    ap.add_argument("--intensity", type=_floats, default=[0.78, 1.0, 1.2], help="DAB OD list")
    ap.add_argument("--variety", type=_floats, default=[0.0, 1.0], help="look variety list (0-1)")
    ap.add_argument("--seeds", type=_seeds, default=list(range(31, 37)), help="e.g. 31-36")
    ap.add_argument("--size", type=int, default=1024, help="region edge in px")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--per-seed", action="store_true", help="one line per seed")
    args = ap.parse_args(argv)
    try:
        for intensity in args.intensity:
            for variety in args.variety:
                cases = [
                    score_case(
                        args.preset,
                        seed=s,
                        intensity=intensity,
                        variety=variety,
                        size_px=args.size,
                        mpp=args.mpp,
                    )
                    for s in args.seeds
                ]
                head = f"{args.preset} DAB {intensity:g} OD, variety {variety:g}"
                if args.per_seed:
                    for c in cases:
                        print(
                            f"{head}, seed {c.seed}: tumour {c.tumor_found}/{c.tumor_true}, "
                            f"immune {c.immune_found}/{c.immune_true}, readout "
                            f"{c.readout_found:.1f}/{c.readout_true:.1f} %, call "
                            f"{c.call_found or '-'}/{c.call_true or '-'}, QC flags "
                            f"{';'.join(c.qc_flags) or '-'}"
                        )
                    continue
                tum = np.array([c.tumor_found / max(1, c.tumor_true) for c in cases])
                imm = np.array([c.immune_found / max(1, c.immune_true) for c in cases])
                diff = np.array([c.readout_found - c.readout_true for c in cases])
                worst = cases[int(np.argmax(np.abs(diff)))]
                wrong = sum(c.call_wrong for c in cases)
                flagged = sum("stained_immune" in c.qc_flags for c in cases)
                wrong_flagged = sum(c.call_wrong and "stained_immune" in c.qc_flags for c in cases)
                print(
                    f"{head}: tumour found/true {tum.min():.2f}-{tum.max():.2f}, immune "
                    f"{imm.min():.2f}-{imm.max():.2f}, readout {diff.min():+.1f} to "
                    f"{diff.max():+.1f} points (worst seed {worst.seed}: {worst.readout_found:.1f}"
                    f" / {worst.readout_true:.1f} %), calls wrong {wrong} of {len(cases)}, "
                    f"flagged stained_immune {flagged} (of the wrong calls {wrong_flagged})",
                    flush=True,
                )
    except ConfigError as e:
        print(f"stain_strength_sweep: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
