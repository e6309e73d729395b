"""scripts/bench_vs_nnunet.py runs end to end at its tiny size and prints every ratio (no timing is asserted: speed
figures live in BENCHMARKS.md, never in tests)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("torch", reason="torch is a test extra (make test installs it)")
pytest.importorskip("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", reason="nnU-Net v2 is not installed")
pytest.importorskip("batchgeneratorsv2", reason="nnU-Net's augmentation (batchgeneratorsv2) is not installed")


@pytest.mark.slow  # 6-10 min on a shared 2-core CPU (nnU-Net planning, 2 trainings per side, predictions)
def test_bench_vs_nnunet_tiny_runs_and_prints_every_ratio(tmp_path):
    out = tmp_path / "bench_vs_nnunet.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_vs_nnunet.py"), "--tiny", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    for line in ("ratio (a) train step, medseg jit float32 / nnU-Net fp32",
                 "ratio (b) end to end, medseg (nnunet-preset augmentation) / nnU-Net (default workers): ",
                 "ratio (b) end to end, medseg (demo augmentation) / nnU-Net (default workers): ",
                 "Dice (c) at equal wall-clock: medseg ", "ratio (c) Dice medseg / nnU-Net: ",
                 "nnU-Net picked ", "| side | variant | steps/s |", "| side | setting | iterations/s |",
                 "| side | trained | training process (s) |"):
        assert line in stdout, line
    figures = json.loads(out.read_text())
    assert {"date", "machine", "command", "settings", "versions", "setup", "a", "b", "c"} <= set(figures)
    # the same network on both sides: nnU-Net's PlainConvUNet from the edited plans and medseg's plain_unet
    assert figures["a"]["params_equal"], (figures["a"]["nnunet"]["params"], figures["a"]["medseg"]["params"])
    assert figures["setup"]["nnunet_used"]["patch_size"] == [16, 32, 32]  # medseg's (x, y, z) patch, reversed
    assert figures["setup"]["nnunet_used"]["features"] == [4, 8, 16]
    assert all(r > 0 for r in figures["a"]["ratios"].values())
    assert all(r > 0 for r in figures["b"]["ratios"].values())
    c = figures["c"]
    assert c["nnunet"]["iterations"] >= 1 and c["medseg"]["steps"] >= 1
    for side in ("medseg", "nnunet"):  # both scored by the same code on the same test cases
        assert 0.0 <= c["dice"][side]["mean_foreground"] <= 1.0
        assert set(c["dice"][side]["per_class"]) == {"liver", "spleen", "kidney", "aorta"}
