"""`medseg import nnunet` + `medseg predict` against nnU-Net v2's own nnUNetPredictor on the same scans.

The test writes an nnU-Net v2 result folder itself (plans.json, dataset.json, fold_0/checkpoint_final.pth in nnU-Net's
checkpoint format, the network built by nnU-Net's `get_network_from_plans` from a fixed torch seed), with an anisotropic
target spacing (separate-z resampling both ways), a transpose_forward that is not the identity, a CT channel and a
z-scored channel normalised inside the nonzero region, and reads scans stored in a non-RAS orientation with a slight
rotation, through NibabelIOWithReorient (reoriented to RAS, as medseg does) and SimpleITKIO (nnU-Net's default: each
file's stored voxel order). Two cases: one larger than the patch, one smaller (padded) along two axes.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

torch = pytest.importorskip("torch", reason="torch is a test extra (make test installs it)")
predict_from_raw_data = pytest.importorskip(
    "nnunetv2.inference.predict_from_raw_data", reason="nnunetv2 is a test extra (make test installs it)")

from medseg_jax import predict as predict_lib  # noqa: E402
from medseg_jax.data import preprocess  # noqa: E402
from medseg_jax.transfer.importers import import_nnunet  # noqa: E402

AGREEMENT = 0.999  # voxels with the same label as nnU-Net's
# nnU-Net's network axes are (z, x, y) here: it reads (z, y, x) and transpose_forward [0, 2, 1] swaps the last two.
TRANSPOSE = [0, 2, 1]
SPACING = (0.8, 0.9, 3.0)  # the scans', mm per canonical (RAS) axis
TARGET = {"x": 1.1, "y": 1.0, "z": 2.5}  # 3.0 / 0.8 > 3: the scans are anisotropic, resampled with separate z
CASES = {"big": (40, 48, 20), "small": (30, 36, 12)}  # canonical shapes; "small" is under the patch in x and z
LABELS = {"background": 0, "liver": 1, "lesion": 2}
MIRRORED_NETWORK_AXES = (1, 2)  # nnU-Net's x and y: our axes 0 and 1, so a wrong axis map would show


def network_order(by_axis: dict) -> list:
    return [by_axis[a] for a in "zxy"]


def nnunet_plans(reader: str = "NibabelIOWithReorient") -> tuple[dict, dict]:
    arch = {
        "n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": network_order({"z": 16, "x": 24, "y": 32}), "median_image_size_in_voxels": [24, 29, 43],
        "spacing": network_order(TARGET), "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
        "use_mask_for_norm": [False, True],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset998_Fidelity", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": network_order({"x": 0.8, "y": 0.9, "z": 3.0}),
        "original_median_shape_after_transp": [20, 40, 48], "image_reader_writer": reader,
        "transpose_forward": TRANSPOSE, "transpose_backward": TRANSPOSE,
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 90.0, "std": 45.0, "percentile_00_5": -40.0, "percentile_99_5": 210.0, "median": 90.0,
                  "min": -100.0, "max": 300.0},
            "1": {"mean": 300.0, "std": 80.0, "percentile_00_5": 100.0, "percentile_99_5": 500.0, "median": 300.0,
                  "min": 0.0, "max": 600.0}},
    }
    dataset = {"channel_names": {"0": "CT", "1": "T2"}, "labels": LABELS, "numTraining": 2,
               "file_ending": ".nii.gz", "overwrite_image_reader_writer": reader}
    return plans, dataset


def write_result_folder(root, reader: str = "NibabelIOWithReorient") -> None:
    """An nnU-Net v2 result folder with a randomly initialised network whose argmax shows every class."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans, dataset = nnunet_plans(reader)
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 2, len(LABELS), deep_supervision=True)
    with torch.no_grad():  # He-initialised heads give near-constant logits; louder ones give every class some room
        head = network.decoder.seg_layers[-1]
        head.weight.mul_(8.0)
        head.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    fold = root / "fold_0"
    fold.mkdir(parents=True)
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
                "inference_allowed_mirroring_axes": MIRRORED_NETWORK_AXES}, fold / "checkpoint_final.pth")


