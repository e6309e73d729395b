"""`medseg prepare`: validation report, fingerprint and plan, the zarr3 store, resumability and mapping back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorstore as ts

from medseg_jax.data import fingerprint as fp
from medseg_jax.data import prepare as prepare_lib
from medseg_jax.data.prepare import ValidationFailed, prepare
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.io import dicom, nifti
from medseg_jax.io import geometry as geometry_lib
from tests.conftest import REPO, make_tiny_case, write_tiny_dataset


def medseg(*args, extra_code: str = ""):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = f"import sys; {extra_code}\nfrom medseg_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def data_config(**overrides):
    config = fp.default_data_config()
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    dataset = write_tiny_dataset(root / "ds", num_train=6, num_test=1)
    prepare(dataset, root / "store", data_config(target_spacing=(3.0, 2.5, 4.0)))
    return dataset, Store(root / "store")


# --- validation -----------------------------------------------------------------------------------------------------

def _break_nonfinite(ds):
    path = ds / "imagesTr" / "tiny_001.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return "tiny_001", "imagesTr/tiny_001.nii.gz", "NaN"


def _break_unreadable(ds):
    (ds / "imagesTr" / "tiny_001.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return "tiny_001", "imagesTr/tiny_001.nii.gz", "cannot read"


def _break_shape(ds):
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0])),
             ds / "labelsTr" / "tiny_002.nii.gz")
    return "tiny_002", "labelsTr/tiny_002.nii.gz", "shape"


def _break_affine(ds):
    path = ds / "labelsTr" / "tiny_002.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), np.diag([2.0, 2.0, 3.5, 1.0])), path)
    return "tiny_002", "labelsTr/tiny_002.nii.gz", "affine"


def _break_undeclared_label(ds):
    path = ds / "labelsTr" / "tiny_003.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return "tiny_003", "labelsTr/tiny_003.nii.gz", "not declared"


def _break_non_integer_label(ds):
    path = ds / "labelsTr" / "tiny_003.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return "tiny_003", "labelsTr/tiny_003.nii.gz", "non-integer"


def _break_spacing(ds):
    path = ds / "imagesTr" / "tiny_004.nii.gz"
    img = nib.load(path)
    broken = nib.Nifti1Image(np.asarray(img.dataobj), None)
    broken.header.set_qform(img.affine, code=1)
    broken.header["pixdim"][2] = 0.0
    nib.save(broken, path)
    return "tiny_004", "imagesTr/tiny_004.nii.gz", "spacing"


def _break_duplicate_id(ds):
    (ds / "imagesTr2").mkdir()
    (ds / "labelsTr2").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (ds / f"{sub}2" / "tiny_000.nii.gz").write_bytes((ds / sub / "tiny_000.nii.gz").read_bytes())
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr2/tiny_000.nii.gz", "label": "./labelsTr2/tiny_000.nii.gz"})
    (ds / "dataset.json").write_text(json.dumps(meta))
    return "tiny_000", "imagesTr", "case id 'tiny_000' is used by 2"


def _break_outside_path(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"][5] = {"image": "../elsewhere/tiny_005.nii.gz", "label": "./labelsTr/tiny_005.nii.gz"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    return "tiny_005", "dataset.json", "outside the dataset folder"


BREAKERS = [_break_nonfinite, _break_unreadable, _break_shape, _break_affine, _break_undeclared_label,
            _break_non_integer_label, _break_spacing, _break_duplicate_id, _break_outside_path]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[7:] for b in BREAKERS])
def test_each_validation_error_names_case_file_and_problem(tmp_path, breaker):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=6, num_test=0)
    case, file_part, words = breaker(ds)
    with pytest.raises(ValidationFailed) as info:
        prepare(ds, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    bad = [p for p in info.value.problems if p.case == case]
    assert bad, info.value.report
    assert file_part in bad[0].file and words.lower() in bad[0].problem.lower(), bad[0]
    assert {p.case for p in info.value.problems} == {case}, info.value.report


def test_cli_reports_every_bad_case_and_writes_nothing(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=6, num_test=0)
    _break_shape(ds)
    _break_nonfinite(ds)
    result = medseg("prepare", "--source", ds, "--out", tmp_path / "store")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tiny_")]
    assert [line.split(":")[0] for line in lines] == ["tiny_001", "tiny_002"], result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--skip-bad" in errors[0] and "nothing written" in errors[0]
    assert not (tmp_path / "store").exists()


def test_skip_bad_prepares_the_good_cases_and_writes_the_report(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=6, num_test=0)
    _break_shape(ds)
    result = medseg("prepare", "--source", ds, "--out", tmp_path / "store", "--skip-bad")
    assert result.returncode == 0, result.stderr
    store = Store(tmp_path / "store")
    assert store.case_ids == ["tiny_000", "tiny_001", "tiny_003", "tiny_004", "tiny_005"]
    report = (tmp_path / "store" / "validation_report.tsv").read_text().splitlines()
    assert report[0] == "case\tfile\tproblem" and len(report) == 2 and report[1].startswith("tiny_002\t")
    assert "tiny_002" in result.stderr


def test_out_folder_with_other_content_is_refused(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=2, num_test=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(MedsegError, match="not a medseg store"):
        prepare(ds, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# --- fingerprint and plan -------------------------------------------------------------------------------------------

def test_ct_plan_uses_dataset_foreground_statistics(prepared):
    dataset, store = prepared
    values = []
    for i in range(6):
        image, label = make_tiny_case(i)
        values.append(image[label > 0])
    values = np.concatenate(values).astype(np.float64)
    norm = store.plan["normalization"][0]
    assert norm["scheme"] == "ct"
    assert norm["mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert norm["std"] == pytest.approx(values.std(), rel=1e-4)
    assert norm["clip"] == pytest.approx([np.percentile(values, 0.5), np.percentile(values, 99.5)], rel=1e-4)
    fingerprint = store.fingerprint
    assert fingerprint["spacings"] == [[2.0, 2.0, 3.0]] * 6
    counts = sum(np.bincount(make_tiny_case(i)[1].ravel(), minlength=3) for i in range(6))
    assert fingerprint["class_voxels"] == {str(c): int(n) for c, n in enumerate(counts)}


def test_target_spacing_median_and_anisotropy_rule():
    spacings = [[1.0, 1.0, 5.0], [0.8, 0.8, 6.0], [1.2, 1.2, 2.0], [1.0, 1.0, 5.0]]
    isotropic_shapes = [[100, 100, 100]] * 4
    assert fp.planned_target_spacing(spacings, isotropic_shapes) == pytest.approx([1.0, 1.0, 5.0])
    thin_stack = [[300, 300, 40]] * 4  # coarse axis has < 1/3 the voxels: take its 10th percentile spacing
    assert fp.planned_target_spacing(spacings, thin_stack) == pytest.approx(
        [1.0, 1.0, np.percentile([5.0, 6.0, 2.0, 5.0], 10)])


def test_normalisation_by_modality_and_override():
    assert [fp.channel_scheme(n) for n in ("CT", "T2", "ADC", "US", "ultrasound", "noNorm")] == [
        "ct", "zscore", "zscore", "percentile", "percentile", "none"]
    fingerprint = {"spacings": [[1, 1, 1]], "shapes_after_crop": [[10, 10, 10]],
                   "foreground_intensity_properties_per_channel": {"0": {"num_samples": 0}, "1": {"num_samples": 0}}}
    plan = fp.make_plan(fingerprint, {0: "bg", 1: "x"}, {0: "T2", 1: "US"}, "mri", data_config())
    assert [n["scheme"] for n in plan["normalization"]] == ["zscore", "percentile"]
    plan = fp.make_plan(fingerprint, {0: "bg", 1: "x"}, {0: "T2", 1: "US"}, "mri",
                        data_config(normalization="none,zscore", target_spacing=(2.0, 2.0, 2.0)))
    assert [n["scheme"] for n in plan["normalization"]] == ["none", "zscore"]
    assert plan["target_spacing"] == [2.0, 2.0, 2.0]
    with pytest.raises(MedsegError, match="data.normalization"):
        fp.make_plan(fingerprint, {0: "bg"}, {0: "T2", 1: "US"}, "mri", data_config(normalization="fancy"))


# --- the store ------------------------------------------------------------------------------------------------------

def test_store_is_zarr3_with_zstd_and_patch_sized_chunks(prepared):
    _, store = prepared
    case_id = store.case_ids[0]
    meta = json.loads((store.root / "cases" / case_id / "image" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "float32"
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"][:3] == [min(32, s) for s in store.cases[case_id]["shape"]]
    assert any(c["name"] == "zstd" for c in sharding["configuration"]["codecs"])
    root = json.loads((store.root / "zarr.json").read_text())
    assert root["node_type"] == "group" and "medseg_store" in root["attributes"]
    # Readable by plain tensorstore, and equal to what Store.read_case returns.
    image = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                    "path": str(store.root / "cases" / case_id / "image")}}
                    ).result().read().result()
    assert np.array_equal(image, store.read_case(case_id)[0])


def test_store_case_equals_preprocessing_in_memory(prepared):
    from medseg_jax.data import preprocess

    dataset, store = prepared
    image, geometry = nifti.read_image(dataset / "imagesTr" / "tiny_002.nii.gz")
    label, _ = nifti.read_label(dataset / "labelsTr" / "tiny_002.nii.gz")
    pre = preprocess.preprocess_case(image, geometry.spacing, store.plan, label)
    stored_image, stored_label = store.read_case("tiny_002")
    assert np.array_equal(stored_image, pre.image) and np.array_equal(stored_label, pre.label)
    meta = store.cases["tiny_002"]
    assert meta["crop_box"] == pre.crop_box and meta["canonical_shape"] == list(image.shape[:3])
    offsets = meta["class_locations"]
    locations = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(
        store.root / "cases" / "tiny_002" / "locations")}}).result().read().result()
    for value, (offset, count) in offsets.items():
        coords = locations[offset:offset + count]
        assert count == min(int((pre.label == int(value)).sum()), 10_000)
        assert np.all(pre.label[tuple(coords.T)] == int(value))


def test_patch_reads_pad_outside_the_volume(prepared):
    _, store = prepared
    image, label = store.read_case("tiny_000")
    patch_image, patch_label = store.read_patch("tiny_000", (-3, 2, -1), (8, 6, 5))
    assert np.array_equal(patch_image[3:, :, 1:], image[0:5, 2:8, 0:4])
    assert np.all(patch_image[:3] == 0) and np.all(patch_label[:, :, :1] == 0)
    assert np.array_equal(patch_label[3:, :, 1:], label[0:5, 2:8, 0:4])


def _world_nearest_reference(stored_label, meta) -> np.ndarray:
    """Nearest-neighbour resampling of the stored label onto the source file's voxels, done independently in world
    coordinates: every source voxel's world position -> the preprocessed grid's voxel index, rounded."""
    geometry = geometry_lib.Geometry.from_dict(meta["geometry"])
    crop_lo = np.array([lo for lo, _ in meta["crop_box"]], np.float64)
    crop_shape = np.array([hi - lo for lo, hi in meta["crop_box"]], np.float64)
    scale = crop_shape / np.array(stored_label.shape, np.float64)  # original voxels per preprocessed voxel
    # Preprocessed voxel p covers original canonical voxels [p, p + 1) * scale (scipy zoom grid_mode), centre at
    # crop_lo + (p + 0.5) * scale - 0.5.
    pre_to_canonical = np.eye(4)
    pre_to_canonical[:3, :3] = np.diag(scale)
    pre_to_canonical[:3, 3] = crop_lo + 0.5 * scale - 0.5
    pre_affine = geometry.canonical_affine @ pre_to_canonical
    file_index = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.shape], indexing="ij"), -1).reshape(-1, 3)
    world = geometry.affine @ np.c_[file_index, np.ones(len(file_index))].T
    pre_index = np.rint((np.linalg.inv(pre_affine) @ world)[:3].T).astype(int)
    inside = np.all((pre_index >= 0) & (pre_index < np.array(stored_label.shape)), axis=1)
    out = np.zeros(len(file_index), stored_label.dtype)
    out[inside] = stored_label[tuple(pre_index[inside].T)]
    return out.reshape(geometry.shape)


def test_map_back_of_a_label_equals_nearest_neighbour_resampling(tmp_path):
    """Oblique LPS source, cropped and resampled to a non-integer spacing ratio: the store's map-back of the stored
    label is, voxel for voxel, nearest-neighbour resampling in world coordinates, and close to the source label."""
    from tests.conftest import oblique_lps_affine

    ds = write_tiny_dataset(tmp_path / "ds", num_train=2, num_test=0)
    for i in range(2):  # oblique grids and a zero border (cropped away)
        for sub in ("imagesTr", "labelsTr"):
            path = ds / sub / f"tiny_{i:03d}.nii.gz"
            data = np.asarray(nib.load(path).dataobj)
            data = np.pad(data, ((3, 1), (0, 2), (2, 0)))
            nib.save(nib.Nifti1Image(data, oblique_lps_affine()), path)
    prepare(ds, tmp_path / "store", data_config(target_spacing=(2.7, 1.7, 4.1)))
    store = Store(tmp_path / "store")
    for case_id in store.case_ids:
        meta = store.cases[case_id]
        assert meta["crop_box"] != [[0, s] for s in meta["canonical_shape"]]
        _, stored_label = store.read_case(case_id)
        geometry = store.geometry(case_id)
        mapped = geometry_lib.from_canonical(store.map_back(case_id, stored_label), geometry)
        reference = _world_nearest_reference(stored_label, meta)
        assert np.array_equal(mapped, reference)
        source = np.asarray(nib.load(ds / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        assert mapped.shape == source.shape
        assert np.mean(mapped[source > 0] == source[source > 0]) > 0.8


def test_dicom_series_in_the_dataset_prepare_like_nifti(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=3, num_test=0)
    ds2 = write_tiny_dataset(tmp_path / "ds2", num_train=3, num_test=0)
    path = ds2 / "imagesTr" / "tiny_001.nii.gz"
    img = nib.load(path)
    volume = np.rint(np.asarray(img.dataobj)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), img.affine), ds / "imagesTr" / "tiny_001.nii.gz")
    path.unlink()
    dicom.write_series(ds2 / "imagesTr" / "tiny_001", volume, img.affine)
    meta = json.loads((ds2 / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/tiny_001"
    (ds2 / "dataset.json").write_text(json.dumps(meta))
    prepare(ds, tmp_path / "store_nifti")
    prepare(ds2, tmp_path / "store_dicom")
    a, b = Store(tmp_path / "store_nifti"), Store(tmp_path / "store_dicom")
    assert np.allclose(a.read_case("tiny_001")[0], b.read_case("tiny_001")[0], atol=1e-5)
    assert np.allclose(a.geometry("tiny_001").canonical_affine, b.geometry("tiny_001").canonical_affine, atol=1e-4)
    assert b.cases["tiny_001"]["source"]["images"] == ["imagesTr/tiny_001"]


# --- resumability ---------------------------------------------------------------------------------------------------

SLOW_WRITES = ("import time, medseg_jax.data.store as s; _w = s._write_array; "
               "s._write_array = lambda *a, **k: (_w(*a, **k), time.sleep(0.25))")


def test_killed_prepare_resumes_to_an_identical_store(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=8, num_test=0)
    prepare(ds, tmp_path / "clean")

    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = f"import sys; {SLOW_WRITES}\nfrom medseg_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "prepare", "--source", str(ds), "--out",
                                str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    cases = tmp_path / "killed" / "cases"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill while a case is half-written, after some cases are complete
        names = [p.name for p in cases.iterdir()] if cases.is_dir() else []
        done = [n for n in names if not n.startswith(".") and n != "zarr.json"]
        partial = [n for n in names if n.startswith(".partial-")]
        if len(done) >= 2 and partial and any((cases / partial[0]).glob("image/c")):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    names = [p.name for p in cases.iterdir()]
    assert any(n.startswith(".partial-") for n in names), names
    with pytest.raises(MedsegError, match="did not finish"):
        Store(tmp_path / "killed")

    summary = prepare(ds, tmp_path / "killed")
    assert 0 < summary["prepared_now"] < 8
    assert tree(tmp_path / "killed") == tree(tmp_path / "clean")


def test_resume_refuses_a_changed_source_or_config(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=3, num_test=0)
    prepare(ds, tmp_path / "store")
    with pytest.raises(MedsegError, match="other source files or another data config"):
        prepare(ds, tmp_path / "store", data_config(target_spacing=(1.0, 1.0, 1.0)))
    image, label = make_tiny_case(99)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), ds / "imagesTr" / "tiny_000.nii.gz")
    with pytest.raises(MedsegError, match="other source files"):
        prepare(ds, tmp_path / "store")


def test_prepare_with_two_workers_equals_one(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", num_train=4, num_test=0)
    prepare(ds, tmp_path / "one", workers=1)
    prepare(ds, tmp_path / "two", workers=2)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


def test_class_locations_cover_every_class_evenly_capped():
    label = np.zeros((60, 60, 40), np.uint8)
    label[:50, :50, :10] = 1  # 25,000 voxels: capped at 10,000
    label[55:58, 55:58, 30:33] = 2  # 27 voxels: all kept
    locations, offsets = prepare_lib.class_locations(label, seed=0)
    assert offsets == {"1": [0, 10_000], "2": [10_000, 27]}
    assert np.all(label[tuple(locations[:10_000].T)] == 1) and np.all(label[tuple(locations[10_000:].T)] == 2)
    assert len(np.unique(locations[:10_000], axis=0)) == 10_000
