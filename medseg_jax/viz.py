"""PNG figures people look at: training curves and overlays of scan, reference and prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg_jax import fileio  # noqa: E402


def training_curve_png(records: Sequence[dict], path: str | Path) -> None:
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, ax_loss = plt.subplots(figsize=(7, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (Dice + CE)", color="tab:blue")
    if val:
        ax_dice = ax_loss.twinx()
        ax_dice.plot([r["step"] for r in val], [r["val_dice"] for r in val], "o-", color="tab:red",
                     label="validation Dice")
        ax_dice.set_ylabel("validation mean foreground Dice", color="tab:red")
        ax_dice.set_ylim(0, 1)
    ax_loss.set_title("training curve")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def site_curves_png(records: Sequence[dict], path: str | Path) -> None:
    """Federated training: validation Dice of the global model on each site's cases, per round (`val_dice_<site>`
    keys of the "val" records), and their mean."""
    val = [r for r in records if r.get("kind") == "val"]
    sites = sorted({k[len("val_dice_"):] for r in val for k in r if k.startswith("val_dice_")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for site in sites:
        points = [(r["round"], r[f"val_dice_{site}"]) for r in val if f"val_dice_{site}" in r]
        ax.plot(*zip(*points), "o-", label=f"site {site}")
    if val:
        ax.plot([r["round"] for r in val], [r["val_dice"] for r in val], "k--", label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel("validation mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.set_title("federated training: the global model on each site")
    if sites:
        ax.legend(loc="lower right")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _label_colors(num_labels: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(num_labels)]


def _overlay(ax, image_slice, label_slice, num_labels, title):
    ax.imshow(image_slice.T, cmap="gray", origin="lower")
    rgba = np.zeros(label_slice.T.shape + (4,))
    for value, color in zip(range(1, num_labels), _label_colors(num_labels)[1:]):
        rgba[label_slice.T == value] = (*color[:3], 0.45)
    ax.imshow(rgba, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def overlay_png(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, path: str | Path,
                label_names: dict[int, str], title: str = "", spacing: Sequence[float] | None = None) -> None:
    """Axial and coronal slices through the reference's foreground centre: scan, scan + reference, scan + prediction.

    Arrays are canonical (RAS) (X, Y, Z); slices are shown in radiological convention (patient's right on the left).
    """
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, [1, 99])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    foreground = np.argwhere(reference > 0)
    center = foreground.mean(0).round().astype(int) if len(foreground) else np.array(image.shape) // 2
    num_labels = max(label_names) + 1
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.5))
    views = [("axial", lambda a: a[::-1, :, center[2]], (spacing[1] / spacing[0]) if spacing else 1),
             ("coronal", lambda a: a[::-1, center[1], :], (spacing[2] / spacing[0]) if spacing else 1)]
    for row, (name, take, aspect) in enumerate(views):
        _overlay(axes[row, 0], take(image), np.zeros_like(take(reference)), num_labels, f"{name}: scan")
        _overlay(axes[row, 1], take(image), take(reference), num_labels, f"{name}: reference")
        _overlay(axes[row, 2], take(image), take(prediction), num_labels, f"{name}: prediction")
        for ax in axes[row]:
            ax.set_aspect(aspect)
    handles = [matplotlib.patches.Patch(color=c, label=label_names[v])
               for v, c in zip(range(1, num_labels), _label_colors(num_labels)[1:]) if v in label_names]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def uncertainty_montage_png(cases: Sequence[tuple[str, float, dict]], path: str | Path,
                            label_names: dict[int, str]) -> None:
    """One row per (case, priority, {"image", "labels", "entropy", "z"}): the axial slice the model is least sure of,
    the scan, the scan with the predicted structures, and the entropy map (radiological convention)."""
    num_labels = max(label_names) + 1
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, (case, priority, shown) in enumerate(cases):
        image = np.asarray(shown["image"], np.float32)[::-1]
        low, high = np.percentile(image, [1, 99])
        image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
        title = f"#{row + 1} {case} (priority {priority:.2f}), z={shown['z']}"
        _overlay(axes[row, 0], image, np.zeros(image.shape, np.uint8), num_labels, title)
        _overlay(axes[row, 1], image, np.asarray(shown["labels"])[::-1], num_labels, "prediction")
        shown_entropy = axes[row, 2].imshow(np.asarray(shown["entropy"])[::-1].T, cmap="magma", vmin=0, vmax=1,
                                            origin="lower")
        axes[row, 2].set_title("entropy", fontsize=9)
        axes[row, 2].axis("off")
    fig.colorbar(shown_entropy, ax=axes[:, 2].tolist(), fraction=0.04)
    handles = [matplotlib.patches.Patch(color=c, label=label_names[v])
               for v, c in zip(range(1, num_labels), _label_colors(num_labels)[1:]) if v in label_names]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), fontsize=9)
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
