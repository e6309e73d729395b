"""The sharded train step and sliding-window inference on 8 fake CPU devices equal the single-device ones.

Each test runs tests/workers/sharded.py in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before JAX starts); the worker compares each mesh with one device of the same process.
"""

from __future__ import annotations

import pytest
from conftest import run_worker

TOLERANCE = 1e-5


def check_step(result: dict) -> None:
    where = f"{result['model']} on {result['mesh']}"
    assert result["loss_rel"] <= TOLERANCE, where
    assert result["grads_rel"] <= TOLERANCE, where  # all gradients together
    assert result["grads_leaf_rel"] <= TOLERANCE, where  # and each (non-vanishing) array on its own
    # the volume really was split: halo exchanges (collective-permute) and norm/loss sums (all-reduce) appear
    assert result["collectives"]["collective-permute"] > 0, where
    assert result["collectives"]["all-reduce"] > 0, where


@pytest.mark.slow  # minutes on a 2-core CPU: make test-all
def test_sharded_step_equals_the_single_device_step():
    """data=2 x space=4 (with on-device augmentation, and a whole train step) and data=1 x space=8."""
    first, second = run_worker("sharded.py", "steps")
    assert first["mesh"] == {"data": 2, "space": 4} and second["mesh"] == {"data": 1, "space": 8}
    for result in (first, second):
        check_step(result)
    assert first["step_loss_rel"] <= TOLERANCE and first["grad_norm_rel"] <= TOLERANCE
    assert first["params_rel"] <= TOLERANCE  # the params after one SGD step


@pytest.mark.slow
def test_more_meshes_and_models_equal_the_single_device_step():
    """Two split axes, params and optimizer state split (FSDP), SegResNet on another axis with coarse levels whole."""
    results = run_worker("sharded.py", "steps-more")
    for result in results:
        check_step(result)
    fsdp = next(r for r in results if r["mesh"].get("params") == "sharded")
    assert fsdp["split_params"] > 0 and fsdp["collectives"]["all-gather"] > 0


def test_sharded_sliding_window_equals_unsharded():
    for result in run_worker("sharded.py", "window"):
        assert result["shape"] == [45, 30, 21, 3]
        assert result["rel"] <= TOLERANCE, result
        assert result["labels_equal"], result
        assert result["halo_exchanges"] > 0, result


def test_patch_that_does_not_divide_at_a_level_is_refused_naming_it():
    over8, over4, fits = run_worker("sharded.py", "errors")
    # 24 / 8 = 3 voxels per device at full resolution: the stride-2 conv of level 1 would straddle devices
    assert over8.startswith("config key 'train.patch_size': (24, 16, 16) is 24 voxels along axis 0 at U-Net level 0")
    assert "3 per device" in over8 and "mesh.space=8" in over8 and "divisible by 16" in over8
    assert "U-Net level 1" in over4 and "12 voxels" in over4 and "--config.mesh.space_levels=1" in over4
    assert fits == ""
