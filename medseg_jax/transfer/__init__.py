"""PyTorch-trained weights into flax: nnU-Net v2 result folders and MONAI state dicts.

    module, variables = load_nnunet("Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres", fold=0)
    module, variables = load_monai("swin_unetr", "model.pt", in_channels=1, out_channels=14, feature_size=48)
    logits = module.apply(variables, x)          # x channels-last (N, *spatial, C)

torch is needed only here (an optional extra); checkpoints are read with `weights_only=True`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.transfer.nnunet import load_checkpoint, load_nnunet, read_nnunet  # noqa: F401

MONAI_ARCHS = {"unetr": "monai_unetr", "swin_unetr": "monai_swin_unetr", "segresnet": "monai_segresnet"}


def _converter(arch: str):
    if arch not in MONAI_ARCHS:
        raise MedsegError(f"--arch {arch}: not a supported MONAI architecture (supported: "
                          f"{', '.join(sorted(MONAI_ARCHS))})")
    return importlib.import_module(f"medseg_jax.transfer.{MONAI_ARCHS[arch]}")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A MONAI/PyTorch state dict file -> {key: float32 array}; accepts {"state_dict": ...} / {"model": ...} wrappers
    and DataParallel's "module." prefix."""
    path = Path(path)
    checkpoint = load_checkpoint(path)
    for wrapper in ("state_dict", "model", "network_weights", "net"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    tensors = {}
    for key, value in checkpoint.items():
        if not hasattr(value, "shape"):
            raise MedsegError(f"{path}: entry '{key}' is not a tensor (is this a state dict?)")
        key = key[len("module."):] if key.startswith("module.") else key
        tensors[key] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return tensors


def load_monai(arch: str, state_dict_path, *, encoder_only: bool = False, **arch_kwargs):
    """(module, variables) for MONAI's `arch` built with MONAI constructor kwargs (in_channels, out_channels,
    img_size, feature_size, ...). With `encoder_only`, only the encoder comes from the file; the rest is initialised
    with seed 0."""
    converter = _converter(arch)
    module = converter.module_from_kwargs(**arch_kwargs)
    params, _ = load_monai_params(arch, state_dict_path, module, int(arch_kwargs.get("in_channels", 1)),
                                  encoder_only=encoder_only, seed=0,
                                  patch_size=arch_kwargs.get("img_size"))
    return module, {"params": params}


def load_monai_params(arch: str, state_dict_path, module, in_channels: int, *, encoder_only: bool, seed: int,
                      patch_size=None) -> tuple[dict, list[str]]:
    """(params, names of the top-level subtrees that came from the file)."""
    converter = _converter(arch)
    tensors = read_state_dict(state_dict_path)
    converted = converter.convert(tensors, module, encoder_only=encoder_only, source=str(state_dict_path))
    if not encoder_only:
        return converted, sorted(converted)
    if patch_size is None:  # position-embedded transformers take exactly their img_size
        patch_size = getattr(module, "img_size", None) or module.total_downsampling()
    shape = tuple(int(v) for v in patch_size)
    params = jax.tree.map(np.asarray, module.init(jax.random.key(seed),
                                                  np.zeros((1, *shape, in_channels), np.float32))["params"])
    _merge(params, converted)
    return params, sorted(converted)


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
