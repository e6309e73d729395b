"""Reliability: bad runs, interruptions and misuse end in one line, a non-zero exit, nothing half-written and nothing
the user had lost (issue 14). Each test replays one case so that it stays fixed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from medseg_jax import runs
from medseg_jax.cli import main
from tests.conftest import REPO, built_once

TINY = ["--config.data.val_cases=1", "--config.model.features=(4,8)", "--config.train.patch_size=(16,16,8)",
        "--config.data.target_spacing=(2,2,3)", "--config.train.log_every=1", "--config.train.warmup_steps=0",
        "--config.train.val_every=100"]


def train(dataset, workdir, *extra, resume=False):
    args = ["train", "--workdir", str(workdir)]
    if not resume:
        args += ["--config", str(REPO / "experiments" / "demo_ct.py"), f"--config.data.dataset={dataset}", *TINY]
    return main(args + ["--resume"] * resume + list(extra))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def latest_params(workdir):
    latest, _ = runs.RunDir(workdir).checkpoint_managers()
    step = latest.latest_step()
    return step, runs.restore_raw(latest, step)["params"]


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def test_a_diverging_run_stops_naming_the_step_and_saves_no_bad_weights(tiny_dataset, tmp_path, capsys):
    code = train(tiny_dataset, tmp_path / "run", "--config.train.steps=8", "--config.train.checkpoint_every=1",
                 "--config.train.learning_rate=1e6")
    assert code == 2
    line = error_line(capsys)
    assert "training diverged at step" in line and "learning_rate" in line
    step, params = latest_params(tmp_path / "run")
    assert f"the last good checkpoint is step {step}" in line
    assert all_finite(params)
    assert not (tmp_path / "run" / "train_summary.json").exists()


@pytest.mark.slow  # several trainings (about a minute or more on 2 cores)
def test_resuming_a_good_run_into_divergence_keeps_its_latest_weights(tiny_dataset, tmp_path, capsys):
    """The issue's case: `--resume` of a good run with a learning rate that diverges. The good `latest` stays, bit for
    bit, and the run continues from it once the learning rate is sane again."""
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--config.train.steps=3", "--config.train.checkpoint_every=3") == 0
    step, before = latest_params(run)
    assert step == 3
    capsys.readouterr()
    code = train(tiny_dataset, run, "--config.train.steps=12", "--config.train.checkpoint_every=100",
                 "--config.train.learning_rate=1e6", resume=True)
    assert code == 2
    line = error_line(capsys)
    assert "training diverged at step" in line and "the last good checkpoint is step 3" in line
    step_after, after = latest_params(run)
    assert step_after == 3
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert train(tiny_dataset, run, "--config.train.steps=5", "--config.train.learning_rate=0.01", resume=True) == 0
    assert latest_params(run)[0] == 5


@pytest.mark.slow  # several trainings (about a minute or more on 2 cores)
def test_skip_policy_skips_non_finite_steps_and_stops_when_they_persist(tiny_dataset, tmp_path, capsys):
    code = train(tiny_dataset, tmp_path / "run", "--config.train.steps=12", "--config.train.checkpoint_every=100",
                 "--config.train.learning_rate=1e6", "--config.train.nonfinite=skip",
                 "--config.train.max_nonfinite_steps=2")
    assert code == 2
    line = error_line(capsys)
    assert "3 non-finite steps in a row (more than train.max_nonfinite_steps=2)" in line
    assert "no checkpoint was saved" in line


def test_a_non_finite_step_changes_nothing():
    """The step itself: a batch that makes the loss NaN leaves params and optimizer state exactly as they were."""
    from medseg_jax.config import load_config
    from medseg_jax.parallel import mesh as mesh_lib
    from medseg_jax.train.experiment import build_experiment

    config = load_config(REPO / "experiments" / "demo_ct.py", ["--config.model.features=(4,8)",
                                                               "--config.train.patch_size=(16,16,8)"])
    layout = mesh_lib.make_mesh_layout(config.mesh, devices=jax.devices()[:1], spatial_dims=3)
    experiment = build_experiment(config, num_classes=3, in_channels=1, layout=layout)
    state = experiment.init_state(jax.random.key(0))
    before = jax.tree.map(np.asarray, state.to_dict())
    shape = experiment.batch_shapes
    batch = {"image": np.full(shape["image"], np.nan, np.float32), "label": np.zeros(shape["label"], np.int32)}
    state, metrics = experiment.train_step(state, batch, jax.random.key(1))
    assert not bool(metrics["finite"]) and int(state.step) == 1
    after = state.to_dict()
    for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_a_second_writer_is_refused_naming_the_holder(tiny_dataset, tmp_path, capsys):
    """One writer per store and per run directory: while one process holds the folder, another gets one line naming
    it (host and pid) and writes nothing."""
    import os
    import socket

    from medseg_jax import fileio

    store, run = tmp_path / "store", tmp_path / "run"
    with fileio.exclusive(store, "being prepared"):
        assert main(["prepare", "--source", str(tiny_dataset), "--out", str(store)]) == 2
        line = error_line(capsys)
        assert "being prepared by another process" in line and f"pid {os.getpid()}" in line
        assert socket.gethostname() in line and not store.exists()
    with fileio.exclusive(run, "being trained"):
        assert train(tiny_dataset, run, "--config.train.steps=1") == 2
        assert "being trained by another process" in error_line(capsys) and not run.exists()
    assert not list(tmp_path.glob(".*.lock"))  # released


def test_a_lock_left_by_a_killed_process_is_taken_over(tiny_dataset, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".store.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "process_started": 1.0,
                                "doing": "being prepared", "since": "earlier"}))
    assert main(["prepare", "--source", str(tiny_dataset), "--out", str(tmp_path / "store")]) == 0
    assert (tmp_path / "store" / "manifest.json").is_file() and not lock.exists()


def test_values_that_cannot_work_are_refused_before_anything_is_written(tiny_dataset, tmp_path, capsys):
    cases = {"--config.train.steps=0": "train.steps", "--config.train.steps=-3": "train.steps",
             "--config.train.batch_size=0": "train.batch_size", "--config.train.val_every=0": "train.val_every",
             "--config.train.checkpoint_every=0": "train.checkpoint_every",
             "--config.train.log_every=0": "train.log_every", "--config.infer.overlap=1.5": "infer.overlap",
             "--config.model.features=": "model.features", "--config.train.learning_rate=nan": "train.learning_rate",
             "--config.data.target_spacing=(1,0,1)": "data.target_spacing",
             "--config.data.oversample_foreground=2": "data.oversample_foreground"}
    for override, key in cases.items():
        run = tmp_path / key
        assert train(tiny_dataset, run, override) == 2, override
        assert f"config key '{key}'" in error_line(capsys), override
        assert not run.exists(), override


def test_a_target_spacing_that_asks_for_terabytes_is_refused_before_writing(tiny_dataset, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["prepare", "--source", str(tiny_dataset), "--out", str(store),
                 "--config.data.target_spacing=(0.001,0.001,0.001)"]) == 2
    line = error_line(capsys)
    assert "config key 'data.target_spacing'" in line and "GiB of memory available" in line and not store.exists()


def test_a_header_larger_than_its_file_is_refused_before_reading(tmp_path):
    import nibabel as nib
    import pytest

    from medseg_jax.errors import MedsegError
    from medseg_jax.io import nifti

    header = nib.Nifti1Header()
    header.set_data_shape((1100, 1100, 1100))
    header.set_data_dtype(np.float32)
    for name in ("huge.nii", "huge.nii.gz"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4), header), path)  # a small, valid file...
        raw = nib.load(path).header.copy()
        raw.set_data_shape((1100, 1100, 1100))  # ...whose header then claims 1100^3 voxels
        data = raw.binaryblock + b"\0" * (int(raw.get_data_offset()) - len(raw.binaryblock)) + b"\0" * 100
        if name.endswith(".gz"):
            import gzip

            data = gzip.compress(data)
        path.write_bytes(data)
        with pytest.raises(MedsegError, match=r"1100x1100x1100 voxels \(5\.0 GiB of data\) but the file is"):
            nifti.read_image(path)
    header.set_data_shape((0, 10, 10))
    empty = tmp_path / "empty.nii"
    nib.save(nib.Nifti1Image(np.zeros((1, 10, 10), np.float32), np.eye(4)), empty)
    raw = nib.load(empty).header.copy()
    raw.set_data_shape((0, 10, 10))
    empty.write_bytes(raw.binaryblock + b"\0" * (int(raw.get_data_offset()) - len(raw.binaryblock)))
    with pytest.raises(MedsegError, match="zero-size axis"):
        nifti.read_image(empty)


@pytest.mark.slow  # several trainings (about a minute or more on 2 cores)
def test_a_run_killed_before_its_first_checkpoint_starts_again_with_resume(tiny_dataset, tmp_path, capsys):
    """A kill before the first checkpoint (config.json, logs, no checkpoint) and one during the first checkpoint write
    (orbax's temporary folder only): a fresh start says what to run; `--resume` starts the run again from step 0 and
    clears the interrupted save; the result equals an uninterrupted run."""
    import shutil

    reference = tmp_path / "reference"
    assert train(tiny_dataset, reference, "--config.train.steps=2", "--config.train.checkpoint_every=2") == 0
    for name in ("killed_early", "killed_saving"):
        run = tmp_path / name
        assert train(tiny_dataset, run, "--config.train.steps=2", "--config.train.checkpoint_every=2") == 0
        latest = run / "checkpoints" / "latest"
        shutil.rmtree(run / "checkpoints")
        if name == "killed_saving":
            (latest / "2.orbax-checkpoint-tmp-1754").mkdir(parents=True)  # what a kill mid-save leaves
        (run / "train_summary.json").unlink()
        capsys.readouterr()
        assert not runs.RunDir(run).has_checkpoint()
        assert train(tiny_dataset, run, "--config.train.steps=2", "--config.train.checkpoint_every=2") == 2
        assert "pass --resume to start it again from step 0" in error_line(capsys)
        assert train(tiny_dataset, run, resume=True) == 0
        assert not list(latest.glob("*tmp*"))
        _, params = latest_params(run)
        _, expected = latest_params(reference)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- medseg predict ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_run(tiny_dataset, tmp_path_factory):
    def build(root):
        assert train(tiny_dataset, root / "run", "--config.train.steps=1", "--config.train.checkpoint_every=1") == 0

    return built_once(tmp_path_factory, "predict_run", build) / "run"


def _scans(tiny_dataset, folder, count=2):
    import shutil

    folder.mkdir(parents=True)
    for source in sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[:count]:
        shutil.copy(source, folder / source.name)
    return folder


def predict_cli(run, scans, out, *extra):
    return main(["predict", "--run", str(run), "--input", str(scans), "--output", str(out), *extra])


def test_predict_never_writes_into_its_inputs(predict_run, tiny_dataset, tmp_path, capsys):
    scans = _scans(tiny_dataset, tmp_path / "scans")
    before = {p.name: p.read_bytes() for p in scans.iterdir()}
    for out in (scans, tmp_path):  # the input folder itself, and a folder holding it
        assert predict_cli(predict_run, scans, out, "--overwrite") == 2
        assert "holds the input" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before


def test_predict_refuses_file_and_read_only_outputs_before_computing(predict_run, tiny_dataset, tmp_path, capsys):
    import os

    scans = _scans(tiny_dataset, tmp_path / "scans", count=1)
    (tmp_path / "a_file").write_text("mine")
    assert predict_cli(predict_run, scans, tmp_path / "a_file") == 2
    assert "is a file, not a folder" in error_line(capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write into read-only folders")
        assert predict_cli(predict_run, scans, locked / "out") == 2
        assert "cannot write into" in error_line(capsys)
    finally:
        locked.chmod(0o755)


def test_dangling_links_and_wrong_channel_counts_are_bad_inputs(predict_run, tiny_dataset, tmp_path, capsys):
    import nibabel as nib

    scans = _scans(tiny_dataset, tmp_path / "scans", count=1)
    (scans / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (scans / "loop.nii.gz").symlink_to(scans / "loop.nii.gz")
    two = nib.load(sorted(scans.glob("tiny_*.nii.gz"))[0])
    data = np.asarray(two.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), two.affine), scans / "two_channels.nii.gz")
    out = tmp_path / "out"
    assert predict_cli(predict_run, scans, out) == 2
    assert "and 2 more bad inputs" in error_line(capsys) and not out.exists()
    assert predict_cli(predict_run, scans, out, "--skip-bad") == 0
    streams = capsys.readouterr()
    assert "wrote 1 predictions" in streams.out
    for name, problem in (("gone", "does not resolve"), ("loop", "does not resolve"),
                          ("two_channels", "2 channels, the model was trained on 1")):
        assert any(line.startswith(f"skipped {name}:") and problem in line for line in streams.err.splitlines())


def test_an_interrupted_predict_resumes_and_honours_the_umask(predict_run, tiny_dataset, tmp_path, capsys):
    import os

    scans = _scans(tiny_dataset, tmp_path / "scans")
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert predict_cli(predict_run, scans, out) == 0
    finally:
        os.umask(old)
    outputs = sorted(out.glob("*.nii.gz"))
    assert len(outputs) == 2 and all(p.stat().st_mode & 0o777 == 0o640 for p in outputs)
    reference = {p.name: p.read_bytes() for p in outputs}
    # what a kill leaves: one output never renamed into place, and its empty temporary
    outputs[1].unlink()
    (out / f".{outputs[1].name}.k1ll3d.nii.gz").write_bytes(b"")
    capsys.readouterr()
    assert predict_cli(predict_run, scans, out) == 0  # no --overwrite needed: the finished one is skipped
    printed = capsys.readouterr().out
    assert "wrote 1 predictions" in printed and "(1 already there from this run)" in printed
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == reference
    assert not list(out.glob(".*.nii.gz"))
    # a file of the user's under an output's name is not "already predicted": refused without --overwrite
    outputs[0].write_bytes(b"the user's own file")
    assert predict_cli(predict_run, scans, out) == 2
    assert "already exists" in error_line(capsys)
    assert outputs[0].read_bytes() == b"the user's own file"


def test_a_two_channel_image_in_a_one_channel_dataset_is_a_bad_case(tmp_path, capsys):
    import nibabel as nib

    from tests.conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "ds", num_train=4, num_test=0)
    bad = dataset / "imagesTr" / "tiny_001.nii.gz"
    image = nib.load(bad)
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), bad)
    store = tmp_path / "store"
    assert main(["prepare", "--source", str(dataset), "--out", str(store)]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "2 channels, dataset.json declares 1" in line and not store.exists()
    assert main(["prepare", "--source", str(dataset), "--out", str(store), "--skip-bad"]) == 0
    assert "tiny_001" in (store / "validation_report.tsv").read_text()
    assert "tiny_001" not in (store / "manifest.json").read_text()
