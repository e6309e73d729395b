"""`medseg demo`: built-in phantoms -> train -> predict on imagesTs -> evaluate against labelsTs -> summary and PNGs.

Outputs under OUT (default runs/demo): data/ (the generated dataset), run/ (the trained run directory, usable with
`medseg predict --run`), predictions/, evaluation/ (per_case.csv, summary.json), overlay.png and summary.json.
An existing OUT is moved aside to OUT.previous-<time>, never overwritten.
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from pathlib import Path

from medseg_jax import config as config_lib
from medseg_jax import experiments, fileio, viz
from medseg_jax.errors import MedsegError
from medseg_jax.experiments import schema
from medseg_jax.metrics.report import dice_table

log = logging.getLogger(__name__)

# (training, test) phantoms per modality where they differ from 20 and 5: 2D frames are cheap, and a frame shows less
# of each structure than a volume does
DEMO_CASES = {"us2d": (200, 20)}


def demo_config_path(modality: str) -> Path:
    """The packaged experiment of the demo for `modality` (experiments/demo_<modality>.py, installed as
    medseg_jax.experiments, so it is found from any working directory and from a non-editable install)."""
    path = Path(importlib.resources.files(experiments).joinpath(f"demo_{modality}.py"))
    if not path.is_file():
        raise MedsegError(f"--modality {modality}: no packaged experiment demo_{modality}.py; pass --config")
    return path


def move_aside(path: Path) -> Path | None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    target = path.with_name(f"{path.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def run_demo(out="runs/demo", modality: str = "ct", num_train: int = 20, num_test: int = 5, seed: int = 0,
             config_path=None, overrides=()) -> dict:
    from medseg_jax.data.phantoms import write_demo_dataset
    from medseg_jax.evaluate import evaluate
    from medseg_jax.io import formats
    from medseg_jax.predict import predict
    from medseg_jax.train.loop import train

    out = Path(out)
    config = schema.check(config_lib.load_config(config_path or demo_config_path(modality), overrides))
    moved = move_aside(out)
    if moved:
        log.info("moved the previous %s to %s", out, moved)
    started = time.time()

    data_dir = write_demo_dataset(out / "data", modality=modality, num_train=num_train, num_test=num_test,
                                  seed=seed)
    log.info("[1/4] wrote %d training and %d test %s phantoms to %s", num_train, num_test, modality.upper(), data_dir)
    config.data.dataset = str(data_dir)

    run_dir = out / "run"
    log.info("[2/4] training (%d steps) in %s", config.train.steps, run_dir)
    train_summary = train(config, run_dir)

    log.info("[3/4] predicting %s -> %s", data_dir / "imagesTs", out / "predictions")
    predict(run_dir, data_dir / "imagesTs", out / "predictions")

    log.info("[4/4] evaluating against %s", data_dir / "labelsTs")
    evaluation = evaluate(out / "predictions", data_dir / "labelsTs", out / "evaluation")

    first = sorted(p for p in (data_dir / "imagesTs").iterdir() if formats.ending_of(p))[0]
    image, geometry = formats.read_image(first)
    reference, _ = formats.read_label(data_dir / "labelsTs" / first.name)
    prediction, _ = formats.read_label(out / "predictions" / first.name)
    label_names = {int(k): v for k, v in evaluation["labels"].items()}
    viz.overlay_png(image[..., 0], reference, prediction, out / "overlay.png", label_names,
                    title=f"{first.name}: scan, reference and prediction", spacing=geometry.spacing)

    summary = {"mean_dice": evaluation["mean_dice"], "per_class": evaluation["per_class"],
               "num_test_cases": evaluation["num_cases"], "num_train_cases": num_train, "modality": modality,
               "train_seconds": train_summary["train_seconds"], "steps": train_summary["steps"],
               "best_val_dice": train_summary["best_val_dice"], "device": train_summary["device"],
               "total_seconds": round(time.time() - started, 1),
               "outputs": {"data": str(data_dir), "run": str(run_dir), "predictions": str(out / "predictions"),
                           "evaluation": str(out / "evaluation"), "overlay": str(out / "overlay.png"),
                           "training_curve": str(run_dir / "training_curve.png")}}
    fileio.write_json(out / "summary.json", summary)
    log.info("\n%s", dice_table(evaluation))
    log.info("\ntrain %.0f s on %s; total %.0f s", summary["train_seconds"], summary["device"],
             summary["total_seconds"])
    log.info("summary: %s   overlay: %s   curve: %s", out / "summary.json", out / "overlay.png",
             run_dir / "training_curve.png")
    return summary
