"""`medseg dataset add`: corrected cases into a store, incrementally and versioned; runs keep their version."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import add as add_lib
from medseg_jax.data import preprocess
from medseg_jax.data.prepare import ValidationFailed, prepare
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.io import annotations, nifti
from tests.conftest import make_tiny_case, write_tiny_dataset
from tests.test_prepare import data_config, medseg

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def case_files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the store's cases/ with its modification time and bytes."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((store / "cases").rglob("*")) if p.is_file()}


def write_corrections(folder: Path, seeds: dict[str, int], seg_nrrd: tuple[str, ...] = ()) -> Path:
    """imagesTr/ + labelsTr/ (no dataset.json), as annotators hand back corrected cases; `seg_nrrd` cases have a
    Slicer segmentation whose segments are numbered the other way round (matched by name)."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case_id, seed in seeds.items():
        image, label = make_tiny_case(seed)
        nib.save(nib.Nifti1Image(image, AFFINE), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        if case_id in seg_nrrd:
            _, geometry = nifti.read_image(folder / "imagesTr" / f"{case_id}_0000.nii.gz")
            swapped = np.choose(label, [0, 2, 1]).astype(np.uint8)
            annotations.write_seg_nrrd(folder / "labelsTr" / f"{case_id}.seg.nrrd", swapped, geometry,
                                       {0: "background", 1: "small", 2: "big"})
        else:
            nib.save(nib.Nifti1Image(label, AFFINE), folder / "labelsTr" / f"{case_id}.nii.gz")
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    dataset = write_tiny_dataset(tmp_path / "ds", num_train=4, num_test=0)
    prepare(dataset, tmp_path / "store", data_config(target_spacing=(2.0, 2.0, 3.0)))
    return tmp_path / "store"


def test_adding_cases_updates_the_store_without_rewriting_existing_cases(store, tmp_path):
    before, manifest_before = case_files(store), (store / "manifest.json").read_bytes()
    source = write_corrections(tmp_path / "corrected", {"new_a": 10, "new_b": 11}, seg_nrrd=("new_b",))
    result = medseg("dataset", "add", "--store", store, "--source", source)
    assert result.returncode == 0, result.stderr
    assert "version 2" in result.stdout

    after = Store(store)
    assert after.version == 2 and after.case_ids == ["new_a", "new_b", "tiny_000", "tiny_001", "tiny_002", "tiny_003"]
    unchanged = {name: value for name, value in case_files(store).items() if name in before}
    assert unchanged == before  # not one existing case file rewritten (bytes and modification times)
    # version 1 is kept as it was: an earlier run reads the same cases
    old = Store(store, version=1)
    assert old.case_ids == ["tiny_000", "tiny_001", "tiny_002", "tiny_003"]
    assert old.manifest["cases"] == json.loads(manifest_before)["cases"]
    # the new cases are preprocessed with the store's own plan; the segmentation's segments matched by name
    for case_id, seed in (("new_a", 10), ("new_b", 11)):
        image, label = make_tiny_case(seed)
        pre = preprocess.preprocess_case(image[..., None], (2.0, 2.0, 3.0), after.plan, label)
        stored_image, stored_label = after.read_case(case_id)
        assert np.array_equal(stored_image, pre.image) and np.array_equal(stored_label, pre.label), case_id
        assert after.cases[case_id]["added_in"] == 2
    # the store keeps the files it was made from (the segmentation as a NIfTI label map on the image's grid)
    copied, _ = nifti.read_label(after.source_path(after.cases["new_b"]["source"]["label"]))
    assert np.array_equal(copied, make_tiny_case(11)[1])
    listing = medseg("dataset", "versions", "--store", store)
    assert listing.returncode == 0 and "version 1: medseg prepare: 4 cases" in listing.stdout
    assert "version 2: medseg dataset add: added 2, replaced 0" in listing.stdout


def test_a_bad_case_is_refused_with_one_line_and_nothing_is_written(store, tmp_path):
    before = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    source = write_corrections(tmp_path / "corrected", {"good": 10, "bad": 11})
    image = np.zeros((24, 20, 10), np.float32)  # the label stays 24 x 20 x 14
    nib.save(nib.Nifti1Image(image, AFFINE), source / "imagesTr" / "bad_0000.nii.gz")
    result = medseg("dataset", "add", "--store", store, "--source", source)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bad" in errors[0] and "shape" in errors[0] and "nothing added" in errors[0], \
        result.stderr
    assert {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} == before
    # with --skip-bad the good case goes in and the bad one is reported
    result = medseg("dataset", "add", "--store", store, "--source", source, "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "left out: bad:" in result.stderr
    assert Store(store).case_ids == ["good", "tiny_000", "tiny_001", "tiny_002", "tiny_003"]


def test_a_case_already_in_the_store_needs_replace_and_the_old_one_stays(store, tmp_path):
    old_image, old_label = Store(store).read_case("tiny_001")
    source = write_corrections(tmp_path / "corrected", {"tiny_001": 20})
    with pytest.raises(ValidationFailed, match=r"tiny_001.*already in .*--replace"):
        add_lib.add_cases(store, source)
    assert Store(store).version == 1
    result = add_lib.add_cases(store, source, replace=True)
    assert result["replaced"] == ["tiny_001"] and result["version"] == 2
    new = Store(store)
    assert new.cases["tiny_001"]["directory"] == "tiny_001@v2"
    image, label = make_tiny_case(20)
    assert np.array_equal(new.read_case("tiny_001")[1], preprocess.preprocess_case(
        image[..., None], (2.0, 2.0, 3.0), new.plan, label).label)
    kept_image, kept_label = Store(store, version=1).read_case("tiny_001")
    assert np.array_equal(kept_image, old_image) and np.array_equal(kept_label, old_label)


def test_a_segment_that_is_no_label_of_the_dataset_is_refused(store, tmp_path):
    source = write_corrections(tmp_path / "corrected", {"seg": 10}, seg_nrrd=("seg",))
    path = source / "labelsTr" / "seg.seg.nrrd"
    _, geometry = nifti.read_image(source / "imagesTr" / "seg_0000.nii.gz")
    annotations.write_seg_nrrd(path, make_tiny_case(10)[1], geometry, {0: "background", 1: "big", 2: "tumour"})
    with pytest.raises(ValidationFailed, match=r"segment 'tumour' is not a label of this dataset"):
        add_lib.add_cases(store, source)
    with pytest.raises(MedsegError, match=r"--cases nope: no such case"):
        add_lib.add_cases(store, source, ["nope"])


def test_an_interrupted_addition_continues_and_keeps_its_finished_cases(store, tmp_path, monkeypatch):
    source = write_corrections(tmp_path / "corrected", {"new_a": 10, "new_b": 11})
    real = add_lib.prepare_case

    def dies_on_the_second(case, *args):
        if case.case_id == "new_b":
            raise KeyboardInterrupt  # as a kill would stop it, before the new version is committed
        return real(case, *args)

    monkeypatch.setattr(add_lib, "prepare_case", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        add_lib.add_cases(store, source)
    assert Store(store).version == 1 and "new_a" not in Store(store).cases
    finished = case_files(store)
    monkeypatch.setattr(add_lib, "prepare_case", real)
    assert add_lib.add_cases(store, source)["added"] == ["new_a", "new_b"]
    assert {k: v for k, v in case_files(store).items() if k.startswith("cases/new_a/")} == {
        k: v for k, v in finished.items() if k.startswith("cases/new_a/")}
    # `medseg prepare` of the original source again leaves the newer store as it is
    prepare(tmp_path / "ds", store, data_config(target_spacing=(2.0, 2.0, 3.0)))
    assert Store(store).version == 2 and len(Store(store).case_ids) == 6


def test_a_run_keeps_the_store_version_it_started_on(store, tmp_path):
    from medseg_jax import runs
    from medseg_jax.train.loop import train
    from tests.conftest import tiny_config

    config = tiny_config(steps=4)
    config.data.dataset, config.data.store = "", str(store)
    config.data.val_cases = 0
    train(config, tmp_path / "run", stop_at_step=2)
    assert runs.RunDir(tmp_path / "run").store_version() == 1
    add_lib.add_cases(store, write_corrections(tmp_path / "corrected", {"new_a": 10}))
    summary = train(config, tmp_path / "run", resume=True)
    assert summary["store_version"] == 1  # resumed on the cases it started with, not the newest version
    config.data.store_version = 2
    with pytest.raises(MedsegError, match=r"data.store_version.*trains on version 1"):
        train(config, tmp_path / "run", resume=True)
    config.data.store_version = 0
    assert train(config, tmp_path / "new_run")["store_version"] == 2


def test_corrected_pre_annotations_go_back_through_images_and_labels_folders(store, tmp_path):
    """The loop's round trip: scans + `medseg predict --pre-annotations`' folder (CASE.seg.nrrd beside
    CASE_uncertainty.nii.gz and labels.txt), corrected in Slicer, added as they are."""
    scans, pre = tmp_path / "to_annotate", tmp_path / "pre" / "annotations"
    scans.mkdir()
    pre.mkdir(parents=True)
    image, label = make_tiny_case(30)
    nib.save(nib.Nifti1Image(image, AFFINE), scans / "scan_30.nii.gz")
    _, geometry = nifti.read_image(scans / "scan_30.nii.gz")
    annotations.write_seg_nrrd(pre / "scan_30.seg.nrrd", label, geometry, {0: "background", 1: "big", 2: "small"})
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), AFFINE), pre / "scan_30_uncertainty.nii.gz")
    annotations.write_itksnap_labels(pre / "labels.txt", {0: "background", 1: "big", 2: "small"})
    result = medseg("dataset", "add", "--store", store, "--images", scans, "--labels", pre)
    assert result.returncode == 0, result.stderr
    added = Store(store)
    assert added.version == 2 and "scan_30" in added.cases
    pre_label = preprocess.preprocess_case(image[..., None], (2.0, 2.0, 3.0), added.plan, label).label
    assert np.array_equal(added.read_case("scan_30")[1], pre_label)
    both = medseg("dataset", "add", "--store", store, "--source", scans, "--images", scans)
    assert both.returncode == 2 and "either --source" in both.stderr


