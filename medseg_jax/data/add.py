"""`medseg dataset add`: corrected or newly annotated cases into a prepared store, incrementally and versioned.

    STORE at version N  +  SOURCE's cases (a dataset folder with dataset.json, or imagesTr/ + labelsTr/ whose labels
    are NIfTI label maps or 3D Slicer segmentations, e.g. `medseg predict --pre-annotations` corrected in Slicer)
      -> every case checked as `medseg prepare` checks it, against the store's labels and channels; a bad case, or
         one already in the store without `replace`: one line per case, nothing written (with `skip_bad` the good
         cases go on and the bad ones are reported)
      -> its raw files copied into STORE/sources/v<N+1>/ (a segmentation becomes a NIfTI label map on the image's
         grid), so the store keeps what it was made from whatever happens to SOURCE
      -> preprocessed with the store's own plan (spacing, normalisation: not planned again) into cases/<id>, or for a
         replaced case into cases/<id>@v<N+1> beside the old one
      -> versions/<N>.json keeps version N; manifest.json becomes version N+1. That rename is the commit: until it the
         store reads as version N, and running the same command again continues (finished cases are kept).

No existing case is rewritten. A run records the store version it trains on (`data.store_version`), so an earlier run
resumes, or is repeated, on the cases it had.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from collections.abc import Sequence
from pathlib import Path

from medseg_jax import fileio
from medseg_jax.data import store as store_lib
from medseg_jax.data.cases import SEG_NRRD, read_segmentation
from medseg_jax.data.prepare import ValidationFailed, map_cases, prepare_case, report_tsv, validate_case
from medseg_jax.errors import MedsegError
from medseg_jax.io import datasets, formats
from medseg_jax.io.datasets import Case, Problem

# a label map in any format the store's datasets may use, or a Slicer segmentation (JPEG: refused when read)
LABEL_ENDINGS = (SEG_NRRD, *formats.ENDINGS)


def _store_labels(store: store_lib.Store) -> dict[int, str]:
    return {int(k): v for k, v in store.plan["labels"].items()}


def _history(manifest: dict) -> list[dict]:
    """A manifest's versions, oldest first (a store no addition has touched is version 1, made by prepare)."""
    return list(manifest.get("history") or [{"version": 1, "cases": len(manifest["cases"]),
                                             "made_by": "medseg prepare"}])


def source_cases(source: Path | None, store: store_lib.Store, problems: list[Problem], images: Path | None = None,
                 labels: Path | None = None) -> list[Case]:
    """The labelled cases to add: `source`, a dataset folder (its dataset.json must declare the store's labels and
    channel count) or, without dataset.json, imagesTr/ + labelsTr/; or the folders `images` (scans, nnU-Net channel
    names or one file per case) and `labels` (CASE.nii.gz or CASE.seg.nrrd, e.g. `medseg predict --pre-annotations`'s
    annotations/ folder once corrected)."""
    if source is None:
        return folder_cases(images, labels, problems)
    if not source.is_dir():
        raise MedsegError(f"{source}: source folder not found")
    store_labels = _store_labels(store)
    if (source / "dataset.json").is_file():
        spec = datasets.load_dataset(source, problems=problems)
        if spec.labels != store_labels:
            raise MedsegError(f"{source / 'dataset.json'}: labels {spec.labels} differ from store {store.root}'s "
                              f"{store_labels}")
        if len(spec.channel_names) != store.num_channels:
            raise MedsegError(f"{source / 'dataset.json'}: {len(spec.channel_names)} channel(s), store "
                              f"{store.root} has {store.num_channels}")
        return list(spec.training)  # (with dataset.json's spacing_2d, if its pictures have one)
    if not (source / "imagesTr").is_dir():
        raise MedsegError(f"{source}: no dataset.json and no imagesTr/ folder; give a dataset folder, or imagesTr/ "
                          "(CASE_0000.nii.gz, ...) with labelsTr/ (CASE.nii.gz or CASE.seg.nrrd)")
    return folder_cases(source / "imagesTr", source / "labelsTr", problems)


