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
