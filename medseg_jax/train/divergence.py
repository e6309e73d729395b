"""The divergence guard's host side: what the loop does when a step was not finite.

The train step never applies a non-finite update (`step.keep_unless`): its params and optimizer state stay as they
were, and its metrics carry `finite`. The loop hands each step's metrics here at its sync points (every log,
validation and checkpoint step, always before anything is saved), so a diverged run never writes NaN or inf params
to `latest` or `best`, and its last checkpoint stays good to resume from.

`config.train.nonfinite`:
- "stop" (default): the first non-finite step ends training with a one-line error naming the step.
- "skip": the step is skipped (as above) and training goes on; more than `train.max_nonfinite_steps` skipped steps in
  a row end it (a run whose loss stays NaN is not learning). The summary counts the skipped steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medseg_jax.errors import MedsegError

POLICIES = ("stop", "skip")


class Diverged(MedsegError):
    """Training stopped on non-finite steps; nothing after the last good checkpoint was saved."""


class DivergenceGuard:
    def __init__(self, policy: str = "stop", max_in_a_row: int = 10):
        if policy not in POLICIES:
            raise MedsegError(f"config key 'train.nonfinite': '{policy}' is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = 0
        self.skipped = 0

    def check(self, steps: Sequence[tuple[int, dict]], last_saved: int | None, run_path) -> None:
        """`steps`: (step number, host metrics) in order since the last call. Raises `Diverged` when training must
        stop; `last_saved` (the latest checkpoint's step, or None) and `run_path` make the message say what to do."""
        for step, values in steps:
            if values.get("finite", 1.0):
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.skipped += 1
            if self.policy == "stop" or self.in_a_row > self.max_in_a_row:
                raise Diverged(self.message(step, values, last_saved, run_path))

    def message(self, step: int, values: dict, last_saved: int | None, run_path) -> str:
        def number(key):
            value = values.get(key, math.nan)
            return f"{value:.4g}" if math.isfinite(value) else str(value)

        what = (f"loss {number('loss')}, gradient norm {number('grad_norm')}" if self.policy == "stop" else
                f"{self.in_a_row} non-finite steps in a row (more than train.max_nonfinite_steps={self.max_in_a_row})")
        saved = (f"the last good checkpoint is step {last_saved}: continue from it with `medseg train --workdir "
                 f"{run_path} --resume` and a lower --config.train.learning_rate (or --config.train.grad_clip)"
                 if last_saved is not None else
                 f"no checkpoint was saved: start again in a new --workdir (or remove {run_path}) with a lower "
                 "--config.train.learning_rate")
        return (f"training diverged at step {step} ({what}); the step's update was not applied and nothing after it "
                f"was saved; {saved}")