def folder_cases(images: Path, labels: Path, problems: list[Problem]) -> list[Case]:
    """A folder of scans and one of their labels (CASE + an image ending, or CASE.seg.nrrd)."""
    if not Path(labels).is_dir():
        raise MedsegError(f"{labels}: labels folder not found")
    cases = []
    for case_id, paths in datasets.list_nifti_inputs(images):
        found = [path for path in (Path(labels) / f"{case_id}{ending}" for ending in LABEL_ENDINGS) if path.is_file()]
        if not found:
            problems.append(Problem(case_id, str(Path(labels) / f"{case_id}.nii.gz"),
                                    f"missing label for {paths[0].name} (CASE.nii.gz, CASE.seg.nrrd, CASE.png, ...)"))
        elif len(found) > 1:
            problems.append(Problem(case_id, str(found[1]), f"two labels for one case ({found[0].name} and "
                                                            f"{found[1].name}); keep one"))
        else:
            cases.append(Case(case_id, paths, found[0]))
    return cases


def _copy(path: Path, target: Path) -> Path:
    with fileio.atomic_path(target, suffix=formats.ending_of(target)) as tmp:
        shutil.copyfile(path, tmp)
    return target


def _import_case(case: Case, folder: Path, label_names: dict[int, str]) -> Case:
    """Copies a case's raw files, in their own formats, into the store's `folder` (imagesTr/, labelsTr/); a Slicer
    segmentation is written as a NIfTI label map on the image's grid. Returns the case as it is in the store (2D
    pictures keep their pixel size)."""
    images = []
    for channel, path in enumerate(case.image_paths):
        images.append(_copy(path, folder / "imagesTr" / f"{case.case_id}_{channel:04d}{formats.ending_of(path)}"))
    if str(case.label_path).endswith(SEG_NRRD):
        label_target = folder / "labelsTr" / f"{case.case_id}.nii.gz"
        label, _ = read_segmentation(case.label_path, label_names)
        _, image_geometry = formats.read_images(tuple(images), case.spacing_2d)
        formats.write_label(label_target, label, image_geometry)
    else:
        label_target = _copy(case.label_path,
                              folder / "labelsTr" / f"{case.case_id}{formats.ending_of(case.label_path)}")
    return Case(case.case_id, tuple(images), label_target, case.spacing_2d)


def _not_copyable(case: Case) -> Problem | None:
    """Why a case's files cannot be copied into the store as they are (found before anything is written)."""
    for path in (*case.image_paths, case.label_path):
        if path.is_dir():
            return Problem(case.case_id, str(path), "a DICOM series cannot be added yet; convert it to NIfTI first")
        if formats.ending_of(path) in (".mhd", ".nhdr"):
            return Problem(case.case_id, str(path), "a header with a separate data file cannot be added yet; convert "
                                                    "it to .mha or .nrrd first")
    return None


def _add_one(case: Case, root: Path, folder: Path, plan: dict, declared: Sequence[int], label_names: dict[int, str],
             extra: dict) -> str:
    """One case: its files into the store, then preprocessed into cases/ (skipped when an interrupted run of the same
    addition finished it already)."""
    directory = store_lib.case_directory({"case_id": case.case_id, **extra})
    stored = _import_case(case, folder, label_names)
    existing = root / "cases" / directory
    if existing.is_dir():
        meta = store_lib.read_case_meta(root, directory) if (existing / "zarr.json").is_file() else {}
        if meta.get("added_in") == extra["added_in"] and meta.get("source", {}).get("images") == [
                str(p.absolute()) for p in stored.image_paths]:
            return case.case_id
        shutil.rmtree(existing)  # left by an addition that never committed (no version holds it)
    prepare_case(stored, root, None, plan, declared, extra)
    return case.case_id


def add_cases(store_path, source=None, case_ids: Sequence[str] | None = None, *, images=None, labels=None,
              replace: bool = False, skip_bad: bool = False, workers: int = 1) -> dict:
    """Adds the cases of `source` (or of the folders `images` and `labels`), all or those named by `case_ids`, to the
    store as a new version; returns a summary."""
    if workers < 1:
        raise MedsegError(f"--workers {workers}: must be at least 1")
    if (source is not None and (images is not None or labels is not None)) or (
            source is None and (images is None or labels is None)):
        raise MedsegError("give either --source DATASET or both --images DIR and --labels DIR")
    root = Path(store_path)
    with fileio.exclusive(root, "being prepared"):
        return _add(root, None if source is None else Path(source), case_ids, replace, skip_bad, workers,
                    None if images is None else Path(images), None if labels is None else Path(labels))


