"""Region-based training end to end: one sigmoid output per region, painted back into labels for validation and
prediction."""

import nibabel as nib
import numpy as np

from medseg_jax.infer.postprocess import region_labels, to_labels
from medseg_jax.models.registry import output_channels
from tests.conftest import tiny_config


def test_brats_regions_paint_the_innermost_label():
    regions = ((1, 2, 3), (2, 3), (3,))
    assert region_labels(regions) == [1, 2, 3]
    logits = np.full((4, 3), -1.0)
    logits[1, 0] = logits[2, :2] = logits[3, :] = 1.0
    assert to_labels(logits, regions).tolist() == [0, 1, 2, 3]
    assert output_channels(4, regions) == 3 and output_channels(4, None) == 4
    np.testing.assert_array_equal(to_labels(logits), np.argmax(logits, -1))


def test_region_training_validates_and_predicts_labels(tiny_dataset, tmp_path):
    from medseg_jax.config import apply_overrides
    from medseg_jax.predict import predict
    from medseg_jax.train.loop import train

    config = apply_overrides(tiny_config(tiny_dataset, steps=2), ["--config.loss.regions=((1,2),(2,))"])
    summary = train(config, tmp_path / "run")
    assert np.isfinite(summary["best_val_dice"])
    validation = list((tmp_path / "run" / "validation").glob("*.nii.gz"))
    assert validation and set(np.unique(np.asarray(nib.load(validation[0]).dataobj))) <= {0, 1, 2}
    predict(tmp_path / "run", tiny_dataset / "imagesTs", tmp_path / "out")
    outputs = list((tmp_path / "out").glob("*.nii.gz"))
    assert len(outputs) == 2
    for path in outputs:
        assert set(np.unique(np.asarray(nib.load(path).dataobj))) <= {0, 1, 2}


def test_a_region_labelled_dataset_prepares_and_trains_on_its_regions(tmp_path):
    """nnU-Net's region-based dataset.json: the plan keeps the regions, training learns them (one sigmoid output per
    region, `loss.regions` taken from the dataset) and prediction paints them back into the label values."""
    import json

    from medseg_jax import runs
    from medseg_jax.predict import predict
    from medseg_jax.train.loop import train
    from tests.conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "ds", num_train=3, num_test=1, oblique_test=False)
    spec = json.loads((dataset / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "lesion": [1, 2], "core": 2}  # the small structure inside a larger region
    spec["regions_class_order"] = [1, 2]
    (dataset / "dataset.json").write_text(json.dumps(spec))
    summary = train(tiny_config(dataset, steps=4), tmp_path / "run")
    run = runs.RunDir(tmp_path / "run")
    assert run.load_plans()["regions"] == [[1, 2], [2]]
    assert [list(r) for r in run.load_config().loss.regions] == [[1, 2], [2]]
    assert summary["steps"] == 4
    predict(tmp_path / "run", dataset / "imagesTs", tmp_path / "pred", checkpoint="latest")
    predicted = np.asarray(nib.load(tmp_path / "pred" / "tiny_003.nii.gz").dataobj)
    assert set(np.unique(predicted)) <= {0, 1, 2}


def test_every_command_that_builds_a_step_takes_the_datasets_regions():
    from medseg_jax.train.experiment import apply_dataset_regions

    plan = {"regions": [[1, 2], [2]]}
    config = tiny_config()
    assert apply_dataset_regions(config, plan).loss.regions == ((1, 2), (2,))
    own = tiny_config()
    own.loss.regions = ((2,),)
    assert apply_dataset_regions(own, plan).loss.regions == ((2,),)  # the experiment's own regions win
    assert not apply_dataset_regions(tiny_config(), {}).loss.get("regions")
