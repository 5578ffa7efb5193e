"""The layer rules (import-linter contracts in pyproject.toml) hold, and they catch a broken rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "training", "export", "service")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e '.[dev]')")
    only = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *only], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_contracts_say_what_the_design_says() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    assert contracts["layers"]["layers"] == ["service", "export", "training", "core"]
    assert set(contracts["service-torch-free"]["forbidden_modules"]) >= {"training", "torch"}
    serving = contracts["serving-path-torch-free"]
    assert {"core", "export.runtime", "export.store", "export.cache_cli"} <= set(serving["source_modules"])
    assert "torch" in serving["forbidden_modules"]


def test_the_code_keeps_every_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("path", "line", "contract"),
    [
        ("export/cache_cli.py", "import torch", "serving-path-torch-free"),
        ("core/preprocess.py", "import torch", "serving-path-torch-free"),
        ("service/routes.py", "import training.student", "service-torch-free"),
        ("training/data.py", "import export.runtime", "layers"),
        ("core/bundle.py", "import training.examples", "layers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, path: str, line: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path, contract).returncode == 0  # the copy keeps it until the line goes in
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    result = lint_imports(tmp_path, contract)
    assert result.returncode == 1 and "1 broken" in result.stdout, result.stdout[-4000:]


def test_the_cache_cli_runs_without_torch() -> None:
    """The contract is static; this is the same rule at run time, for the CLI the torch-free test did not cover."""
    script = "import sys, export.cache_cli; print(sorted(m for m in ('torch', 'training') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []
