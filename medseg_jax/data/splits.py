"""Which prepared cases train and which validate: a hold-out of the last cases, or k-fold cross-validation.

`data.fold` chooses: "holdout" (the last `data.val_cases` case ids, sorted, validate), an integer k (fold k of
`data.num_folds`: its held-out cases validate, the rest train) or "all" (every case trains, none validates; nnU-Net's
fold "all"). Folds are drawn by `data.split_seed` (nnU-Net: 5 folds, seed 12345) and written in nnU-Net's
`splits_final.json` format, a list of {"train": [...], "val": [...]}; `data.splits_file` reads an existing one instead
(e.g. nnU-Net's own, or custom folds). With `data.group_regex` (the first group of a regular expression searched in the
case id, e.g. `^(patient\\d+)_`) or `data.groups_file` (JSON {case: group}, or CSV lines `case,group`) all cases of
one patient or site fall in one fold.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg_jax.errors import MedsegError

HOLDOUT, ALL = "holdout", "all"


def split_cases(case_ids: Sequence[str], num_val: int) -> tuple[list[str], list[str]]:
    """The last `num_val` case ids (sorted) are held out for validation."""
    if num_val < 0 or num_val >= len(case_ids):
        raise MedsegError(f"config key 'data.val_cases': {num_val} validation cases leaves none of the "
                          f"{len(case_ids)} training cases to train on")
    ordered = sorted(case_ids)
    return (ordered[:len(ordered) - num_val], ordered[len(ordered) - num_val:]) if num_val else (ordered, [])


def parse_fold(value) -> int | str:
    """`data.fold` as HOLDOUT, ALL or a fold index (a command-line override gives the index as text)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (HOLDOUT, ALL):
            return text
        if text.isdigit():
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MedsegError(f"config key 'data.fold': {value!r} must be a fold number (0, 1, ...), 'all' or 'holdout'")


def case_groups(case_ids: Sequence[str], group_regex: str = "", groups_file: str | Path = "") -> dict[str, str]:
    """case id -> group (patient, site); each case is its own group when neither source is given."""
    if group_regex and groups_file:
        raise MedsegError("config keys 'data.group_regex' and 'data.groups_file' are both set; use one")
    if groups_file:
        mapping = read_groups_file(groups_file)
        missing = [c for c in case_ids if c not in mapping]
        if missing:
            raise MedsegError(f"{groups_file}: no group for case {missing[0]!r} ({len(missing)} cases without one)")
        return {c: str(mapping[c]) for c in case_ids}
    if group_regex:
        try:
            pattern = re.compile(group_regex)
        except re.error as exc:
            raise MedsegError(f"config key 'data.group_regex': {group_regex!r} is not a regular expression "
                              f"({exc})") from None
        groups = {}
        for case_id in case_ids:
            match = pattern.search(case_id)
            if match is None:
                raise MedsegError(f"config key 'data.group_regex': {group_regex!r} does not match case {case_id!r}")
            groups[case_id] = match.group(1) if pattern.groups else match.group(0)
        return groups
    return {c: c for c in case_ids}


def read_groups_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: groups file not found (config key 'data.groups_file')")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MedsegError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(mapping, dict):
            raise MedsegError(f"{path}: expected a JSON object {{case: group}}")
        return {str(k): str(v) for k, v in mapping.items()}
    mapping = {}
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2:
            raise MedsegError(f"{path}: line {number}: expected 'case,group'")
        mapping[row[0].strip()] = row[1].strip()
    return mapping


def kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345,
                 groups: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """k folds in nnU-Net's splits_final.json format. Groups (one per case by default) are shuffled by `seed` and
    dealt, largest first, to the fold holding the fewest cases, so folds are balanced and a group never straddles two.
    """
    case_ids = sorted(case_ids)
    groups = dict(groups) if groups is not None else {c: c for c in case_ids}
    members: dict[str, list[str]] = {}
    for case_id in case_ids:
        members.setdefault(groups[case_id], []).append(case_id)
    if num_folds < 2:
        raise MedsegError(f"config key 'data.num_folds': {num_folds} must be at least 2")
    if len(members) < num_folds:
        raise MedsegError(f"config key 'data.num_folds': {num_folds} folds need at least {num_folds} cases (or "
                          f"groups); the store has {len(members)}")
    names = sorted(members)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    # stable sort by size (largest first) keeps the shuffled order among equal sizes
    shuffled.sort(key=lambda name: -len(members[name]))
    held_out: list[list[str]] = [[] for _ in range(num_folds)]
    for name in shuffled:
        smallest = min(range(num_folds), key=lambda k: (len(held_out[k]), k))
        held_out[smallest] += members[name]
    return [{"train": [c for c in case_ids if c not in val], "val": sorted(val)}
            for val in map(set, held_out)]


def read_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """An nnU-Net splits_final.json (or one of ours): a list of {"train": [...], "val": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: splits file not found (config key 'data.splits_file')")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedsegError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits):
        raise MedsegError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}} (nnU-Net's "
                          "splits_final.json format)")
    for k, split in enumerate(splits):
        both = set(split["train"]) & set(split["val"])
        if both:
            raise MedsegError(f"{path}: fold {k}: case {sorted(both)[0]!r} is in both train and val")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def check_splits(splits: Sequence[Mapping], case_ids: Sequence[str], source: str) -> None:
    """Every case a split names must be in the store."""
    known = set(case_ids)
    for k, split in enumerate(splits):
        unknown = [c for c in list(split["train"]) + list(split["val"]) if c not in known]
        if unknown:
            raise MedsegError(f"{source}: fold {k} names case {unknown[0]!r}, which the store does not hold")


def folds_for(data_config, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """The folds `data_config` asks for: read from `data.splits_file`, else drawn from the store's cases."""
    splits_file = data_config.get("splits_file", "")
    if splits_file:
        splits = read_splits(splits_file)
        check_splits(splits, case_ids, str(splits_file))
        return splits
    groups = case_groups(case_ids, data_config.get("group_regex", ""), data_config.get("groups_file", ""))
    return kfold_splits(case_ids, int(data_config.get("num_folds", 5)), int(data_config.get("split_seed", 12345)),
                        groups)


def train_val_cases(data_config, case_ids: Sequence[str]) -> tuple[list[str], list[str], list | None]:
    """(train ids, validation ids, the folds when cross-validating) for `data.fold`."""
    fold = parse_fold(data_config.get("fold", HOLDOUT))
    if fold == HOLDOUT:
        return (*split_cases(case_ids, data_config.val_cases), None)
    if fold == ALL:
        return sorted(case_ids), [], None
    splits = folds_for(data_config, case_ids)
    if fold >= len(splits):
        raise MedsegError(f"config key 'data.fold': {fold} but there are {len(splits)} folds (0 to "
                          f"{len(splits) - 1})")
    train_ids, val_ids = splits[fold]["train"], splits[fold]["val"]
    if not train_ids:
        raise MedsegError(f"config key 'data.fold': fold {fold} leaves no case to train on")
    return sorted(train_ids), sorted(val_ids), splits
