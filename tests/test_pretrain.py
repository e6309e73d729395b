"""Few labels: unlabelled stores, masked-image-modelling pretraining and fine-tuning from its encoder."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY_OVERRIDES, built_once, tiny_config, write_tiny_dataset

from medseg_jax import cli, runs
from medseg_jax.augment.masking import block_mask, check_block, mask_batch, num_masked_blocks
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.losses.reconstruction import masked_mse
from medseg_jax.models.registry import is_encoder_param
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.experiment import build_experiment, transferred_params

PRETRAIN = ["--config.pretrain.mask_block=(4,4,4)", "--config.augment.preset=none", "--config.train.schedule=constant"]


def test_block_mask_masks_exactly_the_planned_blocks():
    patch, block = (16, 16, 8), (4, 4, 4)
    masks = [np.asarray(block_mask(jax.random.key(seed), patch, block, 0.6)) for seed in range(3)]
    expected = num_masked_blocks(patch, block, 0.6)
    assert expected == round(0.6 * 32)
    for mask in masks:
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert mask.sum() == expected * 64
        blocks = mask.reshape(4, 4, 4, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(32, 64)
        assert np.all(blocks.min(1) == blocks.max(1))  # whole blocks, never parts of one
    assert not np.array_equal(masks[0], masks[1])
    assert np.array_equal(masks[0], np.asarray(block_mask(jax.random.key(0), patch, block, 0.6)))
    assert check_block((16, 16), (8, 8, 8)) == (8, 8)  # a 2D patch takes the first two sizes
    with pytest.raises(MedsegError, match="pretrain.mask_block.*axis 2"):
        check_block((16, 16, 8), (4, 4, 3))


def test_masked_loss_ignores_visible_voxels():
    image = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 2))
    masked_input, mask = mask_batch(jax.random.key(2), image, (4, 4, 4), 0.5)
    assert np.all(np.asarray(masked_input)[np.asarray(mask[..., 0]) == 1] == 0)
    visible = np.asarray(mask[..., 0]) == 0
    assert np.array_equal(np.asarray(masked_input)[visible], np.asarray(image)[visible])

    prediction = jax.random.normal(jax.random.key(3), image.shape)
    loss = masked_mse(prediction, (image, mask))
    # anything at the visible voxels changes nothing, and their gradient is zero
    scrambled = jnp.where(mask == 0, 1e3 * jax.random.normal(jax.random.key(4), image.shape), prediction)
    assert float(masked_mse(scrambled, (image, mask))) == pytest.approx(float(loss), rel=1e-6)
    grad = np.asarray(jax.grad(masked_mse)(prediction, (image, mask)))
    assert np.all(grad[visible] == 0) and np.all(grad[~visible] != 0)
    # the value: the mean squared error over the masked voxels and channels
    m = np.broadcast_to(np.asarray(mask), image.shape) == 1
    reference = np.mean((np.asarray(prediction) - np.asarray(image))[m] ** 2)
    assert float(loss) == pytest.approx(reference, rel=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A labelled tiny store, an unlabelled store of other images planned like it, and a 30-step pretraining run."""
    return built_once(tmp_path_factory, "pretrain", _build_pretrained)


def _build_pretrained(root):
    labelled = write_tiny_dataset(root / "labelled", num_train=4, num_test=0)
    images = root / "images"
    images.mkdir()
    extra = write_tiny_dataset(root / "extra", num_train=5, num_test=0)
    for path in sorted((extra / "imagesTr").iterdir()):
        shutil.copy(path, images / path.name.replace("tiny", "scan"))
    store_args = ["--config", str(REPO / "experiments" / "demo_ct.py"), "--config.data.target_spacing=(2,2,3)"]
    assert cli.main(["prepare", "--source", str(labelled), "--out", str(root / "store"), *store_args]) == 0
    assert cli.main(["prepare", "--source", str(images), "--out", str(root / "unlabelled"), "--unlabelled",
                     "--plan-from", str(root / "store"), *store_args]) == 0
    run = root / "pre"
    assert cli.main(["pretrain", "--config", str(REPO / "experiments" / "demo_ct.py"), "--workdir", str(run),
                     "--store", str(root / "unlabelled"), *TINY_OVERRIDES, *PRETRAIN,
                     "--config.train.steps=30", "--config.train.checkpoint_every=30"]) == 0


def test_unlabelled_store_follows_the_labelled_plan_and_train_refuses_it(pretrained, capsys):
    labelled, unlabelled = Store(pretrained / "store"), Store(pretrained / "unlabelled")
    assert labelled.labelled and not unlabelled.labelled
    assert unlabelled.case_ids == [f"scan_{i:03d}" for i in range(5)]
    assert {k: v for k, v in unlabelled.plan.items() if k != "labelled"} == labelled.plan
    image, label = unlabelled.read_case("scan_000")
    assert image.std() > 0 and not label.any()
    code = cli.main(["train", "--config", str(REPO / "experiments" / "demo_ct.py"), "--workdir",
                     str(pretrained / "refused"), "--store", str(pretrained / "unlabelled"), *TINY_OVERRIDES])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without labels" in err[0] and "medseg pretrain" in err[0]
    assert not (pretrained / "refused" / "config.json").exists()


