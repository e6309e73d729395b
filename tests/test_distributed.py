"""Multi-host start-up without starting anything: cluster detection and flag checks (tests/test_multiprocess.py runs
two real processes)."""

from __future__ import annotations

import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.parallel import distributed
from medseg_jax.parallel.mesh_flag import parse_mesh_arg


def test_clusters_are_detected_from_their_launchers_environment():
    assert distributed.detected_cluster({}) is None
    # a SLURM allocation is not enough: the process must be one of several srun tasks
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) is None
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}) == "slurm"
    assert distributed.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "openmpi"
    assert distributed.detected_cluster({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_single_process_needs_no_initialisation_and_partial_flags_are_refused(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri",
                 "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is None
    with pytest.raises(MedsegError, match="go together"):
        distributed.initialize("localhost:1234", None, 0)


def test_mesh_flag_syntax():
    assert parse_mesh_arg("data=2,space=4") == {"data": 2, "space": 4}
    assert parse_mesh_arg("space=4, space2=2") == {"space": 4, "space2": 2}
    for bad in ("data=2,model=2", "data=two", "data"):
        with pytest.raises(MedsegError, match="--mesh"):
            parse_mesh_arg(bad)


def test_train_refuses_a_mesh_larger_than_the_machine_before_writing(tiny_dataset, tmp_path, capsys):
    from conftest import REPO

    from medseg_jax.cli import main

    run = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "experiments" / "demo_ct.py"), "--workdir", str(run), "--dataset",
                 str(tiny_dataset), "--mesh", "data=1,space=2"])
    assert code == 2 and not run.exists()
    assert "config key 'mesh': data=1 x space=2 x space2=1 needs 2 devices, 1 available" in capsys.readouterr().err
