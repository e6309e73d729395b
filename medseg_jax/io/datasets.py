"""Dataset folders in Medical Segmentation Decathlon (MSD) or nnU-Net v2 raw layout, read from their dataset.json.

MSD: dataset.json lists `"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]` and
`"test": ["./imagesTs/y.nii.gz", ...]`; one image file per case, 4D when it has several channels ("modality").
nnU-Net v2: no lists; cases are the `imagesTr/<case>_0000<file_ending>` files, channel c in `<case>_<cccc>`, the label
in `labelsTr/<case><file_ending>`; "channel_names" and "labels" ({"background": 0, ...}) describe them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.io import formats

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    case_id: str
    image_paths: tuple[Path, ...]  # one per channel file; MSD has one (maybe 4D) file
    label_path: Path | None
    spacing_2d: tuple[float, float] | None = None  # mm per pixel of 2D pictures (dataset.json "spacing_2d"), else 1


@dataclass(frozen=True)
class Problem:
    """One bad case in a validation report: which case, which file, what is wrong."""

    case: str
    file: str
    problem: str

    @classmethod
    def from_error(cls, case: str, error: Exception, default_file: str | os.PathLike = "") -> Problem:
        """Splits a MedsegError's "<file>: <problem>" message into its parts."""
        text = str(error)
        head, sep, tail = text.partition(": ")
        if sep and ("/" in head or formats.ending_of(head) is not None or head == str(default_file)):
            return cls(case, head, tail)
        return cls(case, str(default_file), text)

    def line(self) -> str:
        return f"{self.case}: {self.file}: {self.problem}"


@dataclass(frozen=True)
class DatasetSpec:
    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[int, str]  # label value -> name, including 0 (background)
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    file_ending: str
    # images without labels, for pretraining: dataset.json's "unlabelled" list (Decathlon layout) or the
    # imagesUnlabelled folder (nnU-Net layout, channel-suffixed files as imagesTr)
    unlabelled: tuple[Case, ...] = ()
    # region-based labels (nnU-Net's format): the overlapping regions a model learns, one sigmoid output each
    regions: tuple[tuple[int, ...], ...] | None = None

    @property
    def modality(self) -> str:
        """"ct", "mri", "us" or "other", guessed from channel 0's name."""
        name = self.channel_names.get(0, "").lower()
        words = set(re.split(r"[^a-z0-9]+", name))
        if "ct" in words:
            return "ct"
        if any(key in name for key in ("mr", "t1", "t2", "flair", "adc")):
            return "mri"
        if "us" in words or "ultrasound" in name:
            return "us"
        return "other"


def _strip_image_ending(name: str) -> str | None:
    """The file name without its image ending (NIfTI, MetaImage, NRRD or a 2D picture: `formats.ENDINGS`), or None
    for a file of another kind."""
    ending = formats.ending_of(name)
    if ending is None or len(name) <= len(ending):
        return None
    return name[: -len(ending)]


def case_id_from_filename(name: str | os.PathLike) -> str:
    """`liver_003_0000.nii.gz` -> `liver_003`, `liver_003.nii` -> `liver_003`: strips the ending and channel suffix."""
    name = Path(name).name
    stem = _strip_image_ending(name)
    if stem is None:
        stem = name
    match = _CHANNEL_SUFFIX.match(stem)
    return match["case"] if match else stem


