"""The MRI demo (`medseg demo --modality mri`): the CT demo's CPU-sized U-Net and schedule on the built-in T1 head
phantoms (white matter, grey matter, ventricles, lesion).

Head structures are thinner than abdominal organs, so the grid is 4 mm (the phantoms are about 2.5 x 2.5 x 3.2 mm);
normalisation is the plan's per-case z-score inside the head. Augmentation adds the MRI artifacts the phantoms have
(bias field, Rician noise) on top of brightness, contrast and noise.
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
    config.augment.p_bias_field = 0.2
    config.augment.p_rician = 0.1
    return config
