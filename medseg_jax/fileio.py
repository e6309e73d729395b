"""Atomic writes (every output goes to a temporary name in the same folder and is renamed into place) and one writer
per folder (`exclusive`)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from medseg_jax.errors import MedsegError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds, removes it otherwise.

    `suffix` keeps the extension that writers look at (nibabel picks the format from `.nii.gz`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp" if not suffix else suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; the output gets what the user's umask allows
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; renames it onto `path` if the block succeeds, removes it otherwise.

    `path` must not exist yet (callers refuse to overwrite user data before calling this).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(path: str | os.PathLike) -> int:
    """Removes what an interrupted `atomic_path(path)` / `atomic_dir(path)` left beside `path` (a kill between the
    temporary's creation and its rename); returns how many. Only the caller that owns `path` should call this."""
    path = Path(path)
    removed = 0
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if leftover.name.endswith(".lock"):  # `exclusive`'s, not a temporary
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _holder_is_gone(holder: dict) -> bool:
    """True when the lock's holder ran on this host and is no longer running (or its pid now names another process);
    a holder on another host cannot be checked from here."""
    if holder.get("host") != socket.gethostname():
        return False
    started = _process_started(int(holder.get("pid", -1)))
    return started is None or abs(started - float(holder.get("process_started", started))) > 1.0


def live_holder(path: str | os.PathLike) -> dict | None:
    """Who holds `exclusive(path)` now (host, pid, what it is doing), or None when nobody does (no lock, or a lock
    left by a process that is gone)."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return None if _holder_is_gone(holder) else holder


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """One writer at a time for the folder `path` (a store being prepared, a run being trained): holds the lock file
    `.NAME.lock` beside it for the block, recording this host, pid and start time. A second writer gets one line naming
    the holder. A lock left by a process that died on this host (kill -9, a crash) is taken over; one from another
    host is reported with the file to remove once that host's process is known to be gone."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    # Folders made only to hold the lock are removed with it, so a command that fails writes nothing.
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_started": _process_started(os.getpid()),
          "doing": doing, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    acquired = False
    try:
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):  # being written this instant, or left empty by a crash
                    holder = None
                if holder is None:
                    if time.time() - lock.stat().st_mtime > 10:
                        lock.unlink(missing_ok=True)
                        continue
                    raise MedsegError(f"{path}: another process is taking its lock ({lock}); try again in a "
                                      "moment") from None
                if _holder_is_gone(holder):
                    lock.unlink(missing_ok=True)
                    continue
                raise MedsegError(f"{path}: {holder.get('doing', 'in use')} by another process (host "
                                  f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}); "
                                  f"wait for it to finish or use another folder (if that process is gone, remove "
                                  f"{lock})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            acquired = True
            break
        else:
            raise MedsegError(f"{path}: could not take its lock {lock}; try again")
        yield
    finally:
        if acquired:
            lock.unlink(missing_ok=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty: the command wrote into it
                folder.rmdir()