def list_nifti_inputs(path: str | os.PathLike) -> list[tuple[str, tuple[Path, ...]]]:
    """Lists prediction / training inputs as `(case_id, channel_files)`, sorted by case id.

    A single .nii/.nii.gz file is one case. In a folder (not recursive), nnU-Net's `_0000`, `_0001`, ... suffixes group
    files into one multi-channel case; plain names are single-channel cases. Every case must have the same number of
    channels, numbered from _0000 without gaps. A DICOM series folder is one case named after the folder; a folder of
    DICOM series folders (and no NIfTI files) is one case per series.
    """
    from medseg_jax.io.dicom import is_dicom_series

    path = Path(path)
    if not path.exists():
        raise MedsegError(f"{path}: not found")
    if path.is_dir() and is_dicom_series(path):
        return [(path.name, (path,))]
    if path.is_dir() and not any(_strip_image_ending(f.name) for f in path.iterdir() if f.is_file()):
        series = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and is_dicom_series(d))
        if series:
            return [(d.name, (d,)) for d in series]
    if path.is_file():
        if _strip_image_ending(path.name) is None:
            raise MedsegError(f"{path}: not an image file (expected one of {', '.join(formats.ENDINGS)})")
        return [(case_id_from_filename(path.name), (path,))]
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for file in sorted(path.iterdir()):
        stem = _strip_image_ending(file.name)
        dangling = file.is_symlink() and not file.exists()  # listed, so that reading it reports it
        if stem is None or file.name.startswith(".") or not (file.is_file() or dangling):
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, -1)
        if channel in groups[case_id] or (groups[case_id] and (channel == -1) != (-1 in groups[case_id])):
            other = next(iter(groups[case_id].values()))
            raise MedsegError(f"{file}: case id '{case_id}' is also used by {other.name}; rename one of them")
        groups[case_id][channel] = file
    if not groups:
        raise MedsegError(f"{path}: no .nii or .nii.gz files (nor {', '.join(formats.ENDINGS[2:])}) in this folder")
    cases = []
    for case_id in sorted(groups):
        files = groups[case_id]
        if -1 in files:
            cases.append((case_id, (files[-1],)))
            continue
        for channel in range(len(files)):
            if channel not in files:
                raise MedsegError(f"{path / f'{case_id}_{channel:04d}'}.nii.gz: missing channel file (found "
                                  f"{', '.join(f.name for f in files.values())}); channels are numbered _0000, "
                                  "_0001, ... without gaps")
        cases.append((case_id, tuple(files[c] for c in range(len(files)))))
    counts = {len(files) for _, files in cases}
    if len(counts) > 1:
        by_count = {len(files): case_id for case_id, files in cases}
        detail = ", ".join(f"'{case_id}' has {n}" for n, case_id in sorted(by_count.items()))
        raise MedsegError(f"{path}: cases have different numbers of channel files ({detail})")
    return cases


# --- dataset.json ---------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MedsegError(f"{path}: not found; a dataset folder needs a dataset.json (MSD or nnU-Net v2 format)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedsegError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise MedsegError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _non_negative_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def check_declared_labels(label: np.ndarray, declared, path) -> None:
    """MedsegError naming `path` when `label` holds values outside `declared` (the dataset's label values)."""
    undeclared = sorted(set(np.unique(label).tolist()) - set(declared))
    if undeclared:
        raise MedsegError(f"{path}: label values {undeclared} are not declared in dataset.json "
                          f"(declared: {sorted(declared)})")


def region_labels(regions: Sequence[Sequence[int]]) -> list[int]:
    """The label each region paints: the smallest of its values that no later region contains (else its largest)."""
    labels = []
    for index, region in enumerate(regions):
        later = set().union(*[set(r) for r in regions[index + 1:]])
        own = sorted(set(int(v) for v in region) - later)
        labels.append(own[0] if own else max(int(v) for v in region))
    return labels


def label_regions(json_path: Path, raw: Any) -> tuple[tuple[int, ...], ...] | None:
    """nnU-Net's region-based labels (BraTS: {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
    "enhancing tumor": 3}): the regions in the order given, background left out; None for plain labels."""
    if not isinstance(raw, dict) or not any(isinstance(v, (list, tuple)) for v in raw.values()):
        return None
    regions = []
    for name, value in raw.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        numbers = [None if isinstance(v, (bool, str)) else _non_negative_int(v) for v in values]
        if not numbers or any(n is None for n in numbers):
            raise MedsegError(f"{json_path}: region '{name}' has value {value!r}; a region lists non-negative integer "
                              "label values, e.g. [1, 2, 3]")
        if numbers == [0]:
            continue
        if 0 in numbers:
            raise MedsegError(f"{json_path}: region '{name}' contains the background value 0")
        regions.append(tuple(sorted(set(numbers))))
    return tuple(regions)


