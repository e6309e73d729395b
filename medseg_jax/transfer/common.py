"""Turning a PyTorch state dict (name -> numpy array) into flax params, with every key and shape accounted for.

Torch is channels-first: conv weights are (out, in, *kernel) and a transposed conv's are (in, out, *kernel); flax is
channels-last: (*kernel, in, out). Torch's spatial axes (D, H, W) map in order onto ours (X, Y, Z) because we feed the
same voxel array, only with the channel axis moved last.

`StateDict` hands out tensors by name and remembers which were taken: after conversion `finish()` raises one line naming
keys that were never used (the checkpoint has layers the architecture lacks) and `take` raises on a missing key or a
shape that differs from the flax template, so a mismatched checkpoint never half-loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from medseg_jax.errors import MedsegError


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv{1,2,3}d weight (out, in, *k) -> flax nn.Conv kernel (*k, in, out)."""
    ndim = weight.ndim - 2
    return np.ascontiguousarray(np.transpose(weight, (*range(2, 2 + ndim), 1, 0)))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax nn.Dense kernel (in, out)."""
    return np.ascontiguousarray(weight.T)


def upsample_kernel(weight: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """torch ConvTranspose{2,3}d with kernel == stride, weight (in, out, *k) -> our `UpsampleConv` params
    (`Dense_0/kernel`, `bias`).

    Output voxel s*i + t receives input voxel i times tap t (no overlap when kernel == stride); `depth_to_space`
    unpacks the Dense output channels as (*factors, out), so the kernel becomes (in, *k, out) flattened. The bias is
    one per output channel, as in torch.
    """
    ndim = weight.ndim - 2
    kernel = np.transpose(weight, (0, *range(2, 2 + ndim), 1)).reshape(weight.shape[0], -1)
    return np.ascontiguousarray(kernel), bias


class StateDict:
    """A torch state dict as numpy arrays that records which keys the converter consumed."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "state dict",
                 ignore: Iterable[str] = ()):
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.source = source
        self.used: set[str] = set()
        self.ignored = {k for k in self.tensors if any(k.startswith(p) or k == p for p in ignore)}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor under `key` (as float32 numpy), checked against `shape` (torch layout) when given."""
        if key not in self.tensors:
            raise MedsegError(f"{self.source}: missing key '{key}' that the architecture needs "
                              "(the checkpoint is of a different architecture or configuration)")
        value = self.tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise MedsegError(f"{self.source}: '{key}' has shape {tuple(value.shape)}, the architecture needs "
                              f"{tuple(shape)} (different configuration: check features, channels and kernel sizes)")
        self.used.add(key)
        return value.astype(np.float32)

    def prefixes(self) -> set[str]:
        return {k.rsplit(".", 1)[0] for k in self.tensors}

    def finish(self, allow_unused: Iterable[str] = ()) -> None:
        """Raise if keys were left over (other than ignored ones or those under an allowed prefix)."""
        allowed = tuple(allow_unused)
        left = sorted(k for k in self.tensors
                      if k not in self.used and k not in self.ignored and not k.startswith(allowed))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise MedsegError(f"{self.source}: {len(left)} key(s) the architecture does not have: {shown} "
                              "(the checkpoint is of a different architecture or configuration)")


def set_path(tree: dict, path: Iterable[str], value) -> None:
    """tree[a][b][c] = value, creating the intermediate dicts."""
    *parents, leaf = list(path)
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def check_against_template(params: dict, template, source: str) -> None:
    """Every leaf of the flax template (from `module.init` / `eval_shape`) is present in `params` with its shape."""
    import jax

    flat_template = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(template)}
    flat_params = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(flat_template) - set(flat_params))
    extra = sorted(set(flat_params) - set(flat_template))
    if missing or extra:
        raise AssertionError(f"{source}: converter bug: flax params missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in flat_template.items():
        if tuple(flat_params[key]) != tuple(shape):
            raise MedsegError(f"{source}: converted '{key}' has shape {tuple(flat_params[key])}, "
                              f"the architecture needs {tuple(shape)}")


def split_args(value, argument: str, arch: str) -> tuple[str, dict]:
    """MONAI's `split_args`: "NAME" or ("NAME", {kwargs}) -> (lower-case name, kwargs)."""
    if isinstance(value, str):
        return value.lower(), {}
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], Mapping):
        return value[0].lower(), dict(value[1])
    raise MedsegError(f"{arch} argument '{argument}': expected a name or (name, {{arguments}}), got {value!r}")


def monai_norm(value, argument: str, arch: str) -> dict:
    """MONAI's norm spec ("instance", ("group", {"num_groups": 8}), ...) -> {"kind", "affine", "groups", "eps"} for
    the kinds the library has (torch InstanceNorm without running statistics, GroupNorm); anything else is a one-line
    MedsegError naming `argument`."""
    name, args = split_args(value, argument, arch)
    eps = float(args.pop("eps", 1e-5))
    args.pop("num_channels", None)
    args.pop("num_features", None)
    if name == "instance":
        affine = bool(args.pop("affine", False))  # torch InstanceNorm's default: no scale/bias
        if args.pop("track_running_stats", False):
            raise MedsegError(f"{arch} argument '{argument}': INSTANCE with track_running_stats=True is not "
                              "supported (the library keeps no running statistics)")
        args.pop("momentum", None)
        if args:
            raise MedsegError(f"{arch} argument '{argument}': unsupported INSTANCE arguments {sorted(args)}")
        return dict(kind="instance", affine=affine, groups=8, eps=eps)
    if name == "group":
        if "num_groups" not in args:
            raise MedsegError(f"{arch} argument '{argument}': GROUP needs num_groups, e.g. ('group', "
                              "{'num_groups': 8})")
        groups, affine = int(args.pop("num_groups")), bool(args.pop("affine", True))
        if args:
            raise MedsegError(f"{arch} argument '{argument}': unsupported GROUP arguments {sorted(args)}")
        return dict(kind="group", affine=affine, groups=groups, eps=eps)
    if name in ("batch", "syncbatch"):
        raise MedsegError(f"{arch} argument '{argument}': batch norm is not supported (the library keeps no running "
                          "statistics); use instance or group")
    raise MedsegError(f"{arch} argument '{argument}': '{name}' is not supported (supported: instance, group)")


def monai_norm_fixed_eps(value, argument: str, arch: str) -> dict:
    """`monai_norm` for modules whose norms use torch's default eps 1e-5 only."""
    norm = monai_norm(value, argument, arch)
    if norm["eps"] != 1e-5:
        raise MedsegError(f"{arch} argument '{argument}': only eps 1e-5 (torch's default) is supported")
    return norm
