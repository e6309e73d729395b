"""A CPU-sized ablation on the CT phantoms: loss (Dice + CE, Dice, focal) x augmentation (intensity, ct_robust).

    medseg demo-data --out data/ct --modality ct
    medseg sweep demo_ablation --workdir runs/ablation --dataset data/ct --folds 0,1

Each trial is the demo experiment (experiments/demo_ct.py) made smaller still (fewer steps, a 32^3 patch, one stage
less) so that six trials x two folds finish on a laptop CPU in well under an hour; the folds are nnU-Net's five
(seed 12345). The table compares every trial with dice_ce-intensity on the same out-of-fold cases.
"""

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.experiments.trials import Sweep, product


def get_sweep():
    return Sweep(
        base="demo_ct",
        changes={"train.steps": 120, "train.val_every": 120, "train.checkpoint_every": 40, "train.log_every": 20,
                 "train.patch_size": (32, 32, 32), "model.features": (8, 16, 32)},
        trials=product(
            {"dice_ce": {"loss.name": "dice_ce"}, "dice": {"loss.name": "dice"}, "focal": {"loss.name": "focal"}},
            {"intensity": {"augment": augment_config("intensity")}, "ct_robust": {"augment": augment_config("ct_robust")}},
        ),
        baseline="dice_ce-intensity",
        folds=(0, 1, 2, 3, 4),
    )
