import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.io import datasets


def _nifti(path: Path, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (2, 3, 4) if channels == 1 else (2, 3, 4, channels)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    return path


def _write_json(root: Path, data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _msd(root: Path, n_train=3, n_test=2, modality=None) -> dict:
    modality = modality or {"0": "FLAIR", "1": "T1w"}
    training = []
    for i in range(n_train):
        _nifti(root / "imagesTr" / f"brain_{i:03d}.nii.gz", channels=len(modality))
        _nifti(root / "labelsTr" / f"brain_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/brain_{i:03d}.nii.gz", "label": f"./labelsTr/brain_{i:03d}.nii.gz"})
    test = []
    for i in range(n_test):
        _nifti(root / "imagesTs" / f"brain_{100 + i:03d}.nii.gz", channels=len(modality))
        test.append(f"./imagesTs/brain_{100 + i:03d}.nii.gz")
    data = {"name": "BrainTumour", "modality": modality, "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": n_train, "numTest": n_test, "training": training, "test": test}
    _write_json(root, data)
    return data


def _nnunet(root: Path, n_train=3, n_test=1, channels=("T2", "ADC")) -> dict:
    for i in range(n_train):
        for c in range(len(channels)):
            _nifti(root / "imagesTr" / f"prostate_{i:02d}_{c:04d}.nii.gz")
        _nifti(root / "labelsTr" / f"prostate_{i:02d}.nii.gz")
    for i in range(n_test):
        for c in range(len(channels)):
            _nifti(root / "imagesTs" / f"prostate_{50 + i:02d}_{c:04d}.nii.gz")
    data = {"channel_names": {str(c): name for c, name in enumerate(channels)},
            "labels": {"background": 0, "PZ": 1, "TZ": 2}, "numTraining": n_train, "file_ending": ".nii.gz"}
    _write_json(root, data)
    return data


def _assert_error(root, *fragments):
    with pytest.raises(MedsegError) as excinfo:
        datasets.load_dataset(root)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- MSD --------------------------------------------------------------------------------------------------------------

def test_msd_layout(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    _msd(root)
    _nifti(root / "labelsTs" / "brain_100.nii.gz")
    spec = datasets.load_dataset(root)
    assert spec.name == "BrainTumour"
    assert spec.root == root
    assert spec.channel_names == {0: "FLAIR", 1: "T1w"}
    assert spec.labels == {0: "background", 1: "edema", 2: "tumour"}
    assert spec.file_ending == ".nii.gz"
    assert spec.modality == "mri"
    assert [c.case_id for c in spec.training] == ["brain_000", "brain_001", "brain_002"]
    first = spec.training[0]
    assert first.image_paths == (root / "imagesTr" / "brain_000.nii.gz",)
    assert first.label_path == root / "labelsTr" / "brain_000.nii.gz"
    assert [c.case_id for c in spec.test] == ["brain_100", "brain_101"]
    assert spec.test[0].label_path == root / "labelsTs" / "brain_100.nii.gz"
    assert spec.test[1].label_path is None
    assert all(p.is_file() for c in spec.training + spec.test for p in c.image_paths)


def test_msd_without_test_list(tmp_path):
    data = _msd(tmp_path, n_test=0)
    del data["test"]
    _write_json(tmp_path, data)
    spec = datasets.load_dataset(tmp_path)
    assert spec.test == ()
    assert spec.name == "BrainTumour"


def test_msd_missing_background_is_added(tmp_path):
    data = _msd(tmp_path)
    data["labels"] = {"1": "liver"}
    _write_json(tmp_path, data)
    assert datasets.load_dataset(tmp_path).labels == {0: "background", 1: "liver"}


def test_labels_need_not_be_consecutive(tmp_path):
    data = _msd(tmp_path)
    data["labels"] = {"0": "background", "1": "liver", "5": "tumour"}
    _write_json(tmp_path, data)
    assert datasets.load_dataset(tmp_path).labels == {0: "background", 1: "liver", 5: "tumour"}


@pytest.mark.parametrize("bad_path", ["../outside.nii.gz", "./imagesTr/../../outside.nii.gz", "/etc/passwd"])
def test_msd_path_outside_dataset(tmp_path, bad_path):
    root = tmp_path / "ds"
    data = _msd(root)
    _nifti(tmp_path / "outside.nii.gz")
    data["training"][1]["image"] = bad_path
    _write_json(root, data)
    _assert_error(root, "dataset.json", bad_path, "training[1].image")


def test_msd_dotdot_inside_dataset_is_fine(tmp_path):
    data = _msd(tmp_path)
    data["training"][0]["label"] = "./imagesTr/../labelsTr/brain_000.nii.gz"
    _write_json(tmp_path, data)
    assert datasets.load_dataset(tmp_path).training[0].label_path == tmp_path / "labelsTr" / "brain_000.nii.gz"


def test_msd_missing_listed_file(tmp_path):
    _msd(tmp_path)
    os.remove(tmp_path / "labelsTr" / "brain_001.nii.gz")
    _assert_error(tmp_path, "brain_001.nii.gz", "does not exist")


def test_msd_missing_test_file(tmp_path):
    _msd(tmp_path)
    os.remove(tmp_path / "imagesTs" / "brain_101.nii.gz")
    _assert_error(tmp_path, "brain_101.nii.gz", "test[1]")


def test_msd_duplicate_case_ids(tmp_path):
    data = _msd(tmp_path)
    data["training"].append(dict(data["training"][0]))
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "duplicate case id 'brain_000'")


@pytest.mark.parametrize("label", ["drop", None])
def test_msd_image_without_label(tmp_path, label):
    data = _msd(tmp_path)
    if label == "drop":
        del data["training"][2]["label"]
    else:
        data["training"][2]["label"] = None
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "training[2]", "brain_002.nii.gz", "no label")


