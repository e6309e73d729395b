"""2D end to end: a dataset of PNG pictures trained, predicted and evaluated through the command line; a 2D run
predicting a volume slice by slice (nnU-Net's 2d configuration); 2D augmentation stays in the picture's plane; bad
pictures refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg_jax.augment.pipeline import make_pipeline
from medseg_jax.cli import main
from medseg_jax.data.prepare import ValidationFailed, prepare
from tests.conftest import make_tiny_case, tiny_config, write_tiny_dataset

LABELS = {"background": 0, "disc": 1, "square": 2}


def make_picture(seed: int, shape=(40, 48)):
    """A noisy B-mode-like picture (rows, columns) with a bright disc (1) and a smaller square beside it (2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[0], :shape[1]]
    cy, cx = shape[0] / 2 + rng.uniform(-4, 4), shape[1] / 2 + rng.uniform(-4, 4)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < 81
    square = (abs(y - cy) < 4) & (abs(x - cx - 14 * rng.choice([-1, 1])) < 4) & ~disc
    label = np.zeros(shape, np.uint8)
    label[disc], label[square] = 1, 2
    image = np.clip(60 + 120 * disc + 70 * square + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    return image, label


def write_png_dataset(root: Path, n_train: int = 6, n_test: int = 2) -> Path:
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        image, label = make_picture(i)
        split = "Tr" if i < n_train else "Ts"
        Image.fromarray(image).save(root / f"images{split}" / f"pic_{i:03d}_0000.png")
        Image.fromarray(label).save(root / f"labels{split}" / f"pic_{i:03d}.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "US"}, "labels": LABELS,
                                                   "numTraining": n_train, "file_ending": ".png"}))
    return root


def test_a_png_dataset_trains_predicts_and_evaluates_through_the_cli(tmp_path):
    dataset = write_png_dataset(tmp_path / "ds")
    assert main(["train", "--config", "experiments/demo_ct.py", "--workdir", str(tmp_path / "run"), "--dataset",
                 str(dataset), "--config.train.patch_size=(32,32)", "--config.model.features=(8,16)",
                 "--config.model.deep_supervision=False", "--config.data.target_spacing=(1,1,1)",
                 "--config.train.steps=150", "--config.train.val_every=150", "--config.train.batch_size=4",
                 "--config.data.val_cases=1", "--config.train.log_every=50", "--config.augment.preset=nnunet"]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(dataset / "imagesTs"), "--output",
                 str(tmp_path / "pred")]) == 0
    for i in (6, 7):  # PNG label maps named like the references, the pictures' size, declared values only
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"pic_{i:03d}.png"))
        assert predicted.shape == (40, 48) and set(np.unique(predicted)) <= {0, 1, 2}
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(dataset / "labelsTs"), "--out",
                 str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "per_case.csv") as f:
        dice = [float(row["dice"]) for row in csv.DictReader(f)]
    assert len(dice) == 4 and np.mean(dice) > 0.8, dice  # measured 0.97 (disc 0.99, square 0.95)


def test_a_2d_run_predicts_a_volume_slice_by_slice(tmp_path):
    from medseg_jax.predict import predict
    from medseg_jax.train.loop import train

    dataset = write_tiny_dataset(tmp_path / "ds", num_train=4, num_test=0)
    config = tiny_config(dataset, steps=8)
    config.train.patch_size = (16, 16)  # nnU-Net's 2d configuration: slices of the volumes
    config.model.deep_supervision = False
    train(config, tmp_path / "run")
    image, _ = make_tiny_case(50)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for folder, volume, z0 in (("volume", image, 0), ("slice", image[:, :, 7:8], 7)):
        (tmp_path / folder).mkdir()
        shifted = affine.copy()
        shifted[2, 3] = 3.0 * z0
        nib.save(nib.Nifti1Image(volume, shifted), tmp_path / folder / "scan.nii.gz")
        predict(tmp_path / "run", tmp_path / folder, tmp_path / f"pred_{folder}", checkpoint="latest")
    whole = np.asarray(nib.load(tmp_path / "pred_volume" / "scan.nii.gz").dataobj)
    alone = np.asarray(nib.load(tmp_path / "pred_slice" / "scan.nii.gz").dataobj)
    assert whole.shape == image.shape and alone.shape == (24, 20, 1)
    assert np.array_equal(whole[:, :, 7], alone[:, :, 0])  # each slice predicted on its own, stacked back


def test_2d_augmentation_stays_in_the_pictures_plane():
    pipeline = make_pipeline("nnunet", (24, 24), num_classes=2)
    assert len(pipeline.input_size) == 2 and pipeline.input_size[0] > 24  # a margin for rotations, in-plane only
    h, w = pipeline.input_size
    image = jax.numpy.ones((h, w, 1))
    label = jax.numpy.ones((h, w), jax.numpy.int32)
    for seed in range(8):
        out_image, out_label = pipeline(jax.random.key(seed), image, label)
        assert out_image.shape == (24, 24, 1) and out_label.shape == (24, 24)
        # sampled off the plane, the centre would mix in the zeros around the slice
        assert np.all(np.asarray(out_label)[8:16, 8:16] == 1)


@pytest.mark.parametrize("breakage,words", [
    ("size", "shape"),
    ("palette", "label values [5] are not declared"),
    ("rgb", "3 channels"),
])
def test_a_bad_picture_is_refused_in_one_line_and_nothing_is_written(tmp_path, breakage, words):
    dataset = write_png_dataset(tmp_path / "ds", n_train=3, n_test=0)
    if breakage == "size":
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(dataset / "labelsTr" / "pic_001.png")
    elif breakage == "palette":
        label = make_picture(1)[1]
        label[0, 0] = 5
        picture = Image.fromarray(label, mode="P")
        picture.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9, 200, 200, 0] + [0] * 750)
        picture.save(dataset / "labelsTr" / "pic_001.png")
    else:
        rgb = np.repeat(make_picture(1)[0][..., None], 3, axis=-1)
        Image.fromarray(rgb).save(dataset / "imagesTr" / "pic_001_0000.png")
    with pytest.raises(ValidationFailed) as failure:
        prepare(dataset, tmp_path / "store")
    assert len(failure.value.report) == 1 and "pic_001" in failure.value.report[0], failure.value.report
    assert words in str(failure.value), str(failure.value)
    assert "\n" not in str(failure.value) and not (tmp_path / "store").exists()


def test_evaluate_measures_pictures_in_mm_with_the_datasets_pixel_size(tmp_path):
    from medseg_jax.evaluate import evaluate

    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    label = make_picture(3)[1]
    shifted = np.roll(label, 2, axis=1)  # 2 pixels to the right: 2 x 0.5 mm
    Image.fromarray(label).save(tmp_path / "ref" / "pic.png")
    Image.fromarray(shifted).save(tmp_path / "pred" / "pic.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS, "spacing_2d": [0.5, 3.0]}))
    evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval")
    with open(tmp_path / "eval" / "per_case.csv") as f:
        disc = next(row for row in csv.DictReader(f) if row["name"] == "disc")
    assert float(disc["ref_volume_mm3"]) == pytest.approx(int((label == 1).sum()) * 0.5 * 3.0)
    assert float(disc["hd"]) == pytest.approx(1.0)  # 2 columns of 0.5 mm
