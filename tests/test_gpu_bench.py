"""scripts/gpu_bench.sh, the one command that runs the benchmarks at GPU sizes on the device machine, runs here at its
test size (`--tiny`): every benchmark of the group starts, finishes and writes its JSON (no timing asserted)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_bench_runs_the_medseg_group_at_tiny_size(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh"), "medseg", str(tmp_path), "--tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in ("bench_models", "bench_memory", "bench_augment", "bench_infer"):
        assert f"## {name}: exit 0" in proc.stdout
        assert (tmp_path / f"{name}_cpu.json").is_file(), name