def test_msd_malformed_training_entry(tmp_path):
    data = _msd(tmp_path)
    data["training"][0] = "./imagesTr/brain_000.nii.gz"
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "training[0]")


# --- nnU-Net v2 -------------------------------------------------------------------------------------------------------

def test_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset005_Prostate"
    _nnunet(root)
    spec = datasets.load_dataset(root)
    assert spec.name == "Dataset005_Prostate"  # no "name" key: the folder name
    assert spec.channel_names == {0: "T2", 1: "ADC"}
    assert spec.labels == {0: "background", 1: "PZ", 2: "TZ"}
    assert spec.modality == "mri"
    assert [c.case_id for c in spec.training] == ["prostate_00", "prostate_01", "prostate_02"]
    case = spec.training[1]
    assert case.image_paths == (root / "imagesTr" / "prostate_01_0000.nii.gz",
                                root / "imagesTr" / "prostate_01_0001.nii.gz")
    assert case.label_path == root / "labelsTr" / "prostate_01.nii.gz"
    assert [c.case_id for c in spec.test] == ["prostate_50"]
    assert spec.test[0].label_path is None


def test_nnunet_plain_nii_and_test_labels(tmp_path):
    _nifti(tmp_path / "imagesTr" / "liver_1_0000.nii")
    _nifti(tmp_path / "labelsTr" / "liver_1.nii")
    _nifti(tmp_path / "imagesTs" / "liver_9_0000.nii")
    _nifti(tmp_path / "labelsTs" / "liver_9.nii")
    (tmp_path / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    _write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                           "file_ending": ".nii", "name": "Liver"})
    spec = datasets.load_dataset(tmp_path)
    assert spec.file_ending == ".nii" and spec.modality == "ct"
    assert spec.training[0].label_path == tmp_path / "labelsTr" / "liver_1.nii"
    assert spec.test[0].label_path == tmp_path / "labelsTs" / "liver_9.nii"


def test_nnunet_image_without_label(tmp_path):
    _nnunet(tmp_path)
    os.remove(tmp_path / "labelsTr" / "prostate_01.nii.gz")
    _assert_error(tmp_path, "prostate_01.nii.gz", "missing label")


def test_nnunet_missing_channel(tmp_path):
    _nnunet(tmp_path)
    os.remove(tmp_path / "imagesTr" / "prostate_02_0001.nii.gz")
    _assert_error(tmp_path, "prostate_02_0001.nii.gz", "missing channel")


def test_nnunet_extra_channel(tmp_path):
    _nnunet(tmp_path)
    _nifti(tmp_path / "imagesTr" / "prostate_00_0002.nii.gz")
    _assert_error(tmp_path, "prostate_00_0002.nii.gz", "channel 2")


def test_nnunet_file_without_channel_suffix(tmp_path):
    _nnunet(tmp_path)
    _nifti(tmp_path / "imagesTr" / "stray.nii.gz")
    _assert_error(tmp_path, "stray.nii.gz", "_0000")


def test_nnunet_num_training_mismatch(tmp_path):
    data = _nnunet(tmp_path)
    data["numTraining"] = 4
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "numTraining")


def test_nnunet_region_labels(tmp_path):
    data = _nnunet(tmp_path)
    data["labels"] = {"background": 0, "whole tumor": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    data["regions_class_order"] = [1, 2, 3]
    _write_json(tmp_path, data)
    spec = datasets.load_dataset(tmp_path)
    assert spec.regions == ((1, 2, 3), (2, 3), (3,))
    assert spec.labels == {0: "background", 1: "whole tumor", 2: "core", 3: "enhancing"}
    data["regions_class_order"] = [3, 2, 1]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "regions_class_order [3, 2, 1]", "outermost to the innermost")
    del data["regions_class_order"]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "need 'regions_class_order'")
    data["labels"]["core"] = [2, "x"]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "region 'core'")


def test_nnunet_missing_file_ending(tmp_path):
    data = _nnunet(tmp_path)
    del data["file_ending"]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "file_ending")


def test_nnunet_unsupported_file_ending(tmp_path):
    data = _nnunet(tmp_path)
    data["file_ending"] = ".xyz"  # (.mha, .nrrd, .png, ... are read: io/formats.py)
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "'.xyz' is not supported")


def test_no_training_cases(tmp_path):
    _write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                           "file_ending": ".nii.gz"})
    _assert_error(tmp_path, "no training cases")


# --- dataset.json problems shared by both layouts ---------------------------------------------------------------------

