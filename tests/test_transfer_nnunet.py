"""nnU-Net v2 networks and checkpoints -> flax, checked against dynamic_network_architectures itself."""

import json

import jax
import numpy as np
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.models.registry import AxisPermuted
from medseg_jax.transfer import load_nnunet, nnunet
from tests.conftest import write_tiny_dataset
from tests.test_cli import assert_clean_error, medseg

torch = pytest.importorskip("torch", reason="torch is a test extra (make test installs it): nnU-Net equivalence "
                                            "needs it")
dna = pytest.importorskip("dynamic_network_architectures.architectures.unet",
                          reason="dynamic_network_architectures is a test extra (make test installs it)")

TOLERANCE = 1e-4  # relative L2 of the logits


def rel_l2(ours, theirs) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def arch_kwargs(spatial_dims=3, residual=False):
    if spatial_dims == 3:
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]
    else:
        kernels, strides = [[3, 3]] * 4, [[1, 1], [2, 2], [2, 2], [2, 1]]
    kwargs = {
        "n_stages": 4, "features_per_stage": [4, 8, 16, 24], "conv_op": f"torch.nn.modules.conv.Conv{spatial_dims}d",
        "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage_decoder": [1, 2, 1], "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{spatial_dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1, 2, 2, 1] if residual else [2, 1, 2, 2]
    return kwargs


def torch_network(kwargs, residual, in_channels=2, num_classes=3, seed=0):
    torch.manual_seed(seed)
    built = dict(kwargs)
    built["conv_op"] = getattr(torch.nn, kwargs["conv_op"].rsplit(".", 1)[-1])
    built["norm_op"] = getattr(torch.nn, kwargs["norm_op"].rsplit(".", 1)[-1])
    built["nonlin"] = torch.nn.LeakyReLU
    cls = dna.ResidualEncoderUNet if residual else dna.PlainConvUNet
    net = cls(input_channels=in_channels, num_classes=num_classes, deep_supervision=True, **built).eval()
    with torch.no_grad():  # random norms and biases too, so that a transposed scale or bias would show
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.3)
    return net


