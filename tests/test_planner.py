"""The planner: nnU-Net's topology rules, and patch/batch chosen against memory measured by compiling the step."""

import json
import math

import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.experiments.base import get_config as base_config
from medseg_jax.train import planner
from tests.test_cli import assert_clean_error, medseg

PLANS = {"target_spacing": [0.8, 0.8, 2.5], "median_shape_after_resampling": [200, 200, 60],
         "labels": {"0": "background", "1": "organ", "2": "tumour"}, "normalization": [{"scheme": "ct"}]}


def test_isotropic_topology_halves_every_axis_down_to_four_voxels():
    topo = planner.topology([1.0, 1.0, 1.0], [128, 128, 128])
    assert topo.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert topo.kernel_sizes == [[3, 3, 3]] * 6
    assert topo.patch_size == [128, 128, 128]


def test_anisotropic_topology_pools_the_coarse_axis_later_and_rounds_the_patch_up():
    topo = planner.topology([0.8, 0.8, 2.5], [190, 200, 50])
    assert topo.strides[1] == [2, 2, 1] and topo.kernel_sizes[0] == [3, 3, 1]
    assert topo.kernel_sizes[2] == [3, 3, 3]  # in-plane spacing caught up after two poolings
    assert all(p % d == 0 and p >= q for p, d, q in zip(topo.patch_size, topo.divisor, [190, 200, 50]))


def fake_memory(fixed_gb=0.5, gb_per_megavoxel=2.0):
    """Memory = fixed + batch x voxels x rate: linear like a real step, so the planner's arithmetic can be checked."""
    calls = []

    def measure(config, num_classes, in_channels):
        voxels = math.prod(config.train.patch_size)
        calls.append((tuple(config.train.patch_size), config.train.batch_size))
        return int((fixed_gb + config.train.batch_size * voxels / 1e6 * gb_per_megavoxel) * planner.GB)

    return measure, calls


def test_plan_shrinks_the_patch_to_the_budget_and_fills_the_batch():
    measure, calls = fake_memory()
    config, report = planner.plan_experiment(base_config("plain_unet"), PLANS, num_cases=200, budget_gb=4.0,
                                             measure=measure)
    patch, batch = config.train.patch_size, config.train.batch_size
    used = 0.5 + batch * math.prod(patch) / 1e6 * 2.0
    assert used <= 4.0 and batch >= 2
    assert 0.5 + (batch + 1) * math.prod(patch) / 1e6 * 2.0 > 4.0  # one more sample would not fit
    assert report["measured_gb"] == pytest.approx(used, rel=1e-3)
    assert len(config.model.strides) == len(config.model.features) == len(report["kernel_sizes"])
    divisor = [math.prod(s[a] for s in config.model.strides) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(patch, divisor))
    assert calls[0][0] == (224, 224, 64)  # nnU-Net's initial patch, rounded up to the topology


def test_pictures_and_2d_experiments_are_planned_in_2d():
    measure, calls = fake_memory(gb_per_megavoxel=0.5)
    pictures = dict(PLANS, target_spacing=[0.5, 0.5, 1.0], median_shape_after_resampling=[600, 480, 1])
    config, report = planner.plan_experiment(base_config("plain_unet"), pictures, num_cases=200, budget_gb=4.0,
                                             measure=measure)
    assert len(config.train.patch_size) == 2 and all(len(s) == 2 for s in config.model.strides)
    assert report["kernel_sizes"][0] == [3, 3]  # not (1, 1, 3): a picture has no depth to convolve along
    first = calls[0][0]  # the picture's median size caps nnU-Net's 2048^2 start, rounded up to the topology
    assert len(first) == 2 and 600 <= first[0] < 700 and 480 <= first[1] < 580
    slices = base_config("plain_unet")
    slices.train.patch_size = (64, 64)  # nnU-Net's 2d configuration of volumes
    config, _ = planner.plan_experiment(slices, PLANS, num_cases=200, budget_gb=4.0, measure=measure)
    assert len(config.train.patch_size) == 2


def test_batch_covers_at_most_five_percent_of_the_dataset():
    measure, _ = fake_memory(gb_per_megavoxel=0.001)
    config, _ = planner.plan_experiment(base_config("plain_unet"), PLANS, num_cases=10, budget_gb=40.0,
                                        measure=measure)
    assert config.train.batch_size == max(2, int(0.05 * 10 * 200 * 200 * 60 / math.prod(config.train.patch_size)))


def test_plan_that_cannot_fit_names_the_budget():
    measure, _ = fake_memory(fixed_gb=3.0)
    with pytest.raises(MedsegError, match="cannot fit the memory budget of 2 GB"):
        planner.plan_experiment(base_config("plain_unet"), PLANS, num_cases=10, budget_gb=2.0, measure=measure)


def test_resenc_presets_set_the_budget():
    config = base_config("resenc_unet")
    config.model.preset = "L"
    measure, _ = fake_memory()
    _, report = planner.plan_experiment(config, PLANS, num_cases=10, measure=measure)
    assert report["budget_gb"] == 24.0


@pytest.mark.slow  # minutes on a 2-core CPU: make test-all
def test_compiled_memory_grows_with_batch_and_patch():
    config = base_config("plain_unet")
    config.model.features = (4, 8)
    config.model.strides = ((1, 1, 1), (2, 2, 2))
    config.model.kernel_sizes = ((3, 3, 3), (3, 3, 3))
    sizes = {}
    for patch, batch in (((16, 16, 16), 1), ((16, 16, 16), 2), ((32, 16, 16), 1)):
        config.train.patch_size, config.train.batch_size = patch, batch
        sizes[(patch, batch)] = planner.compiled_step_bytes(config, num_classes=3, in_channels=1)
    assert sizes[((16, 16, 16), 2)] > sizes[((16, 16, 16), 1)] > 0
    assert sizes[((32, 16, 16), 1)] > sizes[((16, 16, 16), 1)]


def test_cli_plan_writes_the_config_training_starts_from(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    args = ["plan", "--config", "experiments/demo_ct.py", "--workdir", run, f"--config.data.dataset={tiny_dataset}",
            "--config.data.target_spacing=(2,2,3)", "--config.model.features=(4,8)", "--budget-gb", "0.05"]
    result = medseg(*args)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    report = json.loads((run / "model_plan.json").read_text())
    assert config["train"]["patch_size"] == report["patch_size"]
    assert config["model"]["strides"] == report["strides"] and report["measured_gb"] <= 0.05
    assert "patch size" in result.stdout
    assert_clean_error(medseg(*args), "config.json", "already exists")
    too_small = medseg(*args[:4], tmp_path / "other", *args[5:-1], "0.0001")
    assert_clean_error(too_small, "cannot fit the memory budget")
    assert not (tmp_path / "other" / "config.json").exists()


@pytest.mark.slow
def test_training_starts_from_a_planned_run(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    planned = medseg("plan", "--config", "experiments/demo_ct.py", "--workdir", run, "--budget-gb", "0.05",
                     f"--config.data.dataset={tiny_dataset}", "--config.data.target_spacing=(2,2,3)",
                     "--config.model.features=(4,8)")
    assert planned.returncode == 0, planned.stderr
    report = json.loads((run / "model_plan.json").read_text())
    trained = medseg("train", "--workdir", run, "--config.train.steps=2", "--config.train.val_every=2",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.data.val_cases=1")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "config.json").read_text())["train"]["patch_size"] == report["patch_size"]
