"""The house rules a tool can check: imports point down (import-linter's layers contract in pyproject.toml), and a
plain (non-editable) install carries its experiment configs, so `medseg demo` works from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)


def test_an_upward_import_breaks_the_house(tmp_path):
    """The contract holds on a copy of the package and breaks once a model imports the training loop."""
    copy = tmp_path / "medseg_jax"
    shutil.copytree(REPO / "medseg_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, not the installed package, is analysed
    check = [BIN / "lint-imports", "--no-logo", "--no-cache", "--config", REPO / "pyproject.toml"]
    kept = _run(check, cwd=tmp_path, env=env)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with open(copy / "models" / "layers.py", "a") as f:
        f.write("\nfrom medseg_jax.train import loop  # noqa: E402,F401  (a model reaching up into training)\n")
    broken = _run(check, cwd=tmp_path, env=env)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "medseg_jax.models.layers -> medseg_jax.train.loop" in broken.stdout


def test_a_new_room_must_be_placed_in_the_house(tmp_path):
    copy = tmp_path / "medseg_jax"
    shutil.copytree(REPO / "medseg_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "scratch.py").write_text('"""A module no layer names."""\n')
    result = _run([BIN / "lint-imports", "--no-logo", "--no-cache", "--config", REPO / "pyproject.toml"],
                  cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0 and "medseg_jax.scratch" in result.stdout + result.stderr


def test_a_plain_install_carries_the_experiments(tmp_path):
    """Builds the wheel from a copy of the sources, installs it without editable links into a folder of its own, and
    runs `medseg demo --help` and the experiment lookup from a folder that has no experiments/."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "medseg_jax", source / "medseg_jax", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  tmp_path / "wheels", source])
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "wheels").glob("medseg_jax-*.whl"))
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel])
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    lookup = _run([sys.executable, "-c", "import medseg_jax.demo as d; "
                   "print(d.__file__); print(*(d.demo_config_path(m) for m in ('ct', 'mri', 'us')), sep='\\n')"],
                  cwd=elsewhere, env=env)
    assert lookup.returncode == 0, lookup.stderr[-3000:]
    paths = [Path(line) for line in lookup.stdout.split()]
    assert all(site in p.parents for p in paths), paths  # the installed copy, not the repository
    assert [p.name for p in paths[1:]] == ["demo_ct.py", "demo_mri.py", "demo_us.py"]
    helped = _run([sys.executable, "-m", "medseg_jax.cli", "demo", "--help"], cwd=elsewhere, env=env)
    assert helped.returncode == 0 and "--modality" in helped.stdout