def parse_labels(json_path: Path, raw: Any) -> dict[int, str]:
    """dataset.json's labels as {value: name}. Region-based labels give the label values of the label maps, each
    named after the region that paints it (`region_labels`), or "label V" for a value no region paints."""
    if not isinstance(raw, dict) or not raw:
        raise MedsegError(f"{json_path}: 'labels' must be a non-empty object, e.g. {{\"background\": 0, \"liver\": 1}}")
    regions = label_regions(json_path, raw)
    if regions is not None:
        names = [name for name, value in raw.items() if value not in (0, [0])]
        painted = dict(zip(region_labels(regions), names))
        values = sorted(set().union(*map(set, regions)))
        return {0: "background", **{v: painted.get(v, f"label {v}") for v in values}}
    labels: dict[int, str] = {}
    msd_style = all(isinstance(v, str) for v in raw.values())
    for key, value in raw.items():
        if msd_style:  # {"0": "background", "1": "liver"}
            number, name, shown = _non_negative_int(key), value, key
        else:  # {"background": 0, "liver": 1}
            number, name, shown = _non_negative_int(value), key, value
        if number is None or (not msd_style and isinstance(value, str)):
            raise MedsegError(f"{json_path}: label {name!r} has value {shown!r}; label values must be non-negative "
                              "integers")
        if number in labels:
            raise MedsegError(f"{json_path}: label value {number} is given twice ('{labels[number]}' and '{name}')")
        labels[number] = str(name)
    labels.setdefault(0, "background")
    return dict(sorted(labels.items()))


def _parse_channels(json_path: Path, data: dict) -> dict[int, str]:
    key = "channel_names" if "channel_names" in data else "modality" if "modality" in data else None
    if key is None:
        raise MedsegError(f"{json_path}: missing 'channel_names' (nnU-Net v2) or 'modality' (MSD), e.g. "
                          "{\"0\": \"CT\"}")
    raw = data[key]
    if not isinstance(raw, dict) or not raw:
        raise MedsegError(f"{json_path}: '{key}' must be a non-empty object, e.g. {{\"0\": \"CT\"}}")
    channels = {}
    for index, name in raw.items():
        number = _non_negative_int(index)
        if number is None or not isinstance(name, str):
            raise MedsegError(f"{json_path}: {key}[{index!r}] = {name!r}; expected \"<channel index>\": \"<name>\"")
        channels[number] = name
    if sorted(channels) != list(range(len(channels))):
        raise MedsegError(f"{json_path}: '{key}' indices must be 0, 1, ... without gaps, got {sorted(channels)}")
    return dict(sorted(channels.items()))


def _dataset_file(root: Path, json_path: Path, where: str, relative: Any, allow_dir: bool = False) -> Path:
    """Resolves a path listed in dataset.json, refusing ones that leave the dataset folder.

    With `allow_dir`, a folder (a DICOM series) is accepted too."""
    if not isinstance(relative, str) or not relative:
        raise MedsegError(f"{json_path}: {where} must be a file path string, got {relative!r}")
    if os.path.isabs(relative):
        raise MedsegError(f"{json_path}: {where} '{relative}' is absolute; paths must be relative to the dataset "
                          "folder")
    # Lexical check (not resolve()), so imagesTr may be a symlink to another disk.
    normal = os.path.normpath(relative)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep) or normal == os.curdir:
        raise MedsegError(f"{json_path}: {where} '{relative}' points outside the dataset folder {root}")
    path = root / normal
    if not (path.is_file() or (allow_dir and path.is_dir())):
        raise MedsegError(f"{path}: listed in {json_path.name} as {where} but the file does not exist")
    return path


def _collect(problems: list[Problem] | None, case: str, error: MedsegError, default_file) -> None:
    """Raises `error`, or records it as a problem of `case` when a problems list is given."""
    if problems is None:
        raise error
    problems.append(Problem.from_error(case, error, default_file))


def _entry_case_id(entry: Any, index: int, split: str) -> str:
    image = entry.get("image") if isinstance(entry, dict) else entry
    if isinstance(image, str) and image:
        return case_id_from_filename(image.rstrip("/"))
    return f"{split}[{index}]"


def _msd_cases(root: Path, json_path: Path, data: dict,
               problems: list[Problem] | None = None) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    training = []
    for i, entry in enumerate(data["training"]):
        where = f"training[{i}]"
        try:
            if not isinstance(entry, dict) or "image" not in entry:
                raise MedsegError(f"{json_path}: {where} must be {{\"image\": ..., \"label\": ...}}, got {entry!r}")
            image = _dataset_file(root, json_path, f"{where}.image", entry["image"], allow_dir=True)
            if entry.get("label") is None:
                raise MedsegError(f"{json_path}: {where} image '{entry['image']}' has no label; every training case "
                                  "needs one")
            label = _dataset_file(root, json_path, f"{where}.label", entry["label"])
        except MedsegError as error:
            _collect(problems, _entry_case_id(entry, i, "training"), error, json_path)
            continue
        training.append(Case(case_id_from_filename(image.name), (image,), label))
    test = []
    for image in _listed_images(root, json_path, data, "test", problems):
        label = root / "labelsTs" / image.name
        test.append(Case(case_id_from_filename(image.name), (image,), label if label.is_file() else None))
    return tuple(training), tuple(test)


