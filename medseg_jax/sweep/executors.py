"""Where a sweep's trials run. Every executor runs `worker.run_trial(run_dir, log)` for each task and reports each
finished task with its outcome; the sweep runner does the rest (manifest, skipping, reporting) the same way for all.

    local           subprocesses on this machine, at most --max-parallel at once, the machine's GPUs split between
                    them (CUDA_VISIBLE_DEVICES); they die with the sweep, so a re-run finds no orphan
    slurm           a submitit job array on a SLURM cluster (partition, GPUs, time, account from the sweep file or
                    flags; --max-parallel is the array's parallelism)
    submitit-local  the same submitit code path as slurm, run by submitit's LocalExecutor on this machine (to try a
                    cluster sweep, and in the tests)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medseg_jax.errors import MedsegError

EXECUTORS = ("local", "slurm", "submitit-local")
POLL_SECONDS = 1.0


@dataclasses.dataclass
class Task:
    trial: str
    fold: int
    run_dir: Path
    log: Path
    compilation_cache: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.trial} fold {self.fold}"


@dataclasses.dataclass
class Outcome:
    ok: bool
    detail: str = ""  # why it failed (exit code, exception), when it did
    job: str = ""  # the job id (pid or SLURM job)


Started = Callable[[Task, str], None]
Finished = Callable[[Task, Outcome], None]


def visible_gpus() -> list[str]:
    """The GPUs this machine lets us use, without initialising JAX in the sweep process (it would hold them)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        output = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(output.splitlines()) if line.startswith("GPU ")]


def gpu_slots(max_parallel: int, gpus: Sequence[str]) -> list[list[str]]:
    """`max_parallel` disjoint groups of GPUs (empty groups on a CPU-only machine)."""
    if not gpus:
        return [[] for _ in range(max_parallel)]
    if max_parallel > len(gpus):
        raise MedsegError(f"--max-parallel {max_parallel}: this machine has {len(gpus)} GPU(s); run at most that "
                          "many trials at once")
    share = len(gpus) // max_parallel
    return [list(gpus[i * share:(i + 1) * share]) for i in range(max_parallel)]


class LocalExecutor:
    def __init__(self, max_parallel: int = 1):
        self.slots = gpu_slots(max_parallel, visible_gpus())

    def run(self, tasks: Sequence[Task], started: Started, finished: Finished) -> None:
        queue = list(tasks)
        free = list(range(len(self.slots)))
        running: dict[int, tuple[subprocess.Popen, Task]] = {}
        try:
            while queue or running:
                while queue and free:
                    slot = free.pop(0)
                    task = queue.pop(0)
                    env = dict(os.environ, MEDSEG_DIE_WITH_PARENT="1")
                    if self.slots[slot]:
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.slots[slot])
                    task.log.parent.mkdir(parents=True, exist_ok=True)
                    command = [sys.executable, "-m", "medseg_jax.sweep.worker", str(task.run_dir), str(task.log),
                               str(task.compilation_cache or "")]
                    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    running[slot] = (process, task)
                    started(task, str(process.pid))
                for slot, (process, task) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    del running[slot]
                    free.append(slot)
                    finished(task, Outcome(code == 0, "" if code == 0 else f"exit code {code}", str(process.pid)))
                if running:
                    time.sleep(POLL_SECONDS)
        finally:  # interrupted (Ctrl-C): stop the trials; re-running the sweep resumes them
            for process, _ in running.values():
                process.kill()


class SubmititExecutor:
    """submitit's AutoExecutor: `cluster="slurm"` submits one job array for all tasks; `cluster="local"` runs the
    same submission on this machine, `max_parallel` jobs at a time (submitit's local executor has no array limit;
    its jobs see the GPUs that CUDA_VISIBLE_DEVICES names, all of them)."""

    def __init__(self, folder: Path, cluster: str, max_parallel: int = 1, parameters: dict | None = None):
        try:
            import submitit
        except ImportError:
            raise MedsegError("--executor slurm needs submitit: pip install submitit") from None
        self.folder, self.cluster, self.max_parallel = Path(folder), cluster, max_parallel
        try:
            self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=cluster)
        except RuntimeError as exc:  # submitit finds no SLURM here (no srun)
            raise MedsegError(f"--executor slurm: {exc} (use --executor local or submitit-local on this "
                              "machine)") from None
        parameters = dict(parameters or {})
        if cluster == "slurm":
            parameters.setdefault("slurm_array_parallelism", max_parallel)
        else:  # submitit's local jobs see only the GPUs it is told of (CUDA_VISIBLE_DEVICES="" otherwise)
            parameters.setdefault("gpus_per_node", len(visible_gpus()))
        parameters.setdefault("timeout_min", 60 * 24)  # submitit's local default (2 min) would kill a real trial
        try:
            self.executor.update_parameters(**parameters)
        except (ValueError, TypeError) as exc:
            raise MedsegError(f"submitit parameters {sorted(parameters)}: {exc}") from None

    def _submit(self, tasks: Sequence[Task]) -> list:
        from medseg_jax.sweep.worker import run_trial

        return self.executor.map_array(run_trial, [str(t.run_dir) for t in tasks], [str(t.log) for t in tasks],
                                       [str(t.compilation_cache or "") for t in tasks])

    def run(self, tasks: Sequence[Task], started: Started, finished: Finished) -> None:
        queue = list(tasks)
        in_flight: list[tuple[object, Task]] = []
        while queue or in_flight:
            if self.cluster == "slurm":
                batch, queue = queue, []
            else:
                batch, queue = queue[:self.max_parallel - len(in_flight)], queue[self.max_parallel - len(in_flight):]
            if batch:
                jobs = self._submit(batch)
                for job, task in zip(jobs, batch):
                    in_flight.append((job, task))
                    started(task, str(job.job_id))
            for job, task in list(in_flight):
                if not job.done():
                    continue
                in_flight.remove((job, task))
                error = job.exception()
                detail = "" if error is None else " ".join(str(error).split())[-300:]
                finished(task, Outcome(error is None, detail, str(job.job_id)))
            if in_flight:
                time.sleep(POLL_SECONDS)


def make_executor(name: str, folder: Path, max_parallel: int, slurm_parameters: dict | None = None):
    if name not in EXECUTORS:
        raise MedsegError(f"--executor {name}: must be one of {', '.join(EXECUTORS)}")
    if max_parallel < 1:
        raise MedsegError(f"--max-parallel {max_parallel}: must be at least 1")
    if name == "local":
        return LocalExecutor(max_parallel)
    return SubmititExecutor(folder, "slurm" if name == "slurm" else "local", max_parallel,
                            slurm_parameters if name == "slurm" else {})
