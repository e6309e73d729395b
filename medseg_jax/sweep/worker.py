"""One trial x fold of a sweep: trains the run directory the sweep wrote (its config.json), resuming from its latest
checkpoint when it has one. Every executor runs this function, in a subprocess here or in a submitit job (SLURM or its
local stand-in): `python -m medseg_jax.sweep.worker RUN_DIR LOG_FILE [COMPILATION_CACHE]`."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Standard output and error (of this process and its children: XLA, grain workers) appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab", buffering=0) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_trial(run_dir: str, log_path: str, compilation_cache: str = "") -> dict:
    """Trains `run_dir` (written by the sweep) to its end; returns its training summary. Output goes to `log_path`.

    `compilation_cache`: XLA's persistent compilation cache, shared by the sweep's runs, so the folds of a trial (and
    trials that differ only in values the program does not depend on) compile their train step once (unless the
    environment names a cache of its own, JAX_COMPILATION_CACHE_DIR)."""
    if compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax

        jax.config.update("jax_compilation_cache_dir", compilation_cache)
    with _output_to(Path(log_path)):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        library_log = logging.getLogger("medseg_jax")
        library_log.addHandler(handler)
        library_log.setLevel(logging.INFO)
        try:
            from medseg_jax import runs
            from medseg_jax.train.loop import train

            config = runs.RunDir(run_dir).load_config()
            return train(config, run_dir, resume=True)
        finally:
            library_log.removeHandler(handler)


def _die_with_parent() -> None:
    """Linux: this process is killed when the sweep that started it dies (even by kill -9), so a re-run of the sweep
    finds no orphan still training its run directory."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    from medseg_jax.errors import MedsegError

    run_dir, log_path, compilation_cache = (list(argv if argv is not None else sys.argv[1:]) + [""])[:3]
    if os.environ.get("MEDSEG_DIE_WITH_PARENT"):
        _die_with_parent()
    try:
        run_trial(run_dir, log_path, compilation_cache)
    except MedsegError as exc:
        with open(log_path, "a") as log_file:
            log_file.write(f"medseg: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