def plans_and_dataset(kwargs, residual, configuration="3d_fullres", class_name=None):
    name = class_name or ("ResidualEncoderUNet" if residual else "PlainConvUNet")
    plans = {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 80.0, "std": 30.0, "percentile_00_5": -20.0, "percentile_99_5": 150.0}},
        "configurations": {configuration: {
            "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [8, 16, 16], "median_image_size_in_voxels": [14, 20, 24], "spacing": [3.0, 2.0, 2.0],
            "normalization_schemes": ["CTNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, True],
            "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
                             "arch_kwargs": kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
    }
    dataset = {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "big": 1, "small": 2},
               "numTraining": 6, "file_ending": ".nii.gz"}
    return plans, dataset


def write_result_folder(root, residual=False, class_name=None):
    kwargs = arch_kwargs(3, residual)
    net = torch_network(kwargs, residual)
    plans, dataset = plans_and_dataset(kwargs, residual, class_name=class_name)
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    checkpoint = {  # what nnU-Net v2's trainer saves, numpy scalars in its logs included
        "network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)], "ema_fg_dice": [np.float64(0.55)]},
        "_best_ema": np.float64(0.6), "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder, net


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "resenc"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_logits_and_parameter_count_equal_dynamic_network_architectures(residual, spatial_dims):
    kwargs = arch_kwargs(spatial_dims, residual)
    net = torch_network(kwargs, residual)
    plans, dataset = plans_and_dataset(kwargs, residual)
    config = nnunet.architecture(plans, "3d_fullres", dataset, "test")
    module = nnunet.build_module(config, num_classes=3)
    params = nnunet.convert({k: v.numpy() for k, v in net.state_dict().items()}, module, in_channels=2)
    shape = (2, 2, 8, 16, 12) if spatial_dims == 3 else (2, 2, 16, 12)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = [o.numpy() for o in net(x)]
    ours = module.apply({"params": params}, np.moveaxis(x.numpy(), 1, -1), train=True)
    assert len(ours) == len(expected) == 3
    for o, e in zip(ours, expected):
        assert rel_l2(np.asarray(o), np.moveaxis(e, 1, -1)) < TOLERANCE
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in net.parameters())


def test_transpose_upsampling_converts_to_the_same_logits():
    kwargs = arch_kwargs(3, residual=False)
    net = torch_network(kwargs, residual=False)
    plans, dataset = plans_and_dataset(kwargs, False)
    config = dict(nnunet.architecture(plans, "3d_fullres", dataset, "test"), upsample="transpose")
    module = nnunet.build_module(config, num_classes=3)
    params = nnunet.convert({k: v.numpy() for k, v in net.state_dict().items()}, module, in_channels=2)
    x = torch.randn(1, 2, 8, 16, 12)
    with torch.no_grad():
        expected = net(x)[0].numpy()
    assert rel_l2(np.asarray(module.apply({"params": params}, np.moveaxis(x.numpy(), 1, -1))),
                  np.moveaxis(expected, 1, -1)) < TOLERANCE


def test_load_nnunet_reads_a_result_folder_with_weights_only(tmp_path):
    folder, net = write_result_folder(tmp_path, residual=True)
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        expected = np.moveaxis(net(x)[0].numpy(), 1, -1)
    for path in (folder, folder / "fold_0", folder / "fold_0" / "checkpoint_final.pth"):
        module, variables = load_nnunet(path)
        assert rel_l2(np.asarray(module.apply(variables, np.moveaxis(x.numpy(), 1, -1))), expected) < TOLERANCE


def test_bad_checkpoints_end_in_one_line_naming_the_mismatch(tmp_path):
    kwargs = arch_kwargs(3, residual=False)
    net = torch_network(kwargs, residual=False)
    plans, dataset = plans_and_dataset(kwargs, False)
    module = nnunet.build_module(nnunet.architecture(plans, "3d_fullres", dataset, "t"), num_classes=3)
    weights = {k: v.numpy() for k, v in net.state_dict().items()}
    key = "encoder.stages.1.0.convs.0.conv.weight"

    wrong = dict(weights, **{key: np.zeros((5, 4, 3, 3, 3), np.float32)})
    with pytest.raises(MedsegError, match=f"'{key}' has shape"):
        nnunet.convert(wrong, module, in_channels=2)
    with pytest.raises(MedsegError, match=f"missing key '{key}'"):
        nnunet.convert({k: v for k, v in weights.items() if k != key}, module, in_channels=2)
    with pytest.raises(MedsegError, match="decoder.attention.weight"):
        nnunet.convert(dict(weights, **{"decoder.attention.weight": np.zeros(3)}), module, in_channels=2)

    unsupported = plans_and_dataset(kwargs, False, class_name="ResidualUNet")
    with pytest.raises(MedsegError, match="network 'ResidualUNet' is not supported"):
        nnunet.architecture(*unsupported[:1], "3d_fullres", unsupported[1], "t")
    relu = dict(kwargs, nonlin="torch.nn.ReLU")
    with pytest.raises(MedsegError, match="activation ReLU"):
        nnunet.architecture(plans_and_dataset(relu, False)[0], "3d_fullres", dataset, "t")
    regions = dict(dataset, labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    with pytest.raises(MedsegError, match="region-based"):
        nnunet.architecture(plans, "3d_fullres", regions, "t")


class _Payload:  # unpickling this would run code: weights_only must refuse it
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "payload": _Payload()}, path)
    with pytest.raises(MedsegError, match="weights_only=True"):
        nnunet.load_checkpoint(path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_axis_permuted_wrapper_feeds_the_network_in_its_axis_order():
    kwargs = arch_kwargs(3, residual=False)
    plans, dataset = plans_and_dataset(kwargs, False)
    module = nnunet.build_module(nnunet.architecture(plans, "3d_fullres", dataset, "t"), num_classes=3)
    x = np.random.default_rng(0).normal(size=(1, 8, 16, 12, 2)).astype(np.float32)  # network order (z, y, x)
    variables = module.init(jax.random.key(0), x)
    wrapped = AxisPermuted(module, (2, 1, 0))  # network axis a reads our axis 2 - a
    ours = np.transpose(x, (0, 3, 2, 1, 4))  # the same volume in our (x, y, z) order
    out = wrapped.apply({"params": {"net": variables["params"]}}, ours)
    np.testing.assert_allclose(out, np.transpose(module.apply(variables, x), (0, 3, 2, 1, 4)), rtol=1e-5, atol=1e-5)
    assert wrapped.total_downsampling() == tuple(reversed(module.total_downsampling()))


def test_cli_import_then_predict(tmp_path):
    folder, _ = write_result_folder(tmp_path / "results")
    run = tmp_path / "run"
    result = medseg("import", "nnunet", folder, "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["axis_permutation"] == [2, 1, 0]
    assert config["train"]["patch_size"] == [16, 16, 8]  # nnU-Net's (z, y, x) patch in our (x, y, z) order
    plans = json.loads((run / "plans.json").read_text())
    assert plans["target_spacing"] == [2.0, 2.0, 3.0]
    assert plans["normalization"][0] == {"scheme": "ct", "clip": [-20.0, 150.0], "mean": 80.0, "std": 30.0}
    assert plans["normalization"][1] == {"scheme": "zscore", "mask": "nonzero_region"}  # nnU-Net's use_mask_for_norm

    again = medseg("import", "nnunet", folder, "--out", run)
    assert_clean_error(again, str(run), "already exists")

    data = write_tiny_dataset(tmp_path / "data", num_train=0, num_test=1)
    two_channel = tmp_path / "input"
    two_channel.mkdir()
    import nibabel as nib

    source = nib.load(next((data / "imagesTs").iterdir()))
    for channel in range(2):
        nib.save(source, two_channel / f"case_{channel:04d}.nii.gz")
    predicted = medseg("predict", "--run", run, "--input", two_channel, "--output", tmp_path / "out")
    assert predicted.returncode == 0, predicted.stderr
    output = nib.load(tmp_path / "out" / "case.nii.gz")
    assert output.shape == source.shape
    np.testing.assert_allclose(output.affine, source.affine)
    assert set(np.unique(np.asarray(output.dataobj))) <= {0, 1, 2}


def test_cli_import_refuses_an_unsupported_network(tmp_path):
    folder, _ = write_result_folder(tmp_path / "results", class_name="ResidualUNet")
    result = medseg("import", "nnunet", folder, "--out", tmp_path / "run")
    assert_clean_error(result, "ResidualUNet", "not supported")
    assert not (tmp_path / "run").exists()


def test_fine_tuning_starts_from_the_imported_weights(tmp_path, tiny_dataset):
    folder, _ = write_result_folder(tmp_path / "results")
    imported = tmp_path / "imported"
    assert medseg("import", "nnunet", folder, "--out", imported).returncode == 0
    run = tmp_path / "finetuned"
    result = medseg("train", "--workdir", run, "--init-from", imported, f"--config.data.dataset={tiny_dataset}",
                    "--config.train.steps=1", "--config.train.val_every=1", "--config.train.checkpoint_every=1",
                    "--config.train.batch_size=1", "--config.data.val_cases=1", "--config.augment.p_rotation=0.0",
                    "--config.augment.p_scaling=0.0", "--config.augment.p_elastic=0.0")
    assert result.returncode == 0, result.stderr
    # the tiny dataset has one channel, the nnU-Net model two: only the first conv starts afresh
    assert "initialised 55 of 56 parameter arrays" in result.stdout
    assert "['net']['encoder0']['conv0']['conv']['kernel']" in result.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["axis_permutation"] == [2, 1, 0] and config["train"]["init_from"] == str(imported)
