"""scripts/bench_active_learning.py runs end to end at a tiny size: a model on the starting cases, then per arm a round
of choosing (`medseg rank` or random), annotating, `medseg dataset add` and fine-tuning with `--init-from`, scored on
the common test set (no Dice is asserted: the measured figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from medseg_jax.data.store import Store
from tests.conftest import REPO


@pytest.mark.slow  # about a minute and a half on a 2-core CPU (3 trainings, a ranking, 3 predictions): make test-all
def test_bench_active_learning_tiny_runs_both_arms(tmp_path):
    out, work = tmp_path / "bench_al.json", tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_active_learning.py"), "--tiny", "--seeds",
                             "0", "--rounds", "1", "--pool", "2", "--test", "1", "--initial-steps", "4",
                             "--finetune-steps", "3", "--out", str(work), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["labelled_cases"] == [2, 4] and list(figures["arms"]) == ["uncertainty", "random"]
    ranked = (work / "seed" / "0" / "uncertainty" / "round1" / "ranking" / "ranking.csv").read_text().splitlines()
    top = [line.split(",")[1] for line in ranked[1:3]]
    for arm in figures["arms"].values():
        assert len(arm["dice_by_round"]) == 2 and all(0 <= r["mean"] <= 1 for r in arm["dice_by_round"])
        assert sum(arm["chosen_by_scanner"].values()) == 2
    assert figures["arms"]["uncertainty"]["chosen"]["0"] == [top]  # the ranking's first cases were annotated
    for arm, chosen in (("uncertainty", top), ("random", figures["arms"]["random"]["chosen"]["0"][0])):
        store = Store(work / "seed" / "0" / arm / "store")
        assert store.version == 2 and set(chosen) <= set(store.case_ids) and len(store.case_ids) == 4
        assert Store(store.root, version=1).case_ids == sorted(set(store.case_ids) - set(chosen))
        config = json.loads((work / "seed" / "0" / arm / "round1" / "run" / "config.json").read_text())
        assert config["train"]["init_from"].endswith("round0/run")  # fine-tuned from the round before
