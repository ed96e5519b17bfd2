"""The wheel holds every package of the repository (pyproject.toml lists them by hand).

An editable install finds a package that the list forgot, so only a built wheel shows it: a
user who installs fleetfl from a wheel would get an ImportError.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_INSTALLED = {"tests", "benchmarks"}  # run from a checkout, never imported by fleetfl
SKIP = (".git", ".venv", ".venv-latest", "build", "runs", "__pycache__", ".pytest_cache",
        ".ruff_cache", ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools builds in ./build, whose leftovers from an earlier
    # build would hide a package missing from the list.
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP, "*.pyc", "*.egg-info"))
    # No build isolation: the venv's setuptools (from the lock), no download.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, timeout=300,
                   capture_output=True)
    (path,) = out.glob("fleetfl-*.whl")
    return zipfile.ZipFile(path)


def _source_packages() -> dict[str, Path]:
    """Importable name -> directory, for every directory with an ``__init__.py``."""
    dirs = {p.parent for p in ROOT.glob("**/__init__.py")
            if not set(SKIP) & set(p.relative_to(ROOT).parts)}
    packages = {}
    for d in dirs:
        parts = d.relative_to(ROOT).parts
        if parts[0] in NOT_INSTALLED:
            continue
        top = "fleetfl" if parts[0] == "fleetfl" else f"fleetfl.{parts[0]}"
        packages[".".join([top, *parts[1:]])] = d
    return packages


def test_every_package_and_module_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    packages = _source_packages()
    assert {"fleetfl.coordinator", "fleetfl.aggregation", "fleetfl.tasks"} <= set(packages)
    missing = [f"{pkg.replace('.', '/')}/{py.name}" for pkg, d in packages.items()
               for py in d.glob("*.py") if f"{pkg.replace('.', '/')}/{py.name}" not in names]
    assert not missing, f"not in the wheel (add them to pyproject.toml's packages): {missing}"


def test_the_wheel_carries_the_package_data(wheel: zipfile.ZipFile) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in config.get("package-data", {}).items():
        source = ROOT / config["package-dir"][package]
        for pattern in patterns:
            for f in source.glob(pattern):
                assert f"{package.replace('.', '/')}/{f.name}" in wheel.namelist()


def test_the_wheel_declares_the_console_script(wheel: zipfile.ZipFile) -> None:
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "fleetfl = fleetfl.coordinator.cli:main" in wheel.read(entry).decode()
