"""scripts/bench_infer.py runs end to end at its tiny size and prints every ratio (no timing is asserted: speed
figures live in BENCHMARKS.md, never in tests)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("torch", reason="torch is a test extra (make test installs it)")
pytest.importorskip("monai", reason="MONAI is a test extra (make test installs it)")


@pytest.mark.slow  # about a minute on a 2-core CPU (three processes, five compiled programs): make test-all
def test_bench_infer_tiny_runs_and_prints_every_ratio(tmp_path):
    out = tmp_path / "bench_infer.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_infer.py"), "--tiny", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("ratio MONAI/medseg, 40x40x24, no TTA: ", "ratio MONAI/medseg, 40x40x24, TTA: ",
                 "TTA cost factor, medseg: ", "TTA cost factor, monai: ", "| scan | TTA | medseg (s) | MONAI (s) |"):
        assert line in result.stdout, line
    figures = json.loads(out.read_text())
    assert [(r["scan"], r["tta"]) for r in figures["rows"]] == [("40x40x24", False), ("40x40x24", True)]
    assert all(r["ratio_monai_over_medseg"] > 0 for r in figures["rows"])
    assert set(figures["tta_factor"]) == {"medseg", "monai"}
    # the same weights on both sides: the converted forward pass is PyTorch's to float tolerance
    assert figures["forward_check"]["max_abs_difference"] < 1e-4
    # the exported model predicts what the run predicts, in a process that never imported the model code
    assert figures["export"]["labels_equal_to_run_fraction"] == 1.0
    assert figures["export"]["size_mib"] > 0
    assert figures["export"]["fresh_process_load"]["flax_imported"] is False
    assert {"date", "machine", "command", "settings"} <= set(figures)
