"""Which prepared cases train and which validate."""

from __future__ import annotations

from collections.abc import Sequence

from medseg_jax.errors import MedsegError


def split_cases(case_ids: Sequence[str], num_val: int) -> tuple[list[str], list[str]]:
    """The last `num_val` case ids (sorted) are held out for validation."""
    if num_val < 0 or num_val >= len(case_ids):
        raise MedsegError(f"config key 'data.val_cases': {num_val} validation cases leaves none of the "
                          f"{len(case_ids)} training cases to train on")
    ordered = sorted(case_ids)
    return (ordered[:len(ordered) - num_val], ordered[len(ordered) - num_val:]) if num_val else (ordered, [])
