"""The house's rules, as tests: the import contract in pyproject.toml (``[tool.importlinter]``) holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_the_import_contract_holds():
    """No layer imports one above it, no stage a later stage, the scoring package nothing else of the project."""
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout


def test_the_contract_names_every_package():
    """A package added to coughreg/ must find its place in the layers."""
    import tomllib

    contracts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"coughreg.{p.name}" for p in (PROJECT / "coughreg").iterdir() if (p / "__init__.py").is_file()}
    assert packages == named
    assert not [p.name for p in (PROJECT / "coughreg").glob("*.py") if p.name != "__init__.py"], "modules belong in a package"