def write_scans(folder, seed=0) -> None:
    """Two-channel scans: smooth tissue inside an ellipsoidal body (zero outside), brighter blobs; stored in PSR-like
    voxel order (axes swapped and flipped) with a 7 degree rotation about z and an offset origin."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, shape in CASES.items():
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), axis=-1)
        body = (grid ** 2 / np.array([0.9, 0.85, 0.95]) ** 2).sum(-1) < 1
        tissue = scipy.ndimage.gaussian_filter(rng.normal(size=shape), (3, 3, 1))
        tissue /= tissue.std()
        blobs = np.zeros(shape)
        for _ in range(4):
            centre = rng.uniform(-0.5, 0.5, 3)
            blobs += np.exp(-((grid - centre) ** 2 / np.array([0.08, 0.08, 0.15])).sum(-1))
        ct = np.where(body, 60 + 25 * tissue + 120 * blobs, 0)
        t2 = np.where(body, 300 + 60 * tissue - 150 * blobs, 0)
        angle = np.deg2rad(7.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ras = np.eye(4)
        ras[:3, :3] = rotation @ np.diag(SPACING)
        ras[:3, 3] = [-12.0, 30.5, -7.25]
        stored_order = [[1, -1], [0, 1], [2, -1]]  # file axis 0 is canonical y (flipped), 1 is x, 2 is z (flipped)
        for channel, values in enumerate((ct, t2)):
            image = nib.Nifti1Image(values.astype(np.float32), ras).as_reoriented(stored_order)
            nib.save(image, folder / f"{name}_{channel:04d}.nii.gz")


def nnunet_predict(result_folder, scans, out, mirroring: bool, reader_name: str) -> None:
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    predictor = predict_from_raw_data.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                                      use_mirroring=mirroring, perform_everything_on_device=False,
                                                      device=torch.device("cpu"), verbose=False,
                                                      allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(result_folder), use_folds=(0,))
    out.mkdir(parents=True)
    reader = {"NibabelIOWithReorient": NibabelIOWithReorient, "SimpleITKIO": SimpleITKIO}[reader_name]()
    for name in CASES:
        image, properties = reader.read_images([str(scans / f"{name}_{c:04d}.nii.gz") for c in range(2)])
        predictor.predict_single_npy_array(image, properties, None, str(out / name), False)


def agreement(ours_folder, theirs_folder) -> dict:
    result = {}
    for name in CASES:
        ours, theirs = nib.load(ours_folder / f"{name}.nii.gz"), nib.load(theirs_folder / f"{name}.nii.gz")
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        classes = np.unique(b)
        assert len(classes) > 1 and set(classes) - {0}, f"{name}: nnU-Net predicts only {classes}"
        result[name] = float(np.mean(a == b))
    return result


@pytest.mark.parametrize("spacing, target", [
    ((0.8, 0.9, 3.0), (1.1, 1.0, 2.5)),  # the scan anisotropic: separate z by its coarsest axis
    ((1.0, 1.2, 1.0), (0.9, 4.0, 1.1)),  # only the target anisotropic: its coarsest axis (y)
    ((3.0, 3.0, 0.7), (2.0, 2.5, 0.8)),  # two coarse axes: no separate z
    ((1.0, 1.1, 1.3), (1.4, 0.9, 1.0)),  # isotropic-ish: plain cubic / linear
])
@pytest.mark.parametrize("kind", ["data", "probabilities"])
def test_resampling_equals_nnunets(spacing, target, kind):
    from nnunetv2.preprocessing.resampling.default_resampling import (
        determine_do_sep_z_and_axis,
        resample_data_or_seg_to_shape,
    )

    rng = np.random.default_rng(1)
    array = scipy.ndimage.gaussian_filter(rng.normal(size=(13, 11, 9, 2)), 1.0).astype(np.float32) * 50
    new_shape = preprocess.resampled_shape(array.shape[:3], spacing, target, preprocess.NNUNET_RESAMPLING)
    order = {"data": 3, "probabilities": 1}[kind]
    theirs = resample_data_or_seg_to_shape(np.moveaxis(array, -1, 0), new_shape, spacing, target, is_seg=False,
                                           order=order, order_z=0, force_separate_z=None)
    ours = preprocess.resample(array, new_shape, spacing, target, preprocess.NNUNET_RESAMPLING, kind)
    assert ours.dtype == array.dtype
    np.testing.assert_allclose(ours, np.moveaxis(theirs, 0, -1), rtol=1e-6, atol=1e-5)
    separate, axis = determine_do_sep_z_and_axis(None, spacing, target)
    assert preprocess.separate_z_axis(spacing, target) == (axis if separate else None)


def test_normalisation_equals_nnunets():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        ZScoreNormalization,
    )

    plans, _ = nnunet_plans()
    stats = plans["foreground_intensity_properties_per_channel"]
    rng = np.random.default_rng(2)
    image = rng.normal(200, 80, size=(20, 18, 10, 2)).astype(np.float32)
    image[:3], image[:, -2:], image[5:8, 6:9, 4:6] = 0, 0, 0  # a zero border (cropped) and an enclosed hole
    image[4:16, 3:5, :] = 0  # zero inside the crop box, outside the region
    box = preprocess.nonzero_box(image)
    data, seg, bbox = crop_to_nonzero(np.moveaxis(image, -1, 0).copy())
    assert [list(b) for b in bbox] == box
    theirs = np.stack([CTNormalization(False, stats["0"]).run(data[0].copy(), seg[0]),
                       ZScoreNormalization(True, stats["1"]).run(data[1].copy(), seg[0])], axis=-1)
    ct = stats["0"]
    ours = preprocess.normalize(preprocess.crop(image, box), [
        {"scheme": "ct", "clip": [ct["percentile_00_5"], ct["percentile_99_5"]], "mean": ct["mean"], "std": ct["std"]},
        {"scheme": "zscore", "mask": "nonzero_region"}])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# NibabelIOWithReorient reorients to RAS as we do; SimpleITKIO, nnU-Net's default, keeps each file's voxel order
# (the scans here are not stored in RAS order, so the network must see them as stored).
@pytest.fixture(scope="module", params=["NibabelIOWithReorient", "SimpleITKIO"])
def imported(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("nnunet")
    write_result_folder(root / "results", request.param)
    write_scans(root / "scans")
    import_nnunet(root / "results", root / "run")
    return root, request.param


def test_import_writes_nnunet_resampling_normalisation_and_mirroring(imported):
    imported, reader = imported
    plans = json.loads((imported / "run" / "plans.json").read_text())
    config = json.loads((imported / "run" / "config.json").read_text())
    assert plans["resampling"] == {"scheme": "nnunet", "order": 3, "order_z": 0, "probabilities_order": 1,
                                   "probabilities_order_z": 0, "anisotropy_threshold": 3.0, "force_separate_z": None}
    assert plans["target_spacing"] == [TARGET[a] for a in "xyz"]
    assert plans["normalization"][1] == {"scheme": "zscore", "mask": "nonzero_region"}
    assert config["model"]["axis_permutation"] == [2, 0, 1]  # network (z, x, y) reads our axes 2, 0, 1
    assert config["train"]["patch_size"] == [24, 32, 16]
    assert config["infer"]["mirror_axes"] == config["augment"]["mirror_axes"] == [0, 1]
    assert plans.get("voxel_order", "canonical") == ("file" if reader == "SimpleITKIO" else "canonical")


@pytest.mark.parametrize("mirroring", [False, True], ids=["plain", "mirrored"])
def test_predictions_equal_nnunet_predictor(imported, mirroring):
    imported, reader = imported
    tag = "mirrored" if mirroring else "plain"
    theirs, ours = imported / f"nnunet_{tag}", imported / f"medseg_{tag}"
    nnunet_predict(imported / "results", imported / "scans", theirs, mirroring, reader)
    predict_lib.predict(imported / "run", imported / "scans", ours, checkpoint="latest",
                        mirror_axes=None if mirroring else ())
    equal = agreement(ours, theirs)
    assert min(equal.values()) >= AGREEMENT, equal
