import json

import jax
import numpy as np
import pytest

from medseg_jax import runs
from medseg_jax.errors import MedsegError
from medseg_jax.train.loop import train
from tests.conftest import tiny_config


def _train_losses(run_dir):
    return [r["loss"] for r in runs.RunDir(run_dir).read_metrics() if r["kind"] == "train"]


def _final_params(run_dir):
    latest, _ = runs.RunDir(run_dir).checkpoint_managers()
    return runs.restore_raw(latest, latest.latest_step())


def test_loss_falls_on_a_tiny_problem(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, steps=40)
    config.train.log_every = 5
    summary = train(config, tmp_path / "run")
    losses = _train_losses(tmp_path / "run")
    assert summary["steps"] == 40
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    run = runs.RunDir(tmp_path / "run")
    assert run.curve_path.is_file() and run.config_path.is_file() and run.plans_path.is_file()
    assert any(run.tensorboard_dir.iterdir())
    assert json.loads(run.config_path.read_text())["train"]["steps"] == 40


def test_resume_continues_bit_for_bit(tiny_dataset, tmp_path):
    """N steps, stop, resume, N more == 2N straight: same params and optimizer state, bit for bit on CPU (the grain
    loader in a worker process, its iterator state restored from the checkpoint)."""
    config = tiny_config(tiny_dataset, steps=6)
    config.data.workers = 1
    train(config, tmp_path / "straight")
    train(config, tmp_path / "interrupted", stop_at_step=3)
    assert runs.RunDir(tmp_path / "interrupted").has_checkpoint()
    resumed_summary = train(runs.RunDir(tmp_path / "interrupted").load_config(), tmp_path / "interrupted",
                            resume=True)
    assert resumed_summary["steps"] == 6
    straight, resumed = _final_params(tmp_path / "straight"), _final_params(tmp_path / "interrupted")
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _train_losses(tmp_path / "straight") == _train_losses(tmp_path / "interrupted")


def test_refuses_a_used_workdir_without_resume(tiny_dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(MedsegError, match="not empty"):
        train(tiny_config(tiny_dataset, steps=2), tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint_is_an_error(tiny_dataset, tmp_path):
    with pytest.raises(MedsegError, match="no checkpoint"):
        train(tiny_config(tiny_dataset, steps=2), tmp_path / "run", resume=True)


def test_patch_size_must_divide_by_downsampling(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, steps=2)
    config.train.patch_size = (16, 16, 7)
    with pytest.raises(MedsegError, match="train.patch_size"):
        train(config, tmp_path / "run")


def test_trains_from_a_prepared_store_and_exports_validation_in_source_geometry(tiny_dataset, tmp_path):
    from medseg_jax.data.prepare import prepare
    from medseg_jax.io import nifti

    config = tiny_config("", steps=2)
    prepare(tiny_dataset, tmp_path / "store", config.data)
    config.data.store = str(tmp_path / "store")
    summary = train(config, tmp_path / "run")
    assert summary["store"] == str(tmp_path / "store") and not (tmp_path / "run" / "store").exists()
    val_case = sorted(p.name for p in (tiny_dataset / "labelsTr").iterdir())[-1]
    prediction, geometry = nifti.read_label(tmp_path / "run" / "validation" / val_case)
    _, source_geometry = nifti.read_label(tiny_dataset / "labelsTr" / val_case)
    assert geometry.shape == source_geometry.shape and np.allclose(geometry.affine, source_geometry.affine)
    assert set(summary["final_val_dice_original_grid"]["per_class"]) == {"1", "2"}

    config.data.target_spacing = (1.0, 1.0, 1.0)
    with pytest.raises(MedsegError, match="data.target_spacing"):
        train(config, tmp_path / "run2")
