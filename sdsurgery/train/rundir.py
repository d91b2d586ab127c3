"""A fine-tuning run's directory: claimed with an OS lock, metrics kept as valid JSON lines.

Two runs must never write into one directory (their metrics would interleave and the model of
one would sit beside the recipe of the other). A run holds an exclusive ``flock`` on
``RUN/.lock`` for its whole life; the OS releases it when the process ends, however it ends,
so a crash never leaves a stale lock. The file holds the holder's PID while it runs and is
emptied on a clean exit: a PID found in it when taking the lock means the last holder crashed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import SurgeryError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

__all__ = ["LOCK", "METRICS", "STEPS", "RunDirError", "RunLock", "claim", "empty", "append_metrics", "truncate_metrics",
           "json_safe"]

LOCK = ".lock"
METRICS = "metrics.jsonl"   # one line per epoch
STEPS = "steps.jsonl"       # one line every train.log_every_steps optimizer steps


# Lock descriptors this process holds. A forked child (a DataLoader worker) would inherit them
# and keep the lock alive after its parent is killed: children close their copies at once.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # not LOCK_UN: that would free the parent's lock too
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunDirError(SurgeryError, ValueError):
    """A run directory is in use by another run, or cannot be used."""


class RunLock:
    """An exclusive lock on a run directory; ``release()`` (or process exit) frees it."""

    def __init__(self, directory: Path, fd: int | None, crashed_pid: int | None):
        self.directory, self._fd, self.crashed_pid = directory, fd, crashed_pid

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a clean exit leaves no PID behind
            finally:
                _HELD.discard(self._fd)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(directory: Path) -> RunLock | int:
    """The lock on ``directory`` (created if needed), or the PID of the run holding it."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock(directory, None, None)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = _pid(fd)
        os.close(fd)
        return pid if pid is not None else -1
    _HELD.add(fd)
    crashed = _pid(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(directory, fd, crashed)


def _pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _holds_a_run(directory: Path) -> bool:
    return directory.exists() and any(p.name != LOCK for p in directory.iterdir())


def claim(path: Path, *, resume: bool) -> tuple[RunLock, int]:
    """Lock the directory a run will write to: ``path`` itself when resuming (refused while
    another run holds it), else the first of ``path``, ``path-2``, ``path-3``... that holds no
    run and no other process holds. Returns the lock and the suffix number (1 for ``path``)."""
    path = Path(path)
    if resume:
        got = _lock(path)
        if isinstance(got, int):
            raise RunDirError(f"run directory {path} is in use by another sdsurgery run (PID "
                              f"{got if got > 0 else 'unknown'}); wait for it to finish, or stop it "
                              f"before resuming")
        return got, 1
    n = 1
    while True:
        candidate = path if n == 1 else Path(f"{path}-{n}")
        if not _holds_a_run(candidate):
            got = _lock(candidate)
            if isinstance(got, RunLock):
                if not _holds_a_run(candidate):  # another run may have filled it before we locked
                    return got, n
                got.release()
        n += 1


def empty(directory: Path) -> None:
    """Remove what a run wrote into ``directory``, keeping its lock: for a new run that failed
    before training (``claim`` gave it a directory holding nothing but the lock)."""
    for path in Path(directory).iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_metrics(run_dir: Path, record: dict[str, Any], name: str = METRICS) -> None:
    """Append one line to ``metrics.jsonl`` (or ``name``); valid JSON: non-finite numbers
    become null."""
    with open(Path(run_dir) / name, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def truncate_metrics(run_dir: Path, done: int, name: str = METRICS, key: str = "epoch") -> int:
    """Keep the lines whose ``key`` is at most ``done`` (a run killed after writing a line but
    before its checkpoint would otherwise repeat it on resume); returns the lines dropped."""
    path = Path(run_dir) / name
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            value = json.loads(line).get(key)
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, int) and value <= done:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return dropped
