"""The training metrics of a run directory: RUN/metrics.jsonl (one JSON object per logged step or validation) and
TensorBoard scalars."""

from __future__ import annotations

import json

import jax

from medseg_jax import runs


class MetricsLog:
    """Appends JSON lines and TensorBoard scalars (only process 0 writes)."""

    def __init__(self, run: runs.RunDir, keep_until_step: int | None):
        self.run = run
        self.enabled = jax.process_index() == 0
        self.writer = None
        if not self.enabled:
            return
        records = [r for r in run.read_metrics() if keep_until_step is not None and r["step"] <= keep_until_step]
        # Lines after the restored checkpoint belong to steps that are about to be redone.
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(run.tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
