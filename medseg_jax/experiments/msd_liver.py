"""A real task at nnU-Net settings: Medical Segmentation Decathlon Task03_Liver (CT; liver and tumour), the template
to copy for a task of your own (README, "Train on your own dataset").

What nnU-Net v2's planner chose for this dataset's 3d_fullres configuration, in our canonical (X, Y, Z) axis order
(nnU-Net's plans list axes as Z, Y, X): target spacing 0.77 x 0.77 x 1 mm, patch 128^3, six stages of a plain U-Net
(32..320 features, every axis pooled five times), batch 2; training as in base.py (SGD, poly schedule, 1000 epochs x
250 steps = 250,000 steps, nnU-Net's augmentation). For another dataset or GPU, `medseg plan` measures and fills in
patch, topology and batch instead of these numbers.

    medseg prepare --source /data/Task03_Liver --out /data/liver_store --config experiments/msd_liver.py
    medseg train --config experiments/msd_liver.py --workdir runs/liver --config.data.store=/data/liver_store
"""

from medseg_jax.experiments import base


def get_config():
    config = base.get_config("plain_unet")
    config.data.target_spacing = (0.767578125, 0.767578125, 1.0)
    config.data.val_cases = 26  # 131 training cases: one fold of nnU-Net's five held out
    config.model.features = (32, 64, 128, 256, 320, 320)
    config.model.strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    config.model.kernel_sizes = ((3, 3, 3),) * 6
    config.train.patch_size = (128, 128, 128)
    return config