def test_pretraining_loss_falls(pretrained):
    run = runs.RunDir(pretrained / "pre")
    losses = [r["loss"] for r in run.read_metrics() if r["kind"] == "train"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    summary = json.loads(run.summary_path.read_text())
    assert summary["task"] == "pretrain" and summary["best_val_dice"] is None
    assert run.load_config().task == "pretrain"


def test_init_from_a_pretrained_run_copies_exactly_the_encoder(pretrained):
    config = tiny_config(steps=2)
    with config.unlocked():
        config.data.store = str(pretrained / "store")
        config.data.dataset = ""
        config.train.init_from = str(pretrained / "pre")
    layout = mesh_lib.make_mesh_layout(config.get("mesh"), spatial_dims=3)
    experiment = build_experiment(config, 3, 1, layout)
    fresh = experiment.init_state(jax.random.key(0)).params
    merged, report = runs.init_params_from(config.train.init_from, fresh, only=transferred_params(config))
    assert "encoder only" in report
    source = runs.load_params(pretrained / "pre")
    copied = 0
    for key in fresh:
        for (path, new), (_, old) in zip(jax.tree_util.tree_leaves_with_path(merged[key]),
                                         jax.tree_util.tree_leaves_with_path(fresh[key])):
            if is_encoder_param("plain_unet", key):
                want = source[key]
                for p in path:
                    want = want[p.key]
                assert np.array_equal(np.asarray(new), want)
                copied += 1
            else:  # decoder and head: as initialised, though the decoder has the same names and shapes there
                assert np.array_equal(np.asarray(new), np.asarray(old)), (key, path)
    assert copied > 0 and any(k.startswith("decoder") for k in fresh)
    with config.unlocked():
        config.train.init_parts = "all"
    assert transferred_params(config) is None


def _fine_tune_from_pretrained(pretrained, name: str, steps: int, option: str) -> dict[str, list[bool]]:
    """Fine-tunes the pretraining run for `steps` steps with `option`; per top-level param, whether each array still
    equals the pretrained one."""
    run = pretrained / name
    code = cli.main(["train", "--config", str(REPO / "experiments" / "demo_ct.py"), "--workdir", str(run),
                     "--store", str(pretrained / "store"), "--init-from", str(pretrained / "pre"), *TINY_OVERRIDES,
                     f"--config.train.steps={steps}", f"--config.train.val_every={steps}", option,
                     "--config.augment.preset=none"])
    assert code == 0
    source, tuned = runs.load_params(pretrained / "pre"), runs.load_params(run, checkpoint="latest")
    return {key: [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned[key]), jax.tree.leaves(source[key]))]
            for key in tuned}


def test_fine_tuning_with_a_frozen_encoder_keeps_it_and_trains_the_rest(pretrained):
    unchanged = _fine_tune_from_pretrained(pretrained, "fine", 3, "--config.train.freeze_encoder=true")
    for key, same in unchanged.items():
        if is_encoder_param("plain_unet", key):
            assert all(same), key
        elif key.startswith("decoder"):
            assert not any(same), key


def test_encoder_warmup_holds_the_encoder_then_ramps_it_in():
    import ml_collections
    import optax

    from medseg_jax.train.step import encoder_schedule

    train = ml_collections.ConfigDict({"encoder_lr_scale": 0.5, "encoder_warmup_steps": 4})
    lr = encoder_schedule(train, optax.constant_schedule(0.01))
    values = [float(lr(step)) for step in range(10)]
    assert values[:5] == [0.0] * 5  # held while the new parts warm up
    np.testing.assert_allclose(values[5:], [0.00125, 0.0025, 0.00375, 0.005, 0.005], rtol=1e-6)  # ramped in, scaled


def test_fine_tuning_with_an_encoder_warmup_keeps_the_encoder_during_it(pretrained):
    unchanged = _fine_tune_from_pretrained(pretrained, "warmup", 2, "--config.train.encoder_warmup_steps=2")
    for key, same in unchanged.items():
        if is_encoder_param("plain_unet", key):
            assert all(same), key


def test_a_killed_pretraining_run_resumes_bit_for_bit(pretrained, tmp_path, capsys):
    """The masks are drawn from the step's key, so 3 steps, a stop and 3 more == 6 straight; and `medseg train
    --resume` names the command that resumes a pretraining run."""
    from medseg_jax import config as config_lib
    from medseg_jax.train.loop import train

    config = config_lib.apply_overrides(tiny_config(steps=6), [*PRETRAIN, "--config.task=pretrain",
                                                             f"--config.data.store={pretrained / 'unlabelled'}",
                                                             "--config.data.dataset="])
    train(config, tmp_path / "straight")
    train(config, tmp_path / "killed", stop_at_step=3)
    assert train(runs.RunDir(tmp_path / "killed").load_config(), tmp_path / "killed", resume=True)["steps"] == 6
    straight = jax.tree.leaves(runs.load_params(tmp_path / "straight", checkpoint="latest"))
    resumed = jax.tree.leaves(runs.load_params(tmp_path / "killed", checkpoint="latest"))
    assert len(straight) == len(resumed) > 0
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["train", "--workdir", str(tmp_path / "killed"), "--resume"]) == 2
    assert "medseg pretrain --resume" in capsys.readouterr().err
