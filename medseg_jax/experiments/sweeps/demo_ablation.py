"""A CPU-sized ablation on the CT phantoms: loss (Dice + CE, Dice, focal) x augmentation (intensity, ct_robust).

    medseg demo-data --out data/ct --modality ct
    medseg sweep demo_ablation --workdir runs/ablation --dataset data/ct --folds 0,1

Each trial is the demo experiment (experiments/demo_ct.py) made smaller (an 8 mm grid, a 32 x 32 x 24 patch, 150
steps) so that six trials x two folds finish on a 2-core CPU in about half an hour; the folds are nnU-Net's five
(seed 12345), of which `--folds 0,1` runs two. The table compares every trial with dice_ce-intensity on the same
out-of-fold cases.
"""

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.experiments.trials import Sweep, product


def get_sweep():
    return Sweep(
        base="demo_ct",
        # the demo experiment at a coarser 8 mm grid (32 x 32 x 24 voxels hold the abdomen) and 150 steps: a few
        # minutes per run on a 2-core CPU
        # (2 patches per step, half of them random: the demo's schedule when this sweep's results were measured)
        changes={"data.target_spacing": (8.0, 8.0, 8.0), "train.patch_size": (32, 32, 24), "train.steps": 150,
                 "train.batch_size": 2, "data.oversample_foreground": 0.5,
                 "train.learning_rate": 1e-2, "train.val_every": 150, "train.checkpoint_every": 50,
                 "train.log_every": 25},
        trials=product(
            {"dice_ce": {"loss.name": "dice_ce"}, "dice": {"loss.name": "dice"}, "focal": {"loss.name": "focal"}},
            {"intensity": {"augment": augment_config("intensity")},
             "ct_robust": {"augment": augment_config("ct_robust")}},
        ),
        baseline="dice_ce-intensity",
        folds=(0, 1, 2, 3, 4),
    )
