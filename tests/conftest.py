"""Shared fixtures: a tiny labelled dataset in Decathlon layout and a tiny experiment config (seconds on 2 cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
# Many tests (and the commands they start) compile the same tiny programs: XLA's persistent compilation cache, shared
# by the test workers and their subprocesses, compiles each once per machine (a cached executable is the one XLA would
# build, so results do not change). Set before jax is imported; MEDSEG_TEST_XLA_CACHE=0 turns it off.
if os.environ.get("MEDSEG_TEST_XLA_CACHE", "1") != "0":
    import hashlib
    import tempfile

    _tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:8]
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"medseg-tests-xla-{_tag}"))
# The suite's programs are tiny: XLA:CPU spends far longer compiling them (LLVM's optimisation passes) than running
# them, so tests compile without LLVM optimisation (the same HLO, scheduled and fused as usual; machine code made
# without LLVM's -O passes): 769 s instead of 1068 s for the suite on 2 cores. Every comparison a test makes is between
# programs compiled the same way. MEDSEG_TEST_XLA_OPT=default compiles as users do.
TEST_XLA_FLAGS = "" if os.environ.get("MEDSEG_TEST_XLA_OPT") == "default" else "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process the tests start: the suite's compile setting, and `devices` fake CPU devices."""
    flags = [TEST_XLA_FLAGS] if TEST_XLA_FLAGS else []
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rotation(axis, degrees) -> np.ndarray:
    """The 3x3 rotation by `degrees` about `axis` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_lps_affine(spacing=(2.0, 2.0, 3.0), degrees=12.0, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """An LPS-ordered grid rotated by `degrees` about an oblique axis."""
    affine = np.eye(4)
    affine[:3, :3] = rotation([1.0, 2.0, 3.0], degrees) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def make_tiny_case(seed: int, shape=(24, 20, 14)):
    """A noisy volume with a large bright ellipsoid (label 1) and a small dim sphere beside it (label 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    center = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    big = (((grid - center) / np.array([6.0, 5.0, 3.5])) ** 2).sum(-1) < 1
    small_center = center + np.array([7.0, 0.0, 0.0]) * rng.choice([-1, 1])
    small = (((grid - small_center) / 3.0) ** 2).sum(-1) < 1
    label = np.zeros(shape, np.uint8)
    label[big] = 1
    label[small & ~big] = 2
    image = 100.0 * big + 60.0 * (small & ~big) + rng.normal(0, 15.0, shape)
    return image.astype(np.float32), label


def write_tiny_dataset(root: Path, num_train: int = 6, num_test: int = 2, oblique_test: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(exist_ok=True)
    training, test = [], []
    for i in range(num_train + num_test):
        image, label = make_tiny_case(i)
        is_test = i >= num_train
        affine = oblique_lps_affine() if (is_test and oblique_test) else np.diag([2.0, 2.0, 3.0, 1.0])
        name = f"tiny_{i:03d}.nii.gz"
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        nib.save(nib.Nifti1Image(image, affine), root / img_dir / name)
        nib.save(nib.Nifti1Image(label, affine), root / lab_dir / name)
        if is_test:
            test.append(f"./imagesTs/{name}")
        else:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "big", "2": "small"},
        "numTraining": num_train, "training": training, "test": test, "file_ending": ".nii.gz"}))
    return root


def tiny_config(dataset: Path | str = "", steps: int = 6):
    from medseg_jax.config import load_config

    return load_config(REPO / "experiments" / "demo_ct.py", [
        f"--config.data.dataset={dataset}", f"--config.train.steps={steps}", f"--config.train.val_every={steps}",
        *TINY_OVERRIDES])


TINY_OVERRIDES = ["--config.data.val_cases=1", "--config.model.features=(4,8)", "--config.train.patch_size=(16,16,8)",
                  "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1",
                  "--config.train.learning_rate=0.02", "--config.data.target_spacing=(2,2,3)",
                  # 2 patches per step, one random (the demo's former schedule): data-parallel meshes need 2
                  "--config.train.batch_size=2", "--config.data.oversample_foreground=0.5"]


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once per test session: module fixtures run once per xdist worker,
    so an expensive one (training runs, a sweep) would run on both cores at once; the first worker builds it, the
    others wait for it and share it (tests only read it)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above the workers' own
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def run_worker(script: str, *args: str, devices: int = 8, timeout: int = 900):
    """Runs tests/workers/SCRIPT in a fresh Python with `devices` fake CPU devices (XLA_FLAGS must be set before jax
    starts) and returns the JSON it printed after "RESULT "."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    # one folder for every worker: runs built once for the session (built_once) name the same dataset
    return built_once(tmp_path_factory, "tiny", lambda folder: write_tiny_dataset(folder / "dataset")) / "dataset"


@pytest.fixture(scope="session")
def two_runs(tiny_dataset, tmp_path_factory):
    """Two tiny runs on the tiny dataset (4 and 3 steps, seeds 0 and 1): an ensemble for inference tests."""
    from medseg_jax.train.loop import train

    def build(root):
        train(tiny_config(tiny_dataset, steps=4), root / "a")
        config = tiny_config(tiny_dataset, steps=3)
        config.seed = 1
        train(config, root / "b")

    root = built_once(tmp_path_factory, "two_runs", build)
    return root / "a", root / "b"