def _listed_images(root: Path, json_path: Path, data: dict, key: str,
                   problems: list[Problem] | None = None) -> list[Path]:
    """The image files of dataset.json's list `key` ("test", "unlabelled"): paths, or entries like training ones
    (some conversions write them so)."""
    entries = data.get(key) or []
    if not isinstance(entries, list):
        raise MedsegError(f"{json_path}: '{key}' must be a list of image paths")
    images = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry = entry.get("image")
        try:
            images.append(_dataset_file(root, json_path, f"{key}[{i}]", entry, allow_dir=True))
        except MedsegError as error:
            _collect(problems, _entry_case_id(entry, i, key), error, json_path)
    return images


def _msd_unlabelled(root: Path, json_path: Path, data: dict, problems: list[Problem] | None = None) -> tuple[Case, ...]:
    key = "unlabelled" if "unlabelled" in data else "unlabeled"
    return tuple(Case(case_id_from_filename(image.name), (image,), None)
                 for image in _listed_images(root, json_path, data, key, problems))


def _nnunet_cases(folder: Path, label_folder: Path, file_ending: str, n_channels: int,
                  require_labels: bool, problems: list[Problem] | None = None) -> tuple[Case, ...]:
    """Cases of an nnU-Net imagesTr / imagesTs folder; a channel may be a DICOM series folder `<case>_<cccc>/`."""
    if not folder.is_dir():
        return ()
    by_case: dict[str, dict[int, Path]] = defaultdict(dict)
    bad: set[str] = set()
    for file in sorted(folder.iterdir()):
        if file.name.startswith("."):
            continue
        if file.is_dir():
            stem = file.name
        elif file.name.endswith(file_ending):
            stem = file.name[: -len(file_ending)]
        else:
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        try:
            if match is None:
                raise MedsegError(f"{file}: image file names must end in a channel suffix like _0000{file_ending}")
            channel = int(match["channel"])
            if channel >= n_channels:
                raise MedsegError(f"{file}: channel {channel} but dataset.json names only {n_channels} channel(s)")
        except MedsegError as error:
            case_id = match["case"] if match else stem
            bad.add(case_id)
            _collect(problems, case_id, error, file)
            continue
        by_case[match["case"]][channel] = file
    cases = []
    for case_id in sorted(by_case):
        if case_id in bad:
            continue
        files = by_case[case_id]
        try:
            for channel in range(n_channels):
                if channel not in files:
                    raise MedsegError(f"{folder / f'{case_id}_{channel:04d}{file_ending}'}: missing channel file for "
                                      f"case '{case_id}'")
            label = label_folder / f"{case_id}{file_ending}"
            if not label.is_file():
                if require_labels:
                    raise MedsegError(f"{label}: missing label for training image {files[0].name}")
                label = None
        except MedsegError as error:
            _collect(problems, case_id, error, files[0])
            continue
        cases.append(Case(case_id, tuple(files[c] for c in range(n_channels)), label))
    return tuple(cases)


def _check_unique(json_path: Path, cases: tuple[Case, ...], split: str,
                  problems: list[Problem] | None = None) -> tuple[Case, ...]:
    """Refuses duplicate case ids (or, collecting problems, reports every case sharing an id and drops them)."""
    by_id: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_id[case.case_id].append(case)
    duplicates = {case_id: group for case_id, group in by_id.items() if len(group) > 1}
    for case_id, group in duplicates.items():
        error = MedsegError(f"{json_path}: duplicate case id '{case_id}' in {split} ({group[0].image_paths[0]} and "
                            f"{group[1].image_paths[0]})")
        if problems is None:
            raise error
        for case in group:
            problems.append(Problem(case_id, str(case.image_paths[0]),
                                    f"case id '{case_id}' is used by {len(group)} {split} cases; rename all but one"))
    return tuple(case for case in cases if case.case_id not in duplicates)


def parse_spacing_2d(json_path: Path, raw: Any) -> tuple[float, float] | None:
    """dataset.json's optional "spacing_2d": [x, y] mm per pixel of 2D pictures (which carry none themselves)."""
    if raw is None:
        return None
    try:
        values = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise MedsegError(f"{json_path}: spacing_2d {raw!r} must be two positive numbers [x, y] in mm")
    return values


