"""Inference at nnU-Net grade: mirror TTA, ensembles of runs, saved probabilities and `medseg ensemble`,
postprocessing rules, export without the model code, DICOM-SEG output."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import check_rules, postprocess
from medseg_jax.infer.tta import mirror_combinations, mirrored
from medseg_jax.models.unet import UNet
from medseg_jax.predict import predict
from tests.conftest import REPO, tiny_config


def _labels(path):
    return np.asarray(nib.load(path).dataobj)


# --- mirror TTA ------------------------------------------------------------------------------------------------------

def test_mirror_combinations_enumerate_every_flip_once():
    assert mirror_combinations(()) == [()]
    combos = mirror_combinations((2, 0, 1))
    assert len(combos) == 8 and combos[0] == () and len(set(combos)) == 8
    assert (0, 1, 2) in combos and (1,) in combos


def test_mirrored_forward_is_the_mean_of_flipped_passes():
    model = UNet(num_classes=3, features=(4, 8))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 8, 1)))
    apply = lambda x: model.apply(variables, x)
    windows = np.random.default_rng(0).normal(size=(2, 16, 16, 8, 1)).astype(np.float32)
    expected = np.zeros((2, 16, 16, 8, 3), np.float32)
    for combo in mirror_combinations((0, 1, 2)):
        axes = [a + 1 for a in combo]
        expected += np.flip(np.asarray(apply(np.flip(windows, axes))), axes)
    got = np.asarray(jax.jit(mirrored(apply, (0, 1, 2)))(windows))
    np.testing.assert_allclose(got, expected / 8, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, np.asarray(apply(windows)), atol=1e-4)  # mirroring does change the logits


def test_mirror_axes_config_is_checked():
    from medseg_jax.config import load_config
    from medseg_jax.experiments.schema import check

    demo = REPO / "experiments" / "demo_ct.py"
    with pytest.raises(MedsegError, match="infer.mirror_axes"):
        check(load_config(demo, ["--config.infer.mirror_axes=(0,3)"]))
    with pytest.raises(MedsegError, match="twice"):
        check(load_config(demo, ["--config.infer.mirror_axes=(1,1)"]))
    assert tuple(check(load_config(demo, ["--config.infer.mirror_axes="])).infer.mirror_axes) == ()


def test_runs_mirror_only_the_axes_their_training_mirrored(two_runs):
    from medseg_jax.predict import RunMember, configured_mirror_axes

    first, _ = two_runs
    assert RunMember(first, "latest").mirror_axes == ()  # the tiny runs train with the "intensity" preset
    assert RunMember(first, "latest", mirror_axes=(0, 2)).mirror_axes == (0, 2)  # asked for explicitly
    config = tiny_config()
    config.augment.p_mirror, config.augment.mirror_axes = 0.5, (0, 2)
    assert configured_mirror_axes(config) == (0, 2)
    config.infer.mirror_axes = (1, 2)
    assert configured_mirror_axes(config) == (2,)


# --- ensembles, probabilities, medseg ensemble ----------------------------------------------------------------------

def test_ensemble_of_runs_averages_their_saved_probabilities(two_runs, tiny_dataset, tmp_path):
    first, second = two_runs
    inputs = tiny_dataset / "imagesTs"
    for name, run in (("a", first), ("b", second)):
        predict(run, inputs, tmp_path / name, save_probabilities=True, mirror_axes=())
    predict([first, second], inputs, tmp_path / "ab", mirror_axes=())
    assert main(["ensemble", "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                 str(tmp_path / "ens")]) == 0
    for source in sorted(inputs.glob("*.nii.gz")):
        case = source.name[:-len(".nii.gz")]
        with np.load(tmp_path / "a" / f"{case}.npz") as a, np.load(tmp_path / "b" / f"{case}.npz") as b:
            pa, pb = a["probabilities"].astype(np.float32), b["probabilities"].astype(np.float32)
        assert pa.shape == nib.load(source).shape + (3,)  # the source file's voxel order
        np.testing.assert_allclose(pa.sum(-1), 1.0, atol=2e-3)
        assert np.array_equal(_labels(tmp_path / "a" / source.name), np.argmax(pa, -1))
        direct, mean = _labels(tmp_path / "ab" / source.name), np.argmax((pa + pb) / 2, -1)
        assert np.mean(direct == mean) > 0.999  # (float16 storage may flip exact ties)
        assert np.mean(_labels(tmp_path / "ens" / f"{case}.nii.gz") == mean) > 0.999
        assert nib.load(tmp_path / "ens" / f"{case}.nii.gz").shape == nib.load(source).shape


def test_ensemble_refuses_runs_with_other_labels(two_runs, tiny_dataset, tmp_path):
    first, second = two_runs
    other = tmp_path / "other"
    shutil.copytree(second, other)
    plans = json.loads((other / "plans.json").read_text())
    plans["labels"] = {"0": "background", "1": "big", "2": "tiny"}
    (other / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(MedsegError, match="same labels"):
        predict([first, other], tiny_dataset / "imagesTs", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedsegError, match="inference plan not found"):
        predict(input_path=tiny_dataset / "imagesTs", output_dir=tmp_path / "out", plan=tmp_path / "missing.json")
    assert not (tmp_path / "out").exists()
    code = main(["ensemble", "--input", str(tmp_path), str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()


def test_plan_postprocessing_is_applied(two_runs, tiny_dataset, tmp_path):
    first, second = two_runs
    rules = {"foreground_largest_component": True, "classes": {"2": {"min_volume_mm3": 1e9}}}
    plan = {"kind": "medseg inference plan", "runs": [str(first), str(second)], "checkpoint": "latest",
            "postprocessing": rules}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["predict", "--plan", str(tmp_path / "plan.json"), "--input", str(tiny_dataset / "imagesTs"),
                 "--output", str(tmp_path / "out"), "--disable-tta"]) == 0
    predict([first, second], tiny_dataset / "imagesTs", tmp_path / "raw", mirror_axes=(), checkpoint="latest")
    for path in sorted((tmp_path / "raw").glob("*.nii.gz")):
        raw, processed = _labels(path), _labels(tmp_path / "out" / path.name)
        spacing = nib.load(path).header.get_zooms()[:3]
        assert np.array_equal(processed, postprocess(raw, rules, spacing))
        assert not (processed == 2).any()


def test_postprocessing_rules_on_constructed_maps():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[5, 5, 5] = 0  # a hole inside class 1
    labels[15:17, 15:17, 15:17] = 1  # a small second component, 8 voxels
    labels[12:14, 2:4, 2:4] = 2
    filled = postprocess(labels, {"classes": {"1": {"fill_holes": True}}})
    assert filled[5, 5, 5] == 1 and (filled != labels).sum() == 1
    # 8 voxels of 2 x 2 x 2 mm = 64 mm3: removed under 65 mm3, kept under 64
    small_gone = postprocess(labels, {"classes": {"1": {"min_volume_mm3": 65}}}, spacing=(2, 2, 2))
    assert not small_gone[15:17, 15:17, 15:17].any() and small_gone[2, 2, 2] == 1
    assert np.array_equal(postprocess(labels, {"classes": {"1": {"min_volume_mm3": 64}}}, spacing=(2, 2, 2)), labels)
    largest = postprocess(labels, {"foreground_largest_component": True})
    assert not largest[12:14, 2:4, 2:4].any() and not largest[15:17, 15:17, 15:17].any()
    with pytest.raises(MedsegError, match="postprocessing"):
        check_rules({"classes": {"1": {"fill_hole": True}}}, "rules.json")


# --- export ----------------------------------------------------------------------------------------------------------

def test_exported_model_predicts_like_its_run_without_the_model_code(two_runs, tiny_dataset, tmp_path):
    first, _ = two_runs
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "model")]) == 0
    manifest = json.loads((tmp_path / "model" / "model.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda"] and manifest["jax_version"] == jax.__version__
    inputs = tiny_dataset / "imagesTs"
    for tta, flag, axes in (("mirror", ["--mirror-axes", "0,1,2"], (0, 1, 2)), ("none", ["--disable-tta"], ())):
        assert main(["predict", "--run", str(first), "--input", str(inputs), "--output", str(tmp_path / f"run-{tta}"),
                     *flag]) == 0
        # predicted in a fresh interpreter that must never import the model code (or flax)
        script = (
            "import sys, json\n"
            "from medseg_jax.predict import predict\n"
            f"predict(model={str(tmp_path / 'model')!r}, input_path={str(inputs)!r}, "
            f"output_dir={str(tmp_path / f'model-{tta}')!r}, mirror_axes={axes})\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('medseg_jax.models', 'flax')))))\n")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
        for path in sorted(inputs.glob("*.nii.gz")):
            assert np.array_equal(_labels(tmp_path / f"model-{tta}" / path.name),
                                  _labels(tmp_path / f"run-{tta}" / path.name)), (tta, path.name)


def test_export_refusals_write_nothing(two_runs, tiny_dataset, tmp_path):
    first, second = two_runs
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "model"), "--platforms", "cpu"]) == 0
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "model")]) == 2  # exists
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "bad"), "--platforms", "nonesuch"]) == 2
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))  # no half-written export left
    manifest_path = tmp_path / "model" / "model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["jax_version"] = "99.0.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MedsegError, match="newer than this jax"):
        predict(model=tmp_path / "model", input_path=tiny_dataset / "imagesTs", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedsegError, match="not an exported model|cannot read"):
        predict(model=first, input_path=tiny_dataset / "imagesTs", output_dir=tmp_path / "out")
    other = tmp_path / "other"
    shutil.copytree(second, other)
    plans = json.loads((other / "plans.json").read_text())
    plans["labels"]["2"] = "tiny"
    (other / "plans.json").write_text(json.dumps(plans))
    assert main(["export", "--run", str(first), "--run", str(other), "--out", str(tmp_path / "ens")]) == 2
    assert not (tmp_path / "ens").exists() and not list(tmp_path.glob(".ens*"))


# --- DICOM-SEG -------------------------------------------------------------------------------------------------------

def test_dicom_series_predicted_as_dicom_seg(two_runs, tiny_dataset, tmp_path):
    from medseg_jax.io import dicom
    from medseg_jax.io.dicom_seg import read_dicom_seg

    first, _ = two_runs
    source = sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))[0]
    image = nib.load(source)
    series = tmp_path / "series" / "case_a"
    dicom.write_series(series, np.round(np.asarray(image.dataobj)), image.affine)
    assert main(["predict", "--run", str(first), "--input", str(series.parent), "--output", str(tmp_path / "nii"),
                 "--disable-tta"]) == 0
    assert main(["predict", "--run", str(first), "--input", str(series.parent), "--output", str(tmp_path / "seg"),
                 "--disable-tta", "--output-format", "dicom-seg"]) == 0
    from medseg_jax.io import nifti

    expected, _ = nifti.read_label(tmp_path / "nii" / "case_a.nii.gz")
    labels, names = read_dicom_seg(tmp_path / "seg" / "case_a.dcm", series)
    assert np.array_equal(labels, expected) and (expected > 0).any()
    assert names == {1: "big", 2: "small"}
    # a NIfTI input cannot become a DICOM-SEG: refused before anything is computed
    assert main(["predict", "--run", str(first), "--input", str(source), "--output", str(tmp_path / "bad"),
                 "--output-format", "dicom-seg"]) == 2
    assert not (tmp_path / "bad").exists()
