"""Where the time goes: `medseg train --profile N` writes a jax profiler trace, and every train record of the metrics
log splits the step time into data wait, dispatch and host sync."""

import json

from medseg_jax.cli import main
from medseg_jax.runs import RunDir
from tests.conftest import REPO, TINY_OVERRIDES

DEMO = str(REPO / "experiments" / "demo_ct.py")


def test_profile_trace_and_step_time_breakdown(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--config", DEMO, "--workdir", str(run), "--dataset", str(tiny_dataset),
                 "--profile", "2", "--config.train.steps=4", "--config.train.val_every=4", *TINY_OVERRIDES])
    assert code == 0
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((run / "profile").rglob("perfetto_trace.json.gz"))
    records = [r for r in RunDir(run).read_metrics() if r["kind"] == "train"]
    assert len(records) == 4  # log_every=1
    for record in records[1:]:  # (the first step compiles; its time is not a step's)
        for key in ("time_data_wait", "time_dispatch", "time_host_sync", "time_step_wall"):
            assert record[key] >= 0
        parts = record["time_data_wait"] + record["time_dispatch"] + record["time_host_sync"]
        assert parts <= record["time_step_wall"] * 1.05 + 1e-3
    json.dumps(records)


def test_profile_needs_a_positive_step_count(tiny_dataset, tmp_path, capsys):
    code = main(["train", "--config", DEMO, "--workdir", str(tmp_path / "run"), "--dataset",
                 str(tiny_dataset), "--profile", "-1", *TINY_OVERRIDES])
    assert code == 2 and "--profile" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
