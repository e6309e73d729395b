"""The GPU-cluster ablation of "nnU-Net revisited" (arXiv 2404.09556) on MSD Task03_Liver: plain U-Net vs ResEnc-M vs
ResEnc-L, nnU-Net's five folds, one GPU per run.

    medseg prepare --source /data/Task03_Liver --out /data/liver_store --config experiments/msd_liver.py
    medseg sweep msd_liver_architectures --workdir /scratch/liver_arch --config.data.store=/data/liver_store \\
        --executor slurm --partition gpu --max-parallel 15

15 runs of 250,000 steps each (about a day each on one A100 at nnU-Net's settings); `--config.train.steps=...` on the
command line shortens every trial alike. ResEnc-M/L take their stage widths and blocks from the presets; patch and
batch stay at the plain U-Net's 128^3 x 2 here (`medseg plan` per preset would choose their own for a budget).
"""

from medseg_jax.experiments.trials import Sweep
from medseg_jax.models.registry import model_config


def get_sweep():
    topology = {"strides": ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
                "kernel_sizes": ((3, 3, 3),) * 6}
    return Sweep(
        base="msd_liver",
        trials={
            "plain": {},
            "resenc_m": {"model": model_config("resenc_unet", preset="M",
                                               features=(32, 64, 128, 256, 320, 320), **topology)},
            "resenc_l": {"model": model_config("resenc_unet", preset="L",
                                               features=(32, 64, 128, 256, 320, 320), **topology)},
        },
        baseline="plain",
        folds=(0, 1, 2, 3, 4),
        slurm={"gpus_per_node": 1, "timeout_min": 48 * 60, "cpus_per_task": 8, "mem_gb": 64},
    )
