"""Two processes on localhost (jax.distributed over gloo), two CPU devices each, train like one process with four
devices; their sharded checkpoint restores onto one device and onto eight."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY_OVERRIDES, run_worker, xla_flags

STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(dataset, workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "medseg_jax.cli", "train", "--config", str(REPO / "experiments" / "demo_ct.py"),
            "--workdir", str(workdir), "--dataset", str(dataset), "--mesh", "data=2,space=2",
            f"--config.train.steps={STEPS}", f"--config.train.val_every={STEPS}", "--config.train.checkpoint_every=10",
            *TINY_OVERRIDES, *extra]


def env_with(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), TF_CPP_MIN_LOG_LEVEL="2")


def train_losses(workdir) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow  # minutes on a 2-core CPU: make test-all
def test_two_processes_train_like_one_process_and_the_checkpoint_restores_on_1_and_8_devices(tiny_dataset, tmp_path):
    """The issue's multi-host test, and resuming a 2-process run in one process."""
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    procs = [subprocess.Popen(train_command(tiny_dataset, multi, "--coordinator", f"localhost:{port}",
                                            "--num-processes", "2", "--process-id", str(i)),
                              env=env_with(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    # each process read only its own sample of every batch; only process 0 reported
    assert "process 0 of 2: 2 local devices, reads batch rows [0]" in outputs[0][0]
    assert "process 1 of 2: 2 local devices, reads batch rows [1]" in outputs[1][0]
    assert "trained 20 steps" in outputs[0][0] and "trained" not in outputs[1][0]

    proc = subprocess.run(train_command(tiny_dataset, single), env=env_with(4), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    losses_multi, losses_single = train_losses(multi), train_losses(single)
    assert len(losses_multi) == len(losses_single) == STEPS
    for a, b in zip(losses_multi, losses_single):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_multi, losses_single)
    summary = json.loads((multi / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["mesh"] == {"data": 2, "space": 2, "space2": 1}
    assert (multi / "checkpoints" / "latest" / str(STEPS) / "data" / "process_1-of-2.json").is_file()

    # the checkpoint written by 2 processes x 2 devices, restored on 1 device and on 8 (params split over all 8)
    one = run_worker("restore.py", str(multi), "data=1,space=1", devices=1)
    eight = run_worker("restore.py", str(multi), "data=2,space=4,params=sharded", devices=8)
    for result in (one, eight):
        assert result["step"] == STEPS and result["equal_to_saved"] and result["shardings_match_template"], result
    assert one["split_arrays"] == 0 and eight["split_arrays"] > 0

    # both runs continue for two more steps in one process: the 2-process run's loader state cannot be restored there,
    # so its stream restarts at step 20, and gives the batches the 1-process run's restored loader state gives
    more = ["--resume", f"--config.train.steps={STEPS + 2}", f"--config.train.val_every={STEPS + 2}"]
    for workdir in (multi, single):
        proc = subprocess.run([sys.executable, "-m", "medseg_jax.cli", "train", "--workdir", str(workdir), *more],
                              env=env_with(4), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"resumed from step {STEPS} on mesh data=2 x space=2" in proc.stdout
    resumed_multi, resumed_single = train_losses(multi), train_losses(single)
    assert len(resumed_multi) == STEPS + 2 and resumed_multi[:STEPS] == losses_multi
    for a, b in zip(resumed_multi[STEPS:], resumed_single[STEPS:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed_multi, resumed_single)
