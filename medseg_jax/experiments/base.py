"""Every experiment key with its default: nnU-Net v2 3d_fullres-like training of a plain U-Net.

An experiment file starts from `get_config()` and changes only what differs (see demo_ct.py, msd_liver.py). Every key
can also be overridden on the command line: `--config.train.steps=1000`; an unknown key is an error.
"""

import ml_collections

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.data.fingerprint import default_data_config
from medseg_jax.losses.registry import loss_config
from medseg_jax.models.registry import model_config
from medseg_jax.parallel.mesh import mesh_config


def get_config(model: str = "plain_unet") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # one root key per run: parameters, augmentation (folded per step) and the patch sampler
    # "segment" (`medseg train`) or "pretrain" (`medseg pretrain`: masked image modelling on images, labels unused);
    # each command sets it, so one experiment file serves both.
    config.task = "segment"

    # Data: planning keys (read when the store is prepared; a store prepared otherwise is refused), then streaming.
    config.data = default_data_config()  # dataset, store, target_spacing, anisotropy_threshold, normalization,
    # label_resampling, chunk_shape: see medseg_jax/data/fingerprint.py
    # Which cases validate (medseg_jax/data/splits.py): "holdout" (the last data.val_cases case ids, sorted), a fold
    # number k of data.num_folds (drawn by data.split_seed, as nnU-Net's 5 folds with seed 12345; or read from
    # data.splits_file, nnU-Net's splits_final.json format) or "all" (every case trains). data.group_regex (its first
    # group, searched in the case id) or data.groups_file (JSON {case: group} or CSV case,group) keep a patient's or
    # site's cases in one fold.
    config.data.fold = "holdout"
    config.data.val_cases = 2
    config.data.num_folds = 5
    config.data.split_seed = 12345
    config.data.splits_file = ""
    config.data.group_regex = ""
    config.data.groups_file = ""
    config.data.prepare_workers = 1  # processes preparing cases when training prepares data.dataset itself
    config.data.oversample_foreground = 0.33  # expected share of each batch centred on a foreground class (nnU-Net)
    config.data.workers = 0  # grain worker processes reading patches (0: in the training process)
    config.data.threads = 2  # reader threads per process (overlap tensorstore reads)
    config.data.prefetch_batches = 2  # batches buffered ahead per process

    # The network (medseg_jax/models/registry.py): plain_unet | resenc_unet | unetr | swin_unetr | segresnet.
    config.model = model_config(model)

    # Loss (medseg_jax/losses/registry.py). name: dice_ce | dice | ce | focal | tversky | focal_tversky |
    # generalized_dice | dice_cldice | dice_boundary; options a loss does not use stay at their defaults.
    config.loss = loss_config("dice_ce")

    # Every parameter of the preset, overridable: --config.augment.p_rotation=0.2 (medseg_jax/augment/pipeline.py).
    # Presets: none | intensity | nnunet | mri_robust | ct_robust | us_robust.
    config.augment = augment_config("nnunet")

    # nnU-Net: SGD with Nesterov momentum 0.99, lr 1e-2 with poly decay, 1000 epochs x 250 steps, batch 2.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 250_000
    config.train.batch_size = 2
    config.train.patch_size = (128, 128, 128)
    config.train.optimizer = "sgd"  # sgd | adamw
    config.train.learning_rate = 1e-2
    config.train.weight_decay = 3e-5
    config.train.schedule = "poly"  # poly | cosine | constant
    config.train.warmup_steps = 0
    config.train.grad_clip = 12.0  # global norm; 0 turns clipping off
    config.train.log_every = 50
    config.train.val_every = 5000
    config.train.checkpoint_every = 1000
    config.train.init_from = ""  # a run directory (trained or imported) whose matching params start fine-tuning
    # What init_from copies: "all" params of matching name and shape, the "encoder"'s only, or "auto" (the encoder
    # from a `medseg pretrain` run, all from any other). The transferred encoder can stay fixed (freeze_encoder), learn
    # at encoder_lr_scale x the learning rate, and wait encoder_warmup_steps steps (then as many again to ramp in)
    # while the new decoder and head warm up.
    config.train.init_parts = "auto"
    config.train.freeze_encoder = False
    config.train.encoder_lr_scale = 1.0
    config.train.encoder_warmup_steps = 0
    # A step with a non-finite loss, gradient or params is never applied (train/divergence.py); then "stop" ends
    # training with an error naming the step, "skip" goes on unless more than max_nonfinite_steps come in a row.
    config.train.nonfinite = "stop"  # stop | skip
    config.train.max_nonfinite_steps = 10

    # Masked image modelling (`medseg pretrain`, train/experiment.py): blocks of mask_block voxels covering mask_ratio
    # of each augmented patch are zeroed, and the network (this model section, one output per image channel, no deep
    # supervision) reconstructs them; the loss counts the masked voxels only (as nnssl's MAE for 3D U-Nets).
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.mask_ratio = 0.6
    config.pretrain.mask_block = (8, 8, 8)

    # Sliding-window inference (validation during training and `medseg predict`).
    config.infer = ml_collections.ConfigDict()
    config.infer.overlap = 0.5
    config.infer.batch_size = 2
    # Mirror test-time augmentation for `medseg predict` (nnU-Net's): the logits of every combination of flips of
    # these patch axes are averaged, in the same compiled call as the windows (8x the work for three axes). Only the
    # axes the training augmentation mirrored are used (augment.mirror_axes when augment.p_mirror > 0), as nnU-Net's
    # allowed mirroring axes; () turns it off; a 2D patch ignores axis 2. Validation during training does not mirror.
    config.infer.mirror_axes = (0, 1, 2)

    # Device mesh (medseg_jax/parallel/mesh.py); `--mesh data=2,space=4` on the command line sets the first two.
    # data: devices on the batch axis (-1: all left after space x space2); space/space2: devices each patch is split
    # over along space_axis/space2_axis; space_levels: U-Net levels split (-1: all); params: replicated | sharded.
    config.mesh = mesh_config()
    return config
