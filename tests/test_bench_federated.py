"""scripts/bench_federated.py runs end to end at a tiny size: three sites with their own scanner profiles, the five
arms (each site alone, pooled, federated), one common test set scored by `medseg evaluate` (no Dice or timing is
asserted: the measured figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # about 6 minutes on a 2-core CPU (4 trainings, a federated run, 5 predictions): make test-all
def test_bench_federated_tiny_runs_every_arm_on_the_common_test_set(tmp_path):
    out = tmp_path / "bench_federated.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_federated.py"), "--tiny", "--cases", "2",
                             "--test-cases", "1", "--rounds", "2", "--local-steps", "2", "--seeds", "0",
                             "--out", str(tmp_path / "work"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures["arms"]) == ["alone-A", "alone-B", "alone-C", "pooled", "federated"]
    for arm in figures["arms"].values():
        assert 0 <= arm["test_dice"]["mean"] <= 1 and set(arm["by_site"]) == {"A", "B", "C"}
    # the sites really differ: each dataset was drawn with its own scanner profile
    for site, scanner in (("B", "soft-kernel"), ("C", "low-dose")):
        dataset = json.loads((tmp_path / "work" / "data" / site / "dataset.json").read_text())
        assert scanner in dataset["description"]
    # the federated model is an ordinary run directory whose metrics hold every site's validation Dice per round
    records = [json.loads(line) for line in
               (tmp_path / "work" / "runs" / "seed0" / "federated" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["kind"] == "val"] == [1, 2]
    assert all(f"val_dice_{s}" in records[-1] for s in "ABC")
