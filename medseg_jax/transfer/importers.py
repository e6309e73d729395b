"""Run directories from PyTorch-trained weights: what `medseg import nnunet|monai` writes.

The run directory has the layout `medseg train` writes (config.json, plans.json, checkpoints/latest/0), so
`medseg predict --run RUN` uses it as is; `RUN/source.json` records where the weights came from. The directory is built
under a temporary name and renamed at the end: a failed import leaves nothing behind, and an existing directory is
never overwritten.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np

from medseg_jax import fileio, runs
from medseg_jax.data.preprocess import NNUNET_RESAMPLING
from medseg_jax.errors import MedsegError
from medseg_jax.experiments.base import get_config as base_config

log = logging.getLogger(__name__)

_NNUNET_NORMALIZATION = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
                         "RescaleTo01Normalization": "rescale01"}


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise MedsegError(f"{out}: already exists; choose a new run directory (nothing was overwritten)")


def _write_run(out: Path, config: ml_collections.ConfigDict, plans: dict | None, params, source: dict,
               extra_files: dict[str, object] | None = None) -> None:
    with fileio.atomic_dir(out) as tmp:
        run = runs.RunDir(tmp)
        run.save_config(config)
        if plans is not None:
            run.save_plans(plans)
        fileio.write_json(tmp / "source.json", source)
        for name, content in (extra_files or {}).items():
            fileio.write_json(tmp / name, content)
        latest, _ = run.checkpoint_managers()
        runs.save_checkpoint(latest, 0, {"step": np.zeros((), np.int32), "params": jax.tree.map(np.asarray, params)},
                             force=True)
        latest.wait_until_finished()
        latest.close()
        # orbax records absolute paths nowhere in the checkpoint, so the folder can be renamed into place.
        shutil.rmtree(tmp / "checkpoints" / "best", ignore_errors=True)


# --- nnU-Net -------------------------------------------------------------------------------------------------------
def nnunet_axis_permutation(plans: dict) -> list[int]:
    """network axis a <- our axis. nnU-Net reads volumes as (z, y, x) (file axes reversed; SimpleITK and its
    NibabelIO alike) and then applies `transpose_forward`; our axes are the file's axes as nnU-Net's reader saw them:
    RAS-reoriented (NibabelIOWithReorient, and our canonical order), or the file's own order (SimpleITKIO, NibabelIO;
    the imported plan then says "voxel_order": "file")."""
    forward = [int(v) for v in plans.get("transpose_forward", [0, 1, 2])]
    return [2 - forward[a] for a in range(3)]


_NNUNET_RESAMPLING_FN = "resample_data_or_seg_to_shape"  # nnU-Net's default, reproduced by preprocess.resample
# nnU-Net readers that reorient to RAS as we do; the others (SimpleITKIO, NibabelIO) keep the file's voxel order.
_NNUNET_RAS_READERS = ("NibabelIOWithReorient",)


def _configuration(plans: dict, configuration: str) -> dict:
    """An nnU-Net configuration with what it inherits (nnU-Net's PlansManager resolves `inherits_from` the same way)."""
    conf = dict(plans["configurations"][configuration])
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        conf = {**plans["configurations"][parent], **conf}
    return conf


def nnunet_resampling(conf: dict, source: str) -> dict:
    """Our plan's `resampling` entry from an nnU-Net configuration's resampling functions and their kwargs."""
    data = dict(conf.get("resampling_fn_data_kwargs") or {})
    probabilities = dict(conf.get("resampling_fn_probabilities_kwargs") or {})
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        name = conf.get(key, _NNUNET_RESAMPLING_FN)
        if name != _NNUNET_RESAMPLING_FN:
            log.warning("%s: %s is %s; resampling as %s (separate z by the same rule, orders may differ)", source,
                        key, name, _NNUNET_RESAMPLING_FN)
    default = NNUNET_RESAMPLING
    threshold = data.get("separate_z_anisotropy_threshold", default["anisotropy_threshold"])
    return {"scheme": "nnunet", "order": int(data.get("order", default["order"])),
            "order_z": int(data.get("order_z", default["order_z"])),
            "probabilities_order": int(probabilities.get("order", default["probabilities_order"])),
            "probabilities_order_z": int(probabilities.get("order_z", default["probabilities_order_z"])),
            "anisotropy_threshold": float(threshold), "force_separate_z": data.get("force_separate_z")}


def nnunet_mirror_axes(allowed, permutation: list[int]) -> tuple[int, ...]:
    """Our `infer.mirror_axes` from a checkpoint's `inference_allowed_mirroring_axes` (network axes; None: nnU-Net
    does not mirror): network axis a is our canonical axis permutation[a]."""
    return tuple(sorted(permutation[int(a)] for a in allowed)) if allowed else ()


def nnunet_plans_to_ours(model, permutation: list[int]) -> tuple[dict, list[int], int]:
    """(our plans.json, our patch size, batch size) from an nnU-Net configuration."""
    plans, dataset_json = model.plans, model.dataset_json
    conf = _configuration(plans, model.configuration)
    spacing_network, patch_network = conf["spacing"], conf["patch_size"]
    spacing, patch = [0.0] * 3, [0] * 3
    for network_axis, our_axis in enumerate(permutation):
        spacing[our_axis] = float(spacing_network[network_axis])
        patch[our_axis] = int(patch_network[network_axis])
    channel_names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    normalization = []
    intensity = plans.get("foreground_intensity_properties_per_channel", {})
    masks = conf.get("use_mask_for_norm") or [False] * len(channel_names)
    for channel, scheme_name in enumerate(conf["normalization_schemes"]):
        scheme = _NNUNET_NORMALIZATION.get(scheme_name)
        if scheme is None:
            raise MedsegError(f"{model.source}: normalisation '{scheme_name}' is not supported (supported: "
                              f"{', '.join(_NNUNET_NORMALIZATION)})")
        if scheme == "ct":
            stats = intensity[str(channel)]
            normalization.append({"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                                  "mean": stats["mean"], "std": max(stats["std"], 1e-8)})
        elif scheme == "zscore":  # use_mask_for_norm: the (hole-filled) nonzero region of all channels
            normalization.append({"scheme": "zscore", "mask": "nonzero_region" if masks[channel] else "all"})
        else:
            normalization.append({"scheme": scheme})
    labels = {int(v): k for k, v in dataset_json["labels"].items()}
    names = {str(k): v for k, v in sorted(channel_names.items(), key=lambda kv: int(kv[0]))}
    ours = {
        "target_spacing": spacing,
        "modality": next(iter(names.values()), "").lower(),
        "labels": {str(k): labels[k] for k in sorted(labels)},
        "channel_names": names,
        "normalization": normalization,
        "crop": "nonzero",
        "image_resampling": "cubic",
        "label_resampling": "linear",
        "resampling": nnunet_resampling(conf, model.source),
        "chunk_shape": [32, 32, 32],
        "median_shape_after_resampling": [],
    }
    return ours, patch, int(conf.get("batch_size", 2))


def import_nnunet(path, out, fold=None, checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """An nnU-Net v2 result folder / fold folder / checkpoint -> a run directory `out`. Returns a summary."""
    from medseg_jax.transfer.nnunet import read_nnunet

    out = Path(out)
    _refuse_existing(out)
    model = read_nnunet(path, fold, checkpoint_name)
    if model.module.spatial_dims != 3:
        raise MedsegError(f"{model.source}: configuration '{model.configuration}' is 2D; `medseg predict` runs 3D "
                          "networks (load 2D models with medseg_jax.transfer.load_nnunet)")
    permutation = nnunet_axis_permutation(model.plans)
    plans, patch, batch = nnunet_plans_to_ours(model, permutation)
    config = base_config(model.model_config["name"])
    config.model = ml_collections.ConfigDict({**model.model_config, "axis_permutation": permutation})
    config.train.patch_size = tuple(patch)
    config.train.batch_size = batch
    config.data.target_spacing = tuple(plans["target_spacing"])
    # nnU-Net mirrors the same axes in training augmentation and at inference; `medseg predict` uses the axes both
    # keys allow.
    config.infer.mirror_axes = nnunet_mirror_axes(model.mirror_axes, permutation)
    if config.infer.mirror_axes:
        config.augment.mirror_axes = config.infer.mirror_axes
    reader = str(model.plans.get("image_reader_writer", "SimpleITKIO"))
    note = ("network axis a reads our axis axis_permutation[a]; preprocessing, resampling (plans.json 'resampling') "
            "and test-time mirroring (config infer.mirror_axes) follow nnU-Net's")
    if reader not in _NNUNET_RAS_READERS:
        # nnU-Net saw each file in its stored voxel order (its default SimpleITKIO and NibabelIO do not reorient):
        # prediction does the same instead of reorienting to RAS, so scans reach the network as in nnU-Net.
        plans["voxel_order"] = "file"
        note += f"; nnU-Net read its images with {reader}, so the network sees each file's own voxel order"
    source = {"kind": "nnunet", "path": str(Path(path).absolute()), "checkpoint": model.source,
              "configuration": model.configuration, "fold": model.fold,
              "axis_permutation": permutation, "image_reader_writer": reader, "note": note}
    # build_model wraps the network in AxisPermuted, whose params sit under "net".
    _write_run(out, config, plans, {"net": model.params}, source,
               {"nnunet_plans.json": model.plans, "nnunet_dataset.json": model.dataset_json})
    return {"run": str(out), "model": model.model_config["name"], "configuration": model.configuration,
            "patch_size": patch, "target_spacing": plans["target_spacing"],
            "parameters": int(sum(np.size(v) for v in jax.tree.leaves(model.params)))}


# --- MONAI ---------------------------------------------------------------------------------------------------------
def import_monai(arch: str, state_dict_path, out, *, encoder_only: bool = False, config=None,
                 plans_path=None, in_channels: int | None = None, out_channels: int | None = None) -> dict:
    """A MONAI state dict -> a run directory. `config` (an experiment ConfigDict) gives the architecture's settings
    (`model` section) and the patch size; `plans_path` (a store, a run directory or a plans.json) the preprocessing
    that `medseg predict` needs. With `encoder_only` the encoder comes from the file and the rest is initialised from
    the config's seed (for fine-tuning)."""
    from medseg_jax.models.registry import build_model
    from medseg_jax.transfer import load_monai_params

    out = Path(out)
    _refuse_existing(out)
    config = config if config is not None else base_config(arch)
    if config.model.name != arch:
        raise MedsegError(f"config key 'model.name': '{config.model.name}' but --arch {arch}")
    plans = _read_plans(plans_path) if plans_path else None
    if plans:
        for given, planned, what in ((in_channels, len(plans["normalization"]), "--in-channels"),
                                     (out_channels, len(plans["labels"]), "--out-channels")):
            if given is not None and given != planned:
                raise MedsegError(f"{what} {given} disagrees with the plan's {planned} ({plans_path})")
        in_channels, out_channels = len(plans["normalization"]), len(plans["labels"])
    elif in_channels is None or out_channels is None:
        raise MedsegError("give --plans (a store, run directory or plans.json) or both --in-channels and "
                          "--out-channels")
    num_classes = out_channels
    model_section = config.model
    module = build_model(model_section, num_classes=num_classes, in_channels=in_channels,
                         patch_size=config.train.patch_size)
    params, loaded = load_monai_params(arch, state_dict_path, module, in_channels, encoder_only=encoder_only,
                                       seed=config.seed, patch_size=config.train.patch_size)
    source = {"kind": "monai", "arch": arch, "path": str(Path(state_dict_path).absolute()),
              "encoder_only": encoder_only, "pretrained_subtrees": loaded, "in_channels": in_channels,
              "out_channels": out_channels}
    _write_run(out, config, plans, params, source)
    return {"run": str(out), "model": arch, "encoder_only": encoder_only, "pretrained": loaded,
            "parameters": int(sum(np.size(v) for v in jax.tree.leaves(params))), "has_plans": plans is not None}


def _read_plans(path) -> dict:
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "plans.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                plans = json.loads(candidate.read_text())
            except ValueError as exc:
                raise MedsegError(f"{candidate}: not valid JSON ({exc})") from None
            if "labels" not in plans or "normalization" not in plans:
                raise MedsegError(f"{candidate}: not a medseg plans.json (no labels/normalization)")
            return plans
    raise MedsegError(f"{path}: no plans.json (give a store from `medseg prepare`, a run directory or a plans.json)")