def test_root_missing(tmp_path):
    _assert_error(tmp_path / "nowhere", "nowhere", "not found")


def test_dataset_json_missing(tmp_path):
    _assert_error(tmp_path, "dataset.json", "not found")


def test_dataset_json_invalid(tmp_path):
    _write_json(tmp_path, '{"labels": {"background": 0,}')
    _assert_error(tmp_path, "dataset.json", "not valid JSON")


def test_dataset_json_not_an_object(tmp_path):
    _write_json(tmp_path, "[1, 2]")
    _assert_error(tmp_path, "dataset.json", "object")


def test_missing_labels(tmp_path):
    data = _nnunet(tmp_path)
    del data["labels"]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "'labels'")


def test_missing_channel_names(tmp_path):
    data = _msd(tmp_path)
    del data["modality"]
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "channel_names", "modality")


def test_channel_indices_with_gap(tmp_path):
    data = _nnunet(tmp_path)
    data["channel_names"] = {"0": "T2", "2": "ADC"}
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "channel_names")


@pytest.mark.parametrize("labels", [{"background": 0, "liver": -1}, {"background": 0, "liver": 1.5},
                                    {"background": 0, "liver": True}, {"background": 0, "liver": "1"},
                                    {"0": "background", "-1": "liver"}, {"0": "background", "one": "liver"}])
def test_bad_label_values(tmp_path, labels):
    data = _nnunet(tmp_path)
    data["labels"] = labels
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "'liver'", "non-negative integers")


def test_duplicate_label_values(tmp_path):
    data = _nnunet(tmp_path)
    data["labels"] = {"background": 0, "liver": 1, "hepar": 1}
    _write_json(tmp_path, data)
    _assert_error(tmp_path, "dataset.json", "given twice")


# --- modality ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("CT", "ct"), ("ct", "ct"), ("non-contrast CT", "ct"), ("MRI", "mri"),
                                           ("T2", "mri"), ("t1gd", "mri"), ("FLAIR", "mri"), ("ADC", "mri"),
                                           ("US", "us"), ("Ultrasound", "us"), ("PET", "other"),
                                           ("noNorm", "other")])
def test_modality(name, expected):
    spec = datasets.DatasetSpec(root=Path("."), name="x", channel_names={0: name}, labels={0: "background"},
                              training=(), test=(), file_ending=".nii.gz")
    assert spec.modality == expected


# --- list_nifti_inputs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("liver_003_0000.nii.gz", "liver_003"), ("liver_003.nii.gz", "liver_003"),
                                           ("liver_003_0001.nii", "liver_003"), ("scan.nii", "scan"),
                                           ("/a/b/ct_12.nii.gz", "ct_12"), ("a_0000", "a")])
def test_case_id_from_filename(name, expected):
    assert datasets.case_id_from_filename(name) == expected


def test_list_single_file(tmp_path):
    path = _nifti(tmp_path / "ct_scan_0000.nii.gz")
    assert datasets.list_nifti_inputs(path) == [("ct_scan", (path,))]


def test_list_single_file_of_an_unknown_kind(tmp_path):
    path = tmp_path / "scan.gif"
    path.write_bytes(b"x")
    with pytest.raises(MedsegError, match="scan.gif: not an image file"):
        datasets.list_nifti_inputs(path)
    (tmp_path / "scan.mha").write_bytes(b"x")  # a MetaImage is an input (read, and refused if broken, later)
    assert datasets.list_nifti_inputs(tmp_path / "scan.mha") == [("scan", (tmp_path / "scan.mha",))]


def test_list_folder_groups_channels(tmp_path):
    for name in ["b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii"]:
        _nifti(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _nifti(tmp_path / "sub" / "c_0000.nii.gz")
    assert datasets.list_nifti_inputs(tmp_path) == [
        ("a", (tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii")),
        ("b", (tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz")),
    ]


def test_list_folder_plain_names(tmp_path):
    for name in ["z.nii.gz", "m.nii", "a_0000.nii.gz"]:
        _nifti(tmp_path / name)
    assert [case for case, _ in datasets.list_nifti_inputs(tmp_path)] == ["a", "m", "z"]


@pytest.mark.parametrize("names,fragment", [
    (["a_0000.nii.gz", "a_0002.nii.gz"], "a_0001"),          # gap in channels
    (["a.nii.gz", "a_0000.nii.gz"], "case id 'a'"),          # plain and suffixed collide
    (["a.nii", "a.nii.gz"], "case id 'a'"),                  # two endings of one case
    (["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], "different numbers of channel"),
])
def test_list_folder_errors(tmp_path, names, fragment):
    for name in names:
        _nifti(tmp_path / name)
    with pytest.raises(MedsegError, match=fragment) as excinfo:
        datasets.list_nifti_inputs(tmp_path)
    assert "\n" not in str(excinfo.value)


def test_list_empty_or_missing(tmp_path):
    with pytest.raises(MedsegError, match="no .nii"):
        datasets.list_nifti_inputs(tmp_path)
    with pytest.raises(MedsegError, match="missing_folder"):
        datasets.list_nifti_inputs(tmp_path / "missing_folder")
