"""2D vs 3D on the ultrasound phantoms: nnU-Net's 2d configuration (a 2D U-Net on the volumes' slices, predicting
slice by slice) against the 3D one, everything else equal.

    medseg demo-data --out data/us --modality us
    medseg sweep us_2d_vs_3d --workdir runs/us_2d_vs_3d --dataset data/us --folds 0,1

The network is the ultrasound demo's PlainConvUNet (8, 16, 32, 64); its dimension follows the patch: 48 x 48 x 32
voxels for 3D, 64 x 64 pixels (the beam's x-y plane, at the volumes' 4 mm grid) for 2D, whose batch holds 8 slices
for the 3D trial's 2 volumes' patches. The table compares 2d with 3d on the same out-of-fold cases.
"""

from medseg_jax.experiments.trials import Sweep


def get_sweep():
    return Sweep(
        base="demo_us",
        changes={"train.steps": 240, "train.val_every": 240, "train.checkpoint_every": 80, "train.log_every": 40},
        trials={"3d": {"train.patch_size": (48, 48, 32), "train.batch_size": 2},
                "2d": {"train.patch_size": (64, 64), "train.batch_size": 8}},
        baseline="3d",
        folds=(0, 1, 2, 3, 4),
    )
