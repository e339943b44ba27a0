"""Command-line entry point ``pathology``.

Each subcommand lives in its own ``_<name>.py`` module exposing ``register(subparsers)``; the module
adds its parser and sets ``func`` to a ``run(args) -> int`` over library functions. Heavy libraries
(torch, dask, zarr, skimage) are imported inside ``run`` so ``pathology --help`` stays fast.
Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pathology import __version__
from pathology.errors import PathologyError

# Order = order in ``--help``.
_SUBCOMMANDS = (
    "info",
    "tissue",
    "tile",
    "score",
    "bench",
    "estimate",
    "synth",
    "demo",
    "stratify",
)

log = logging.getLogger("pathology")


def add_slide_mpp(parser: argparse.ArgumentParser, *, mpp_alias: bool = False) -> None:
    """The ``--slide-mpp`` option every command that opens slides shares (``--mpp`` too where free)."""
    names = ["--slide-mpp", "--mpp"] if mpp_alias else ["--slide-mpp"]
    parser.add_argument(
        *names,
        dest="slide_mpp",
        type=float,
        default=None,
        help="the scan's microns per pixel, overriding (or supplying) what the file records",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathology",
        description="Score IHC whole-slide images (p16, PD-L1 CPS/TPS, Ki-67) and tie them to response.",
    )
    parser.add_argument("--version", action="version", version=f"pathology {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output; -v also prints tracebacks on errors",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMANDS:
        importlib.import_module(f"pathology.cli._{name}").register(sub)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pathology")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 partial failure, 2 usage/input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except PathologyError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"pathology {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathology {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
