"""`medseg export`: trained runs -> a model folder that predicts without the model code.

Each run's forward pass (windows (B, *patch, C) -> logits) is serialised with `jax.export` as StableHLO, batch
polymorphic and lowered for several platforms (cpu and cuda by default), its parameters as a flat list in an .npz
beside it. The folder also holds each run's preprocessing plan, the labels, the postprocessing rules and the jax
version it loads in (model.json); `medseg predict --model DIR` runs it through `predict.ExportedMember`, with the same
sliding window, mirror TTA, resampling back and postprocessing as a run directory, and never imports the flax models.

    MODEL_DIR/model.json             kind, jax version window, labels, postprocessing, one entry per member
    MODEL_DIR/member_N.jaxexport     the serialised forward pass (jax.export.Exported.serialize)
    MODEL_DIR/member_N_params.npz    its parameters p00000, p00001, ... in the exported function's order
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import fileio
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import check_rules
from medseg_jax.predict import EXPORT_KIND, EXPORT_MANIFEST, Predictor, RunMember, read_plan

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export lowers for these; it does not refuse other names


def _serialise(member: RunMember, platforms: Sequence[str]) -> tuple[bytes, list[np.ndarray]]:
    params = jax.device_get(member.params)
    leaves, treedef = jax.tree.flatten(params)

    def forward(flat_params, windows):
        return member.model.apply({"params": jax.tree.unflatten(treedef, flat_params)}, windows, train=False)

    batch, = jax.export.symbolic_shape("b")
    shapes = ([jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype) for leaf in leaves],
              jax.ShapeDtypeStruct((batch, *member.patch, member.in_channels), jnp.float32))
    try:
        exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(*shapes)
    except (ValueError, NotImplementedError) as exc:  # e.g. an unknown platform name
        raise MedsegError(f"--platforms {','.join(platforms)}: cannot lower {member.name} for them "
                          f"({str(exc).splitlines()[0][:200]})") from None
    return exported.serialize(), [np.asarray(leaf) for leaf in leaves]


def export_model(run_dirs: Sequence[str | Path] = (), out: str | Path = "", *, plan: str | Path | None = None,
                 checkpoint: str = "best", platforms: Sequence[str] = PLATFORMS,
                 postprocessing: dict | None = None, overwrite: bool = False) -> dict:
    """Exports the runs (an ensemble when several) or an inference plan's runs and postprocessing into `out`;
    returns the manifest. Written into a temporary folder renamed at the end, so `out` is complete or absent."""
    out = Path(out)
    if bool(run_dirs) == (plan is not None):
        raise MedsegError("give the models to export as --run RUN [--run RUN ...] or --plan PLAN.json")
    if out.exists() and not (overwrite and out.is_dir() and (out / EXPORT_MANIFEST).is_file()):
        raise MedsegError(f"--out {out}: already exists; choose a new folder"
                          + (" (or pass --overwrite to replace an exported model)" if out.is_dir() else ""))
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if unknown or not platforms:
        raise MedsegError(f"--platforms {','.join(platforms)}: choose from {', '.join(KNOWN_PLATFORMS)}")
    check_rules(postprocessing, "--postprocessing")
    if plan is not None:
        content = read_plan(plan)
        run_dirs = [Path(plan).parent / run for run in content["runs"]]
        checkpoint = content.get("checkpoint", "latest")
        postprocessing = content.get("postprocessing") if postprocessing is None else postprocessing
    members = [RunMember(run, checkpoint) for run in run_dirs]
    # the same checks as prediction's ensemble (labels, regions, channels), before anything is written
    ensemble = Predictor(members, postprocessing, source=" + ".join(str(m.path) for m in members))
    with fileio.atomic_dir(out) as tmp:
        entries = []
        started = time.perf_counter()
        for index, member in enumerate(members):
            blob, leaves = _serialise(member, platforms)
            forward_name, params_name = f"member_{index}.jaxexport", f"member_{index}_params.npz"
            (tmp / forward_name).write_bytes(blob)
            np.savez(tmp / params_name, **{f"p{i:05d}": leaf for i, leaf in enumerate(leaves)})
            entries.append({
                "name": member.name, "source_run": str(member.path.resolve()), "checkpoint": checkpoint,
                "forward": forward_name, "params": params_name, "plans": member.plans, "regions": member.regions,
                "patch_size": list(member.patch), "in_channels": member.in_channels,
                "num_outputs": member.num_outputs, "overlap": member.overlap, "batch_size": member.batch_size,
                # TTA is applied around the exported call at prediction time (the run's default axes), not baked in
                "mirror_axes": list(member.mirror_axes), "parameters": int(sum(leaf.size for leaf in leaves)),
            })
        manifest = {
            "kind": EXPORT_KIND, "format_version": FORMAT_VERSION,
            "jax_version": jax.__version__,
            # jax loads serialised exports for at least six months of releases after the one that wrote them, never
            # in an older jax (https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees)
            "loads_in": f"jax >= {jax.__version__} (about six months of releases)",
            "platforms": list(platforms), "labels": ensemble.plans["labels"], "regions": ensemble.regions,
            "postprocessing": postprocessing, "members": entries,
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        fileio.write_json(tmp / EXPORT_MANIFEST, manifest)
        if out.exists():  # --overwrite: the earlier export goes only once the new one is complete
            shutil.rmtree(out)
    manifest["size_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    return manifest


def describe(manifest: dict) -> str:
    members = manifest["members"]
    size = manifest.get("size_bytes", 0) / 2**20
    return (f"{len(members)} model{'s' if len(members) > 1 else ''} ({sum(m['parameters'] for m in members):,} "
            f"parameters, {size:.1f} MiB) for {', '.join(manifest['platforms'])}, jax {manifest['jax_version']}; "
            f"labels {json.dumps(manifest['labels'])}")
