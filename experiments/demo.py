"""The demo experiment: a narrow 3D U-Net on the built-in CT phantoms, sized to train in minutes on a 2-core CPU.

Run: medseg train --config experiments/demo.py --workdir runs/my_run --config.data.dataset=DATASET_DIR
"""

import ml_collections

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.models.registry import model_config


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = ""  # a dataset folder in Decathlon (MSD) or nnU-Net raw layout, prepared into RUN/store
    config.data.store = ""  # or a store made by `medseg prepare` (takes precedence over data.dataset)
    config.data.val_cases = 2  # the last N training cases (sorted by id) are held out for validation
    # Planning (read when the store is prepared; a store prepared otherwise is refused):
    # mm per canonical axis; empty: planned (median, nnU-Net's anisotropy rule). The demo trains at a coarse 5 mm so
    # that a 2-core CPU sees enough steps in ten minutes; predictions are still written on each scan's own grid.
    config.data.target_spacing = (5.0, 5.0, 5.0)
    config.data.anisotropy_threshold = 3.0
    config.data.normalization = "auto"  # auto (by each channel's modality) | ct | zscore | percentile | none
    config.data.label_resampling = "nearest"  # nearest | linear (per class, then argmax)
    config.data.chunk_shape = (32, 32, 32)  # zarr inner chunk of the stored volumes
    config.data.prepare_workers = 1  # processes preparing cases when training prepares data.dataset itself
    # Streaming:
    config.data.oversample_foreground = 0.5  # expected share of each batch centred on a foreground class (nnU-Net 1/3)
    config.data.workers = 0  # grain worker processes reading patches (0: in the training process)
    config.data.threads = 2  # reader threads per process (overlap tensorstore reads)
    config.data.prefetch_batches = 2  # batches buffered ahead per process

    # nnU-Net's PlainConvUNet, narrowed for a CPU (nnU-Net: features 32..320, planned strides and kernels).
    config.model = model_config("plain_unet", features=(8, 16, 32, 64), deep_supervision=True)

    # Loss (medseg_jax/losses/config.py). name: dice_ce | dice | ce | focal | tversky | focal_tversky |
    # generalized_dice | dice_cldice | dice_boundary; options a loss does not use stay at their defaults.
    config.loss = ml_collections.ConfigDict()
    config.loss.name = "dice_ce"
    config.loss.dice_weight = 1.0
    config.loss.ce_weight = 1.0
    config.loss.batch_dice = True  # Dice over the whole batch: steadier for small structures
    config.loss.include_background = False  # nnU-Net: the background's Dice left out
    config.loss.squared_pred = False  # sum(p^2) + sum(g^2) in the Dice denominator (V-Net)
    config.loss.smooth_nr = 1e-5  # Dice smoothing of numerator and denominator
    config.loss.smooth_dr = 1e-5
    config.loss.class_weights = None  # K values, background first: CE, focal and Dice weights (as MONAI's weight)
    config.loss.ignore_label = None  # label value of unannotated voxels (partial labels): they count for nothing
    config.loss.regions = None  # e.g. ((1, 2, 3), (2, 3), (3,)): one sigmoid output per region (BraTS), dice_ce/dice/ce
    config.loss.focal_gamma = 2.0  # focal
    config.loss.focal_alpha = None  # focal: a number (background 1 - alpha, others alpha) or one per class
    config.loss.tversky_alpha = 0.5  # tversky, focal_tversky: weight of false positives
    config.loss.tversky_beta = 0.5  # ... and of false negatives
    config.loss.tversky_gamma = 4.0 / 3.0  # focal_tversky: (1 - TI)^(1/gamma)
    config.loss.gdl_weight_type = "square"  # generalized_dice: square | simple | uniform
    config.loss.cldice_alpha = 0.5  # dice_cldice: (1 - alpha) Dice + alpha clDice
    config.loss.cldice_iterations = 3  # dice_cldice: soft-skeleton iterations (> the structures' radius in voxels)
    config.loss.cldice_smooth = 1.0
    config.loss.boundary_weight = 0.01  # dice_boundary: Dice + weight * boundary loss
    config.loss.boundary_max_distance = 10  # dice_boundary: distance maps capped at this many voxels

    # Every parameter of the preset, overridable: --config.augment.p_rotation=0.2 (see medseg_jax/augment/pipeline.py).
    # The demo uses brightness, contrast and noise only: mirroring would swap liver and spleen sides on a CPU budget too
    # small to learn laterality from other context. Real runs: augment_config("nnunet").
    config.augment = augment_config("intensity")

    config.train = ml_collections.ConfigDict()
    config.train.steps = 360
    config.train.batch_size = 2
    config.train.patch_size = (48, 48, 32)
    config.train.optimizer = "adamw"
    config.train.learning_rate = 8e-3
    config.train.weight_decay = 1e-5
    config.train.schedule = "cosine"
    config.train.warmup_steps = 10
    config.train.grad_clip = 12.0
    config.train.log_every = 10
    config.train.val_every = 120
    config.train.checkpoint_every = 50
    config.train.init_from = ""  # a run directory (trained or imported) whose matching params start fine-tuning

    config.infer = ml_collections.ConfigDict()
    config.infer.overlap = 0.5
    config.infer.batch_size = 2

    # Device mesh (medseg_jax/parallel/mesh.py); `--mesh data=2,space=4` on the command line sets the first two.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data (batch) axis; -1: all devices left after space x space2
    config.mesh.space = 1  # devices each patch is split over along mesh.space_axis (activations split too)
    config.mesh.space_axis = 0  # the volume axis split over `space` (0 = X)
    config.mesh.space2 = 1  # optionally a second split axis
    config.mesh.space2_axis = 1
    config.mesh.space_levels = -1  # U-Net levels split over space (from full resolution); -1: all
    config.mesh.params = "replicated"  # or "sharded": params and optimizer state split over all devices

    return config
