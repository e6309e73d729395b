"""Multi-host start-up: one process per host (or per GPU), joined by `jax.distributed.initialize`.

    medseg train ... --coordinator HOST:PORT --num-processes N --process-id I     # explicit
    srun medseg train ...                                                         # SLURM: detected
    mpirun -np N medseg train ...                                                 # Open MPI: detected
    medseg train ... --distributed                                                # let JAX detect (TPU pod slice, ...)

With no flag and no cluster in the environment nothing is initialised: one process sees its local devices. After
initialisation `jax.devices()` lists every process's devices, the mesh spans them all, each process reads only the
samples its own devices hold, and only process 0 writes logs, curves and summaries. On CPU the processes exchange
collectives through gloo.
"""

from __future__ import annotations

import os

from medseg_jax.errors import MedsegError


def detected_cluster(environ=None) -> str | None:
    """The multi-process launcher this process runs under, if any: "slurm", "openmpi" or "tpu"."""
    env = os.environ if environ is None else environ

    def count(*names) -> int:
        for name in names:
            if env.get(name, "").strip().isdigit():
                return int(env[name])
        return 1

    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and count("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1:
        return "slurm"  # a job step launched by srun with several tasks
    if count("OMPI_COMM_WORLD_SIZE") > 1 or "OMPI_MCA_orte_hnp_uri" in env:
        return "openmpi"
    if "MEGASCALE_COORDINATOR_ADDRESS" in env or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False, local_device_ids=None) -> str | None:
    """Joins the processes of a multi-host run before JAX is used; returns how ("flags", a cluster name, "auto") or
    None for a single process. Must run before anything touches a JAX device."""
    explicit = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(explicit) and not all(explicit):
        raise MedsegError("--coordinator, --num-processes and --process-id go together (or none of them, to let "
                          "SLURM, Open MPI or a TPU slice provide them)")
    how = "flags" if all(explicit) else (detected_cluster() or ("auto" if auto else None))
    if how is None:
        return None
    import jax

    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    try:
        if how == "flags":
            if num_processes < 1 or not 0 <= process_id < num_processes:
                raise MedsegError(f"--process-id {process_id} is not within 0..{num_processes - 1}")
            jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
        else:
            jax.distributed.initialize(local_device_ids=local_device_ids)
    except MedsegError:
        raise
    except Exception as exc:  # a wrong address or a missing peer: the user's cluster, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsegError(f"jax.distributed.initialize ({how}) failed: {first}") from None
    return how
