"""The CT demo (`medseg demo`): a narrow 3D U-Net on the built-in abdominal CT phantoms, sized to train in minutes on a
2-core CPU.

Run: medseg train --config experiments/demo_ct.py --workdir runs/my_run --config.data.dataset=DATASET_DIR
"""

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.experiments import base
from medseg_jax.models.registry import model_config


def get_config():
    config = base.get_config()
    # A coarse 5 mm grid so that a 2-core CPU sees enough steps in ten minutes; predictions are still written on each
    # scan's own grid.
    config.data.target_spacing = (5.0, 5.0, 5.0)
    config.data.oversample_foreground = 0.5
    # nnU-Net's PlainConvUNet, narrowed for a CPU (nnU-Net: features 32..320, planned strides and kernels).
    config.model = model_config("plain_unet", features=(8, 16, 32, 64), deep_supervision=True)
    # Brightness, contrast and noise only: mirroring would swap liver and spleen sides on a CPU budget too small to
    # learn laterality from other context.
    config.augment = augment_config("intensity")
    config.train.steps = 360
    config.train.patch_size = (48, 48, 32)
    config.train.optimizer = "adamw"
    config.train.learning_rate = 8e-3
    config.train.weight_decay = 1e-5
    config.train.schedule = "cosine"
    config.train.warmup_steps = 10
    config.train.log_every = 10
    config.train.val_every = 120
    config.train.checkpoint_every = 50
    return config
