"""The CT demo (`medseg demo`): a narrow 3D U-Net on the built-in abdominal CT phantoms, sized to train in minutes on a
2-core CPU.

Run: medseg train --config experiments/demo_ct.py --workdir runs/my_run --config.data.dataset=DATASET_DIR
"""

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.experiments import base
from medseg_jax.models.registry import model_config


def get_config():
    config = base.get_config()
    # A coarse 5 mm grid so that a 2-core CPU sees enough steps in a few minutes; predictions are still written on each
    # scan's own grid.
    config.data.target_spacing = (5.0, 5.0, 5.0)
    # Every patch centred on a foreground class, drawn evenly among those present: at 5 mm the 48x48x32 patch still
    # holds most of the 66x51x38 abdomen, so background is in every patch, and a short run finds the smallest class
    # (the aorta) only this way: with half the patches random its Dice was still 0 after 200-440 patches in every
    # run tried (BENCHMARKS.md, "Convolution gradients on CPU, and the demo's schedule").
    config.data.oversample_foreground = 1.0
    # nnU-Net's PlainConvUNet, narrowed for a CPU (nnU-Net: features 32..320, planned strides and kernels).
    config.model = model_config("plain_unet", features=(8, 16, 32, 64), deep_supervision=True)
    # Brightness, contrast and noise only: mirroring would swap liver and spleen sides on a CPU budget too small to
    # learn laterality from other context.
    config.augment = augment_config("intensity")
    # One patch per step, 380 steps: as good as the former 2 patches x 360 steps (test Dice 0.882 vs 0.876) in about
    # half its steps' compute (issue 17: `make demo` within 8 minutes on 2 CPU cores).
    config.train.batch_size = 1
    config.train.steps = 380
    config.train.patch_size = (48, 48, 32)
    config.train.optimizer = "adamw"
    config.train.learning_rate = 8e-3
    config.train.weight_decay = 1e-5
    config.train.schedule = "cosine"
    config.train.warmup_steps = 10
    config.train.log_every = 10
    config.train.val_every = 380  # once, at the end: each validation costs seconds a short run cannot spare
    config.train.checkpoint_every = 50
    return config
