"""Experiments are deltas of one base: every file has exactly the base's keys, states only what differs, and builds."""

from __future__ import annotations

import pytest

from medseg_jax.config import load_config, to_plain
from medseg_jax.demo import demo_config_path
from medseg_jax.errors import MedsegError
from medseg_jax.experiments import base
from tests.conftest import REPO

# every experiment file: the package's own modules (its __init__, the base, the schema, the sweep helpers) are not
# experiments
PACKAGE_MODULES = ("__init__", "base", "schema", "trials")
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if p.stem not in PACKAGE_MODULES)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("model",):  # model sections differ per architecture
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _load(name: str) -> dict:
    return _flat(to_plain(load_config(REPO / "experiments" / f"{name}.py")))


def test_the_shipped_experiments():
    assert {"demo_ct", "demo_mri", "demo_us", "msd_liver"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_has_exactly_the_base_keys(name):
    assert set(_load(name)) == set(_flat(to_plain(base.get_config())))


def test_the_modality_demos_differ_from_the_ct_demo_in_spacing_augmentation_and_schedule_only():
    ct = _load("demo_ct")
    schedule = {"train.batch_size", "data.oversample_foreground", "train.steps", "train.val_every"}
    for name, changed in {"demo_mri": {"data.target_spacing", "augment.p_bias_field", "augment.p_rician", *schedule},
                          "demo_us": {"data.target_spacing", "augment.p_speckle", "augment.p_attenuation",
                                      *schedule}}.items():
        other = _load(name)
        assert {k for k in ct if ct[k] != other[k]} == changed, name


def test_medseg_demo_takes_each_modalitys_own_experiment():
    for modality in ("ct", "mri", "us"):
        assert demo_config_path(modality).name == f"demo_{modality}.py"
    with pytest.raises(MedsegError, match="demo_pet.py"):
        demo_config_path("pet")


def test_the_real_task_template_builds_at_nnunet_settings():
    from medseg_jax.models.registry import build_network
    from medseg_jax.train.experiment import check_patch_size

    config = load_config(REPO / "experiments" / "msd_liver.py")
    assert config.train.steps == 1000 * 250 and config.train.optimizer == "sgd" and config.augment.preset == "nnunet"
    network = build_network(config, num_classes=3, in_channels=1)
    assert network.total_downsampling() == (32, 32, 32)
    check_patch_size(config.train.patch_size, network)