def load_dataset(root: str | os.PathLike, problems: list[Problem] | None = None,
                 require_training: bool = True) -> DatasetSpec:
    """Reads an MSD or nnU-Net v2 raw dataset folder; every user mistake is a one-line MedsegError.

    With a `problems` list, mistakes that concern one case (a missing or misplaced file, a path leaving the dataset
    folder, a duplicate case id) are appended to it and the case is left out, so a validation report can list them
    all; mistakes in dataset.json itself still raise. `require_training=False` accepts a dataset of unlabelled images
    only (for pretraining).
    """
    root = Path(root)
    if not root.is_dir():
        raise MedsegError(f"{root}: dataset folder not found")
    json_path = root / "dataset.json"
    data = _read_json(json_path)
    if "labels" not in data:
        raise MedsegError(f"{json_path}: missing 'labels', e.g. {{\"background\": 0, \"liver\": 1}}")
    labels = parse_labels(json_path, data["labels"])
    regions = label_regions(json_path, data["labels"])
    if regions is not None:
        order = data.get("regions_class_order")
        if order is None:
            raise MedsegError(f"{json_path}: region-based labels need 'regions_class_order' (the label each region "
                              f"writes, here {region_labels(regions)})")
        if list(order) != region_labels(regions):
            raise MedsegError(f"{json_path}: regions_class_order {list(order)} differs from the labels the regions "
                              f"paint in the order given ({region_labels(regions)}); list the regions from the "
                              "outermost to the innermost")
    channel_names = _parse_channels(json_path, data)
    name = data.get("name") or root.name
    if not isinstance(name, str):
        name = str(name)

    # Decathlon layout: file lists ("training", or only "unlabelled" for a dataset of images to pretrain on)
    is_msd = isinstance(data.get("training"), list) or ("training" not in data and any(
        isinstance(data.get(key), list) for key in ("unlabelled", "unlabeled")))
    if is_msd:
        file_ending = data.get("file_ending", ".nii.gz")
    else:
        file_ending = data.get("file_ending")
        if file_ending is None:
            raise MedsegError(f"{json_path}: missing 'file_ending' (nnU-Net v2), e.g. \".nii.gz\"")
    file_ending = formats.check_ending(file_ending, json_path)

    if is_msd:
        training, test = _msd_cases(root, json_path, dict(data, training=data.get("training") or []), problems)
        unlabelled = _msd_unlabelled(root, json_path, data, problems)
    else:
        if "dataset" in data:
            raise MedsegError(f"{json_path}: the nnU-Net 'dataset' key (explicit file lists) is not supported yet; "
                              "put the files in imagesTr / labelsTr")
        n_channels = len(channel_names)
        training = _nnunet_cases(root / "imagesTr", root / "labelsTr", file_ending, n_channels, require_labels=True,
                                 problems=problems)
        test = _nnunet_cases(root / "imagesTs", root / "labelsTs", file_ending, n_channels, require_labels=False,
                             problems=problems)
        unlabelled = tuple(Case(c.case_id, c.image_paths, None) for c in _nnunet_cases(
            root / "imagesUnlabelled", root / "labelsUnlabelled", file_ending, n_channels, require_labels=False,
            problems=problems))
        expected = data.get("numTraining")
        if expected is not None and expected != len(training) and problems is None:
            raise MedsegError(f"{json_path}: numTraining is {expected} but {root / 'imagesTr'} holds {len(training)} "
                              "cases")
    spacing_2d = parse_spacing_2d(json_path, data.get("spacing_2d"))
    if spacing_2d is not None:
        training, test, unlabelled = (tuple(dataclasses.replace(c, spacing_2d=spacing_2d) for c in group)
                                      for group in (training, test, unlabelled))
    training = _check_unique(json_path, training, "training", problems)
    test = _check_unique(json_path, test, "test", problems)
    unlabelled = _check_unique(json_path, unlabelled, "unlabelled", problems)
    if not training and not problems and require_training:
        raise MedsegError(f"{json_path}: no training cases found (looked in "
                          f"{'the training list' if is_msd else root / 'imagesTr'})")
    return DatasetSpec(root=root, name=name, channel_names=channel_names, labels=labels, training=training, test=test,
                       file_ending=file_ending, unlabelled=unlabelled, regions=regions)
