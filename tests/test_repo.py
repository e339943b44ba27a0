"""Repository contracts: the README quick start is what CI runs, and the CLI starts light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pathology.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README needs a '## Quick start' section with a code block"
    return [
        ln.strip()
        for ln in block.group(1).splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    install_demo, install_test = commands
    assert "pathology demo" in install_demo and "-c constraints.txt" in install_demo
    ci = (ROOT / ".ci" / "run").read_text()
    # Every step of the README test command appears verbatim in CI, venv creation aside.
    for step in install_test.split(" && ")[1:]:
        assert step in ci, f"CI does not run the README step {step!r}"
    assert "python -m pytest" in install_test


def test_layout() -> None:
    for folder in ("pathology", "models", "configs", "scripts", "notebooks", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "pathology" / "py.typed").exists()
    assert "torch==" in (ROOT / "constraints.txt").read_text()


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from pathology.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'dask', 'zarr', 'skimage', 'scipy', 'pandas', 'tifffile', 'openslide', 'torchvision') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "tissue", "synth", "demo"):
        assert command in out
