"""The ultrasound demo (`medseg demo --modality us`): the CT demo's CPU-sized U-Net and schedule on the built-in 3D
abdominal ultrasound phantoms (liver, gallbladder, portal vein).

The portal vein is about 12 mm across, so the grid is 4 mm (the phantoms are about 2.5 x 2.5 x 3.5 mm); normalisation
is the plan's per-case percentile scaling for ultrasound. Augmentation adds speckle and depth attenuation changes (as
gain settings vary between machines) on top of brightness, contrast and noise; no mirroring, since the beam has a
direction.
"""

from medseg_jax.experiments import demo_ct


def get_config():
    config = demo_ct.get_config()
    # The schedule these demos were measured with (2 patches per step, half of them random, 360 steps); the CT demo's
    # shorter one (issue 17) has not been tried on them.
    config.train.batch_size = 2
    config.data.oversample_foreground = 0.5
    config.train.steps = 360
    config.train.val_every = 120
    config.data.target_spacing = (4.0, 4.0, 4.0)
    config.augment.p_speckle = 0.2
    config.augment.p_attenuation = 0.2
    return config
