"""`medseg demo` end to end at a tiny size, with the modality's own packaged experiment."""

from __future__ import annotations

import json

import pytest

from medseg_jax.cli import main

TINY = ["--config.data.val_cases=1", "--config.model.features=(4,8)", "--config.train.patch_size=(16,16,8)",
        "--config.train.steps=2", "--config.train.val_every=2", "--config.train.log_every=1",
        "--config.train.checkpoint_every=1", "--config.train.warmup_steps=1"]


@pytest.mark.slow  # minutes on a 2-core CPU: make test-all
def test_mri_demo_runs_with_its_own_experiment(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--modality", "mri", "--cases", "3", "--test-cases", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "[1/4] wrote 3 training and 1 test MRI phantoms" in printed and "foreground" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modality"] == "mri" and summary["steps"] == 2 and summary["num_test_cases"] == 1
    run_config = json.loads((out / "run" / "config.json").read_text())
    assert run_config["data"]["target_spacing"] == [4.0, 4.0, 4.0]  # demo_mri.py, not the CT demo's 5 mm
    assert run_config["augment"]["p_bias_field"] > 0
    for name in ("overlay.png", "evaluation/per_case.csv", "run/training_curve.png"):
        assert (out / name).is_file(), name


@pytest.mark.slow  # about 10 s (each frame is cut from a 3D phantom; a training, predictions): make test-all
def test_us2d_demo_trains_a_2d_network_on_png_frames(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--modality", "us2d", "--cases", "4", "--test-cases", "2",
                 "--config.data.val_cases=1", "--config.model.features=(4,8)", "--config.train.patch_size=(32,32)",
                 "--config.train.steps=3", "--config.train.val_every=3", "--config.train.batch_size=2"]) == 0
    dataset = json.loads((out / "data" / "dataset.json").read_text())
    assert dataset["file_ending"] == ".png" and dataset["spacing_2d"] == [2.5, 2.5]
    assert json.loads((out / "run" / "plans.json").read_text())["spacing_2d"] == [2.5, 2.5]
    assert sorted(p.name for p in (out / "predictions").glob("*.png")) == ["us2d_004.png", "us2d_005.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modality"] == "us2d" and summary["num_test_cases"] == 2
    assert (out / "overlay.png").is_file()
