"""scripts/bench_pretrain.py runs end to end at a tiny size: unlabelled store, pretraining, the scratch/pretrained
sweep and its per-arm summary (no Dice or timing is asserted: the measured figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # about 2 minutes on a 2-core CPU (a pretraining run and a 4-run sweep): make test-all
def test_bench_pretrain_tiny_runs_and_prints_both_arms(tmp_path):
    out = tmp_path / "bench_pretrain.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pretrain.py"), "--tiny", "--labelled", "4",
                             "--unlabelled", "2", "--pretrain-steps", "2", "--steps", "1", "--seeds", "0",
                             "--out", str(tmp_path / "work"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("scratch: out-of-fold mean foreground Dice", "pretrained: out-of-fold mean foreground Dice",
                 "pretrained - scratch per seed:", "| pretrained-seed0 |", "| scratch-seed0 |"):
        assert line in result.stdout, line
    figures = json.loads(out.read_text())
    assert set(figures["arms"]) == {"scratch", "pretrained"} and figures["seeds"] == [0]
    assert len(figures["pretrain_loss_first_last"]) == 2
    # the pretrained arm really started from the pretraining run's encoder
    config = json.loads((tmp_path / "work" / "sweep" / "trials" / "pretrained-seed0" / "fold_0" / "config.json")
                        .read_text())
    assert config["train"]["init_from"] == str(tmp_path / "work" / "pretrained")
