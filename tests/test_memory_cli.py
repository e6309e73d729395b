"""`medseg memory`: compiles the train step for a mesh (simulated CPU devices here) and prints per-device peak bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, xla_flags

TINY = ["--config.model.features=(4,8)", "--config.train.patch_size=(32,32,16)", "--config.augment.preset=none"]


def medseg_memory(*args):
    env = dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="2")  # one CPU device
    return subprocess.run([sys.executable, "-m", "medseg_jax.cli", "memory", "--config",
                           str(REPO / "experiments" / "demo_ct.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_memory_prints_json_per_device_bytes_falling_with_the_split():
    reports, stderr = {}, {}
    for mesh in ("data=1", "data=1,space=4"):
        proc = medseg_memory("--mesh", mesh, *TINY)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[mesh], stderr[mesh] = json.loads(proc.stdout), proc.stderr
    whole, split = reports["data=1"], reports["data=1,space=4"]
    assert whole["mesh"] == {"data": 1, "space": 1, "space2": 1} and split["mesh"] == {"data": 1, "space": 4,
                                                                                      "space2": 1}
    assert split["simulated_devices"] and "simulated CPU devices" in stderr["data=1,space=4"]
    assert not whole["simulated_devices"] and "simulated" not in stderr["data=1"]
    assert whole["per_device_peak_bytes"] > 0 and whole["patch_size"] == [32, 32, 16]
    # activations dominate this step: split over 4 devices, each needs well under half
    assert split["per_device_peak_bytes"] < 0.5 * whole["per_device_peak_bytes"]
    assert split["breakdown_bytes"]["temporaries"] < 0.4 * whole["breakdown_bytes"]["temporaries"]


def test_memory_refuses_a_patch_that_does_not_split_in_one_line():
    proc = medseg_memory("--mesh", "data=1,space=8", *TINY[:1], "--config.train.patch_size=(40,32,16)",
                         "--config.augment.preset=none")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.patch_size" in proc.stderr and "U-Net level 0" in proc.stderr and "mesh.space=8" in proc.stderr
    bad = medseg_memory("--mesh", "data=1,spaec=2", *TINY)
    assert bad.returncode == 2 and "--mesh data=1,spaec=2" in bad.stderr and "Traceback" not in bad.stderr