def test_pictures_are_added_in_their_own_format_at_the_stores_pixel_size(tmp_path):
    """A store of PNG pictures (dataset.json spacing_2d 0.5 mm) takes corrected PNGs from a plain folder: copied as
    PNG, read at the store's pixel size, so they preprocess like the pictures it was prepared from."""
    from PIL import Image

    from tests.test_2d import make_picture, write_png_dataset

    dataset = write_png_dataset(tmp_path / "ds", n_train=3, n_test=0)
    spec = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps(dict(spec, spacing_2d=[0.5, 0.5])))
    prepare(dataset, tmp_path / "store", data_config(target_spacing=(1.0, 1.0, 1.0)))
    source = tmp_path / "corrected"
    (source / "imagesTr").mkdir(parents=True)
    (source / "labelsTr").mkdir()
    image, label = make_picture(9)
    Image.fromarray(image).save(source / "imagesTr" / "new_0000.png")
    Image.fromarray(label).save(source / "labelsTr" / "new.png")
    add_lib.add_cases(tmp_path / "store", source)
    store = Store(tmp_path / "store")
    assert [Path(p).suffix for p in store.cases["new"]["source"]["images"]] == [".png"]
    pre = preprocess.preprocess_case(image.T[:, :, None, None].astype(np.float32), (0.5, 0.5, 1.0), store.plan,
                                     label.T[:, :, None])
    stored_image, stored_label = store.read_case("new")
    assert stored_label.shape == pre.label.shape == (24, 20, 1)  # 48 x 40 pixels of 0.5 mm on a 1 mm grid
    assert np.array_equal(stored_label, pre.label)
    np.testing.assert_allclose(stored_image, pre.image, atol=1e-6)
