"""Augmentation benchmark: the JAX `nnunet` pipeline against a scipy.ndimage reference, side by side in one run.

    .venv/bin/python scripts/bench_augment.py            # 128^3 patches, prints a markdown table
    .venv/bin/python scripts/bench_augment.py --write    # also puts it into BENCHMARKS.md

JAX: `make_pipeline("nnunet", patch)` jitted and vmapped over a batch, as inside the train step (input = the
pipeline's `input_size`, i.e. with the rotation margin); samples/s after compilation, median of several batches.
Reference: the same transforms done one sample at a time with scipy.ndimage on the CPU, as batchgenerators does
(rotation + scaling + mirroring as one `affine_transform`, order 3 for the image and 0 for the label; Gaussian noise;
`gaussian_filter` blur; brightness; contrast; low resolution by `zoom` down (order 0) and up (order 3); gamma inverted
and not), drawing nnU-Net v2's probabilities with numpy; transforms whose coin flip fails are skipped, as there.
Both are also run with every transform applied (probability 1) to compare equal work.

The script also times the demo-sized train step with and without augmentation (same batch, same jitted step apart from
the pipeline) to report the share of step time augmentation takes. Absolute times are for this machine only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medseg_jax.augment.pipeline import augment_config, make_pipeline  # noqa: E402
from medseg_jax.augment.spatial import _rotation_matrix  # noqa: E402

NNUNET_P = dict(p_rotation=0.2, p_scaling=0.2, p_mirror=0.5, p_noise=0.1, p_blur=0.2, p_brightness=0.15,
                p_contrast=0.15, p_low_resolution=0.25, p_gamma_inverted=0.1, p_gamma=0.3)


def bg(rng, low, high):
    return rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high)


def reference_sample(rng, image, label, patch, p):
    """One sample with scipy.ndimage (image (X, Y, Z) float32, label (X, Y, Z))."""
    patch = np.asarray(patch)
    angles = rng.uniform(-np.pi / 6, np.pi / 6, 3) if rng.random() < p["p_rotation"] else np.zeros(3)
    scale = rng.uniform(0.7, 1.4) if rng.random() < p["p_scaling"] else 1.0
    mirror = np.where(rng.random(3) < p["p_mirror"], -1.0, 1.0)
    if np.any(angles) or scale != 1.0 or np.any(mirror < 0):
        matrix = np.asarray(_rotation_matrix(jnp.asarray(angles))) / scale @ np.diag(mirror)
        offset = (np.asarray(image.shape) - 1) / 2 - matrix @ ((patch - 1) / 2)
        image = ndi.affine_transform(image, matrix, offset, output_shape=tuple(patch), order=3, mode="constant")
        label = ndi.affine_transform(label, matrix, offset, output_shape=tuple(patch), order=0, mode="constant")
    else:
        start = (np.asarray(image.shape) - patch) // 2
        window = tuple(slice(s, s + q) for s, q in zip(start, patch))
        image, label = image[window], label[window]
    if rng.random() < p["p_noise"]:
        image = image + rng.normal(0, rng.uniform(0, 0.1), image.shape).astype(np.float32)
    if rng.random() < p["p_blur"] and rng.random() < 0.5:
        image = ndi.gaussian_filter(image, rng.uniform(0.5, 1.0, 3))
    if rng.random() < p["p_brightness"]:
        image = image * bg(rng, 0.75, 1.25)
    if rng.random() < p["p_contrast"]:
        mean, low, high = image.mean(), image.min(), image.max()
        image = np.clip((image - mean) * bg(rng, 0.75, 1.25) + mean, low, high)
    if rng.random() < p["p_low_resolution"] and rng.random() < 0.5:
        zoom = rng.uniform(0.5, 1.0)
        small = ndi.zoom(image, zoom, order=0)
        image = ndi.zoom(small, np.asarray(image.shape) / np.asarray(small.shape), order=3)
    for invert, key in ((True, "p_gamma_inverted"), (False, "p_gamma")):
        if rng.random() < p[key]:
            x = -image if invert else image
            mean, std, low = x.mean(), x.std(), x.min()
            span = x.max() - low + 1e-7
            y = ((x - low) / span) ** bg(rng, 0.7, 1.5) * span + low
            y = (y - y.mean()) / (y.std() + 1e-7) * std + mean
            image = -y if invert else y
    return image.astype(np.float32), label


def time_reference(image, label, patch, p, seconds):
    rng = np.random.default_rng(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        reference_sample(rng, image, label, patch, p)
        count += 1
    return count / (time.perf_counter() - start)


def time_jax(pipeline, image, label, batch, repeats):
    fn = jax.jit(jax.vmap(pipeline))
    images = jnp.broadcast_to(image[None, ..., None], (batch, *image.shape, 1))
    labels = jnp.broadcast_to(label[None], (batch, *label.shape))
    jax.block_until_ready(fn(jax.random.split(jax.random.key(0), batch), images, labels))
    times = []
    for r in range(repeats):
        keys = jax.random.split(jax.random.key(r + 1), batch)
        start = time.perf_counter()
        jax.block_until_ready(fn(keys, images, labels))
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def time_train_step(preset, repeats):
    """Demo-sized train step (U-Net 8..64, 48x48x32, batch 2) with the given augmentation preset."""
    from medseg_jax.config import load_config
    from medseg_jax.models.registry import build_model
    from medseg_jax.parallel import mesh as mesh_lib
    from medseg_jax.train import step as step_lib

    config = load_config(REPO / "experiments" / "demo_ct.py")
    patch = tuple(config.train.patch_size)
    mesh = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(data=1))
    model = build_model(config.model, num_classes=5)
    tx = step_lib.make_optimizer(config.train)
    state = step_lib.create_train_state(model, tx, (1, *patch, 1), jax.random.key(0), mesh)
    pipeline = make_pipeline(preset, patch, num_classes=5) if preset else None
    in_size = pipeline.input_size if pipeline else patch
    train_step = step_lib.make_train_step(model, tx, step_lib.make_loss_fn(config.loss), pipeline,
                                          step_lib.make_schedule(config.train), mesh, state,
                                          step_lib.batch_shapes(2, in_size, 1))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2, *in_size, 1)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, 5, (2, *in_size)).astype(np.int32))}
    state, _ = train_step(state, batch, jax.random.key(0))
    jax.block_until_ready(state.params)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        state, metrics = train_step(state, batch, jax.random.key(r + 1))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def machine() -> str:
    model = "unknown CPU"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    device = jax.devices()[0]
    return (f"{model}, {os.cpu_count()} cores; jax {jax.__version__} on {device.platform} "
            f"({getattr(device, 'device_kind', '')}); Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget of each reference run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", help="raw figures (default: docs/bench_augment_<backend>.json)")
    args = parser.parse_args()

    patch = (args.patch,) * 3
    rows = []
    for label_text, overrides in (("nnunet probabilities", {}), ("every transform applied",
                                                                 {k: 1.0 for k in NNUNET_P})):
        config = augment_config("nnunet")
        config.update(overrides)
        pipeline = make_pipeline(config, patch, num_classes=4)
        rng = np.random.default_rng(0)
        image = ndi.gaussian_filter(rng.normal(size=pipeline.input_size).astype(np.float32), 2)
        label = (image > 0.05).astype(np.int32) + (image > 0.15)
        probabilities = {**NNUNET_P, **overrides}
        ref = time_reference(image, label.astype(np.uint8), patch, probabilities, args.seconds)
        jx = time_jax(pipeline, jnp.asarray(image), jnp.asarray(label), args.batch, args.repeats)
        rows.append((label_text, pipeline.input_size, ref, jx))
        print(f"{label_text}: reference {ref:.2f} samples/s, JAX {jx:.2f} samples/s ({jx / ref:.2f}x)", flush=True)

    step_none = time_train_step(None, args.repeats)
    step_intensity = time_train_step("intensity", args.repeats)
    step_nnunet = time_train_step("nnunet", args.repeats)
    print(f"train step: none {step_none:.3f} s, intensity {step_intensity:.3f} s, nnunet {step_nnunet:.3f} s")

    today = datetime.date.today().isoformat()
    lines = [
        "## Augmentation (scripts/bench_augment.py)",
        "",
        f"- {today}, {machine()}.",
        f"- Command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
        f"- {args.patch}³ float32 patches, 1 channel; JAX: jit + vmap over a batch of {args.batch}, median of "
        f"{args.repeats} batches after compilation; reference: scipy.ndimage one sample at a time "
        "(batchgenerators' way), skipping transforms whose coin flip fails.",
        "",
        "| setting | input size | scipy reference (samples/s) | JAX on this device (samples/s) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for text, size, ref, jx in rows:
        lines.append(f"| {text} | {'×'.join(map(str, size))} | {ref:.2f} | {jx:.2f} | {jx / ref:.2f}× |")
    lines += [
        "",
        "Demo-sized train step (U-Net 8..64, 48×48×32, batch 2), median step time with augmentation inside the step:",
        "",
        "| augmentation | step (s) | vs none |",
        "| --- | --- | --- |",
        f"| none | {step_none:.3f} | — |",
        f"| intensity (demo) | {step_intensity:.3f} | {100 * (step_intensity / step_none - 1):+.1f}% |",
        f"| nnunet | {step_nnunet:.3f} | {100 * (step_nnunet / step_none - 1):+.1f}% |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or REPO / "docs" / f"bench_augment_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": today, "machine": machine(), "command": " ".join(sys.argv), "patch": args.patch, "batch": args.batch,
        "pipelines": [{"setting": text_, "input_size": list(size), "reference_samples_per_s": ref,
                       "jax_samples_per_s": jx, "ratio": jx / ref} for text_, size, ref, jx in rows],
        "train_step_seconds": {"none": step_none, "intensity": step_intensity, "nnunet": step_nnunet}}, indent=1))
    print(f"wrote {out}")
    if args.write:
        path = REPO / "BENCHMARKS.md"
        content = path.read_text()
        heading = lines[0]
        if heading in content:
            start = content.index(heading)
            end = content.find("\n## ", start + len(heading))
            content = content[:start] + text + ("\n" + content[end + 1:] if end != -1 else "")
        else:
            content = content.rstrip("\n") + "\n\n" + text
        path.write_text(content)
        print(f"wrote '{heading}' into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
