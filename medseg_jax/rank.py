"""`medseg rank`: which predictions to check, and which scans to annotate next, first.

Every scan is predicted in several test-time views: each model of the ensemble (`--run` several times, or an
inference plan) times each mirroring of the input (the axes the model was trained to mirror, or `--mirror-axes`).
The views' class probabilities on the scan's grid give each case its columns and priority (medseg_jax/qc.py:
entropy, mutual information, disagreement, structure volumes and out-of-distribution intensities) and the report
(ranking.csv, report.json, montage.png).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from medseg_jax import qc
from medseg_jax.errors import MedsegError
from medseg_jax.infer.tta import mirror_combinations
from medseg_jax.io import datasets, formats
from medseg_jax.metrics import uncertainty
from medseg_jax.predict import RunMember, check_inputs, configured_mirror_axes, read_plan


def _members(run_dirs: Sequence[str | Path], plan, checkpoint: str, mirror_axes, mesh) -> list[tuple]:
    """(member without fused mirroring, the flips of its views) per model."""
    if plan is not None:
        content = read_plan(plan)
        run_dirs, checkpoint = [Path(plan).parent / r for r in content["runs"]], content.get("checkpoint", "latest")
    if not run_dirs:
        raise MedsegError("give the models as --run RUN [--run RUN ...] or --plan PLAN.json")
    members = []
    for run_dir in run_dirs:
        member = RunMember(run_dir, checkpoint, mesh, mirror_axes=())
        dims = len(member.patch)
        axes = configured_mirror_axes(member.config) if mirror_axes is None else mirror_axes
        members.append((member, mirror_combinations([a for a in axes if int(a) < dims])))
    first = members[0][0]
    for member, _ in members[1:]:
        if member.plans["labels"] != first.plans["labels"] or member.regions != first.regions:
            raise MedsegError(f"{member.path}: predicts other labels than {first.path}; rank one task at a time")
    return members


def rank(run_dirs: Sequence[str | Path] = (), input_path=None, out_dir=None, *, plan=None, checkpoint: str = "best",
         mirror_axes: Sequence[int] | None = None, mesh: dict | None = None, top: int = 6, overwrite: bool = False,
         skip_bad: bool = False, ood_threshold: float = qc.OOD_THRESHOLD) -> dict:
    """Ranks the scans under `input_path` (see the module docstring); returns report.json's content."""
    inputs = datasets.list_nifti_inputs(input_path)
    out_dir = Path(out_dir)
    qc.check_out_dir(out_dir, overwrite)
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if plan is not None and run_dirs:
        raise MedsegError("give the models as --run RUN [--run RUN ...] or --plan PLAN.json, not both")
    members = _members(run_dirs, plan, checkpoint, mirror_axes, mesh)
    first = members[0][0]
    problems = check_inputs(inputs, channels=first.in_channels)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise MedsegError(f"{problems[0][2]}{more}; nothing written; pass --skip-bad to rank the good inputs")
    bad = {case_id for case_id, _, _ in problems}
    todo = [(case_id, paths) for case_id, paths in inputs if case_id not in bad]
    if not todo:
        raise MedsegError(f"{input_path}: no scan to rank")
    reference = qc.training_reference(qc.training_store(first.config, first.path), str(first.path))

    rows, shown = [], {}
    for case_id, paths in tqdm(todo, desc="ranking", unit="case"):
        image, geometry = formats.read_images(paths, first.plans.get("spacing_2d"))
        statistics = uncertainty.ViewStatistics(independent=bool(first.regions))
        for member, flips in members:
            for view_labels, probabilities in member.views_on_scan(image, geometry, flips):
                statistics.add(probabilities, view_labels)
        row, shown[case_id] = qc.case_row(statistics, image, geometry, first.plans, first.regions, reference)
        rows.append({"case": case_id, "file": str(paths[0]), **row})
    labels = {int(k): str(v) for k, v in first.plans["labels"].items()}
    return qc.write_report(
        rows, shown, out_dir, labels, top=top, ood_threshold=ood_threshold,
        failed=[{"case": c, "problem": m} for c, _, m in problems],
        models=[{"run": str(m.path), "checkpoint": m.checkpoint, "flips": [list(f) for f in flips]}
                for m, flips in members],
        reference=None if reference is None else {"store": reference["store"], "cases": reference["cases"]})
