"""Writes docs/augmentations.png: every augmentation applied alone, at a visible strength, to one demo phantom.

    .venv/bin/python scripts/augment_grid.py [--out docs/augmentations.png]

CT transforms on a CT phantom, MRI artifacts on an MRI phantom, ultrasound artifacts on an ultrasound phantom; each
panel is the middle axial slice of a 96x96x48 patch (label contour in the spatial panels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medseg_jax.augment.pipeline import augment_config, make_pipeline  # noqa: E402
from medseg_jax.data import preprocess  # noqa: E402
from medseg_jax.data.phantoms import generate_case  # noqa: E402
from medseg_jax.io import geometry as geometry_lib  # noqa: E402

PATCH = (96, 96, 48)
ALL_OFF = {k: 0.0 for k in augment_config("nnunet") if k.startswith("p_")}

# (title, modality, parameter overrides applied to an all-off config)
PANELS = [
    ("original", "ct", {}),
    ("rotation 25°", "ct", {"p_rotation": 1.0, "rotation_degrees": 25.0}),
    ("scaling", "ct", {"p_scaling": 1.0, "scaling": (1.3, 1.4)}),
    ("elastic", "ct", {"p_elastic": 1.0, "elastic_magnitude": 2.5}),
    ("mirror", "ct", {"p_mirror": 1.0, "mirror_axes": (0,)}),
    ("Gaussian noise", "ct", {"p_noise": 1.0, "noise_sigma": (0.3, 0.3)}),
    ("Gaussian blur", "ct", {"p_blur": 1.0, "p_blur_per_channel": 1.0, "blur_sigma": (1.0, 1.0)}),
    ("brightness ×1.25", "ct", {"p_brightness": 1.0, "brightness": (1.25, 1.25)}),
    ("contrast ×0.75", "ct", {"p_contrast": 1.0, "contrast": (0.75, 0.75)}),
    ("low resolution ½", "ct", {"p_low_resolution": 1.0, "p_low_resolution_per_channel": 1.0,
                                "low_resolution_zoom": (0.5, 0.5)}),
    ("gamma 1.5", "ct", {"p_gamma": 1.0, "gamma": (1.5, 1.5)}),
    ("CT calibration shift", "ct", {"p_calibration": 1.0, "calibration_offset": (0.5, 0.5),
                                    "calibration_scale": (1.1, 1.1)}),
    ("CT low-dose noise", "ct", {"p_low_dose": 1.0, "low_dose_sigma": (0.4, 0.4)}),
    ("MRI original", "mri", {}),
    ("MRI bias field", "mri", {"p_bias_field": 1.0, "bias_field_std": (0.4, 0.4)}),
    ("MRI Rician noise", "mri", {"p_rician": 1.0, "rician_sigma": (0.3, 0.3)}),
    ("MRI Gibbs ringing", "mri", {"p_gibbs": 1.0, "gibbs_keep": (0.35, 0.35)}),
    ("MRI k-space spike", "mri", {"p_spike": 1.0, "spike_intensity": (0.15, 0.15)}),
    ("MRI motion ghosting", "mri", {"p_ghosting": 1.0, "ghosting_intensity": (0.8, 0.8),
                                    "ghosting_period": (4, 4)}),
    ("US original", "us", {}),
    ("US speckle", "us", {"p_speckle": 1.0, "speckle_strength": (0.6, 0.6)}),
    ("US acoustic shadow", "us", {"p_shadow": 1.0, "shadow_factor": (0.3, 0.3), "shadow_percentile": 99.0}),
    ("US attenuation + TGC", "us", {"p_attenuation": 1.0, "attenuation": (1.5, 1.5), "tgc_std": 0.3}),
]


def sample(modality: str):
    image, label, affine = generate_case(modality, seed=1)
    geometry = geometry_lib.Geometry.from_affine(affine, image.shape)
    image = geometry_lib.to_canonical(image[..., None], geometry)
    label = geometry_lib.to_canonical(label, geometry)
    scheme = {"ct": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 60.0, "std": 60.0},
              "mri": {"scheme": "zscore"}, "us": {"scheme": "percentile"}}[modality]
    plan = {"normalization": [scheme], "target_spacing": [3.0, 3.0, 3.0], "labels": {"0": "bg"}, "crop": "none"}
    pre = preprocess.preprocess_case(image, geometry.spacing, plan, None)
    volume = pre.image
    lab = preprocess.resize(label.astype(np.int16), volume.shape[:3], order=0)
    pad = [(max(0, (p * 3 // 2 - s + 1) // 2),) * 2 for p, s in zip(PATCH, volume.shape[:3])]
    volume = np.pad(volume, pad + [(0, 0)])
    lab = np.pad(lab, pad)
    return jnp.asarray(volume), jnp.asarray(lab.astype(np.int32))


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "augmentations.png"))
    args = parser.parse_args()
    cases = {m: sample(m) for m in ("ct", "mri", "us")}
    cols = 6
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, modality, overrides) in zip(axes.flat, PANELS):
        config = augment_config("none")
        config.update({**ALL_OFF, **overrides})
        pipeline = make_pipeline(config, PATCH, num_classes=8)
        image, label = cases[modality]
        start = [(s - i) // 2 for s, i in zip(image.shape[:3], pipeline.input_size)]
        window = tuple(slice(s, s + i) for s, i in zip(start, pipeline.input_size))
        out_image, out_label = jax.jit(pipeline)(jax.random.key(3), image[window], label[window])
        z = PATCH[2] // 2
        slice_ = np.asarray(out_image[:, :, z, 0]).T
        low, high = {"ct": (-3, 4), "mri": (-2, 3), "us": (0, 1)}[modality]
        ax.imshow(slice_, cmap="gray", origin="lower", vmin=low, vmax=high)
        if overrides and any(k in overrides for k in ("p_rotation", "p_scaling", "p_elastic", "p_mirror")):
            ax.contour(np.asarray(out_label[:, :, z]).T > 0, levels=[0.5], colors="orange", linewidths=0.6,
                       origin="lower")
        ax.set_title(title, fontsize=9)
    fig.suptitle("medseg-jax augmentations, each applied alone (middle axial slice of a 96×96×48 patch)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