def _add(root: Path, source: Path | None, case_ids: Sequence[str] | None, replace: bool, skip_bad: bool,
         workers: int, images: Path | None = None, labels_dir: Path | None = None) -> dict:
    store = store_lib.Store(root)
    if not store.labelled:
        raise MedsegError(f"{root}: a store of images without labels; cases are added to a labelled store")
    problems: list[Problem] = []
    cases = source_cases(source, store, problems, images, labels_dir)
    if store.plan.get("spacing_2d"):  # pictures without a dataset.json of their own: the store's pixel size
        spacing_2d = tuple(store.plan["spacing_2d"])
        cases = [c if c.spacing_2d else dataclasses.replace(c, spacing_2d=spacing_2d) for c in cases]
    source = source if source is not None else images
    if case_ids:
        known = {c.case_id for c in cases} | {p.case for p in problems}
        unknown = [c for c in case_ids if c not in known]
        if unknown:
            raise MedsegError(f"--cases {unknown[0]}: no such case in {source} (it has "
                              f"{', '.join(sorted(known)[:8]) or 'none'}{', ...' if len(known) > 8 else ''})")
        wanted = set(case_ids)
        cases = [c for c in cases if c.case_id in wanted]
        problems = [p for p in problems if p.case in wanted]
    if not replace:
        for case in [c for c in cases if c.case_id in store.cases]:
            problems.append(Problem(case.case_id, str(case.label_path),
                                    f"case '{case.case_id}' is already in {root} (version {store.version}); pass "
                                    "--replace to add this one in its place (the earlier one stays in the versions "
                                    "that hold it)"))
        cases = [c for c in cases if c.case_id not in store.cases]
    labels = _store_labels(store)
    declared = sorted(labels)
    results = list(map_cases(validate_case, cases, workers, "validating", (declared, store.num_channels, labels)))
    problems += [problem for _, _, problem in results if problem is not None]
    problems += [problem for problem in map(_not_copyable, cases) if problem is not None]
    problems.sort(key=lambda p: (p.case, p.file))
    bad = {p.case for p in problems}
    good = [c for c in cases if c.case_id not in bad]
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValidationFailed(f"{problems[0].line()}{more}; nothing added; fix the bad cases or pass --skip-bad to "
                               "add the good ones", problems)
    if not good:
        raise ValidationFailed(f"{source}: no good cases to add; nothing written", problems)

    version = store.version + 1
    folder = root / "sources" / f"v{version}"
    extras = {c.case_id: {"added_in": version, **({"directory": f"{c.case_id}@v{version}"}
                                                   if c.case_id in store.cases else {})} for c in good}
    store_lib.remove_partial_cases(root)
    for _ in map_cases(_add_one_item, [(c, extras[c.case_id]) for c in good], workers, "adding",
                  (root, folder, store.plan, declared, labels)):
        pass

    # the commit: version N kept under versions/, then the manifest of N+1
    previous = dict(store.manifest, version=store.version)
    history = _history(previous)
    if not store_lib.version_path(root, store.version).is_file():
        fileio.write_json(store_lib.version_path(root, store.version), dict(previous, history=history))
    added = sorted(c.case_id for c in good if c.case_id not in store.cases)
    replaced = sorted(c.case_id for c in good if c.case_id in store.cases)
    if problems:
        fileio.write_text(folder / "validation_report.tsv", report_tsv(problems))
    history.append({"version": version, "added": added, "replaced": replaced, "source": str(source.absolute()),
                    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "made_by": "medseg dataset add"})
    kept = [meta for meta in previous["cases"] if meta["case_id"] not in set(replaced)]
    new = [store_lib.read_case_meta(root, store_lib.case_directory({"case_id": c.case_id, **extras[c.case_id]}))
           for c in good]
    manifest = dict(previous, version=version, history=history,
                    cases=sorted(kept + new, key=lambda meta: meta["case_id"]))
    fileio.write_json(store_lib.version_path(root, version), manifest)
    fileio.write_json(root / "manifest.json", manifest)
    return {"store": str(root), "version": version, "added": added, "replaced": replaced, "problems": problems,
            "cases": len(manifest["cases"])}


def _add_one_item(item: tuple[Case, dict], root: Path, folder: Path, plan: dict, declared: Sequence[int],
                  label_names: dict[int, str]) -> str:
    case, extra = item
    return _add_one(case, root, folder, plan, declared, label_names, extra)


def history(store_path) -> list[dict]:
    """The versions of a store, oldest first: what each added or replaced."""
    return _history(store_lib.Store(store_path).manifest)
