"""The 2D ultrasound demo (`medseg demo --modality us2d`): a 2D U-Net on the built-in B-mode frames (8-bit PNG, the
beam's plane of the 3D ultrasound phantoms at 2.5 mm per pixel: liver, gallbladder, portal vein), sized to train in
a few minutes on a 2-core CPU: 200 training frames (the demo's default for us2d), 1200 steps of 8 patches.

A frame is about 90 x 65 pixels, so one 96 x 64 patch holds nearly all of it; the 2D network is nnU-Net's
PlainConvUNet, narrowed. Augmentation: the ultrasound demo's (brightness, contrast, noise, speckle, depth
attenuation) plus in-plane rotation and scaling; no mirroring along the beam (axis 1).
"""

from medseg_jax.experiments import demo_us
from medseg_jax.models.registry import model_config


def get_config():
    config = demo_us.get_config()
    config.data.target_spacing = (2.5, 2.5, 1.0)  # the frames' own grid (a picture is one slice: z stays 1)
    config.model = model_config("plain_unet", features=(16, 32, 64, 128), deep_supervision=True)
    config.train.patch_size = (96, 64)  # lateral x depth
    config.train.batch_size = 8
    config.data.oversample_foreground = 0.5
    config.train.steps = 1200
    config.train.val_every = 1200
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 20
    config.augment.p_rotation = 0.2
    config.augment.rotation_degrees = 15.0
    config.augment.p_scaling = 0.2
    config.augment.scaling = (0.85, 1.15)
    config.augment.depth_reversed = False  # the probe at the top row: depth grows with the row (canonical y)
    config.infer.batch_size = 4
    return config
