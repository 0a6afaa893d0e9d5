"""How a run starts in its directory: fresh or resumed, never silently on top of another run.

    RUN/.vlp.lock        held by the run's first process for its whole life (vlp/runlock.py)
    RUN/history.jsonl    one record per start, stop and finish (HISTORY_FILE)

A directory "holds a run" once it has a complete checkpoint or a metrics record. Starting there
without `resume` is refused (ConfigError, one line) naming the ways on; `--overwrite` moves the
old run aside to `RUN.old-N` (the first free N) instead, deleting nothing. Resuming from a
checkpoint older than the directory's newest is refused the same way (its later checkpoints and
records would be replaced); with `--overwrite` the run continues from that checkpoint in the
moved copy, and the metrics records up to its step are carried into the new directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp import checkpoint, runlock
from vlp.config import ConfigError
from vlp.metrics import records_up_to, write_records
from vlp.runlayout import CHECKPOINT_DIR, HISTORY_FILE, METRICS_FILE

MOVED = ".old-"
"""Old runs moved aside by --overwrite: RUN.old-1, RUN.old-2, ..."""
NOT_COMPARED = ("resume",)
"""Config keys that say how a run starts, not what it trains: never a "change" on resume."""


@dataclass(frozen=True)
class Contents:
    checkpoints: list[Path]
    """Complete checkpoints, in step order."""
    records: int
    """Lines of metrics.jsonl."""

    @property
    def holds_run(self) -> bool:
        return bool(self.checkpoints or self.records)

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            parts.append(f"checkpoints up to step {_step(self.checkpoints[-1])}")
        if self.records:
            parts.append(f"{self.records} metrics records")
        return " and ".join(parts)


def contents(run_dir: Path) -> Contents:
    metrics = run_dir / METRICS_FILE
    records = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    return Contents(checkpoint.complete_checkpoints(run_dir / CHECKPOINT_DIR), records)


@dataclass(frozen=True)
class Start:
    """What rank 0 decided, sent to every rank."""

    checkpoint: str | None
    """The checkpoint to resume from (None: a fresh start)."""
    moved_to: str | None = None
    """Where --overwrite moved the directory's previous run."""


def claim(run_dir: Path, resume: str | None, overwrite: bool, program: str):
    """Lock `run_dir` and decide the start: (RunLock, Start). Rank 0 only; raises runlock.Busy
    or ConfigError (the lock released) when the run must not start."""
    advice = "wait for it to finish, stop it, or choose another run.output_dir"
    lock = runlock.acquire(run_dir, program, advice=advice)
    try:
        start = _decide(run_dir, resume, overwrite)
        if start.moved_to is not None:  # our lock moved with the old directory
            moved_lock, lock = lock, runlock.acquire(run_dir, program, advice=advice)
            moved_lock.release()
    except BaseException:
        lock.release()
        raise
    return lock, start


def _decide(run_dir: Path, resume: str | None, overwrite: bool) -> Start:
    found = contents(run_dir)
    if resume == "latest":
        if overwrite and found.holds_run:
            return Start(None, str(move_aside(run_dir)))
        return Start(str(found.checkpoints[-1]) if found.checkpoints else None)
    if resume is None:
        if not found.holds_run:
            return Start(None)
        if overwrite:
            return Start(None, str(move_aside(run_dir)))
        raise ConfigError(
            f"{run_dir} already holds a run ({found.describe()}): continue it with "
            "resume=latest, choose a new run.output_dir, or pass --overwrite to move it aside "
            f"to {_free_name(run_dir)} and start afresh"
        )
    return _resume_from(run_dir, checkpoint.resolve(resume, run_dir), found, overwrite)


def _resume_from(run_dir: Path, path: Path, found: Contents, overwrite: bool) -> Start:
    """resume=PATH: a checkpoint of this directory or of another run."""
    root = (run_dir / CHECKPOINT_DIR).resolve()
    inside = path.resolve().parent == root
    later = [c for c in found.checkpoints if _step(c) > _step(path)] if inside else []
    if (inside and not later) or not (inside or found.holds_run):
        return Start(str(path))
    if not overwrite:
        what = f"checkpoints after step {_step(path)}" if inside else found.describe()
        raise ConfigError(
            f"{run_dir} holds {what}, which resuming from {path} would replace: continue the "
            "newest with resume=latest, resume into a new run.output_dir, or pass --overwrite "
            f"to move {run_dir} aside to {_free_name(run_dir)} first"
        )
    moved = move_aside(run_dir)
    if not inside:
        return Start(str(path), str(moved))
    path = moved / path.resolve().relative_to(run_dir.resolve())
    run_dir.mkdir()
    write_records(run_dir / METRICS_FILE, records_up_to(moved / METRICS_FILE, _step(path)))
    return Start(str(path), str(moved))


def move_aside(run_dir: Path) -> Path:
    """Rename run_dir to the first free RUN.old-N; returns the new name."""
    while True:
        target = _free_name(run_dir)
        try:
            target.mkdir()  # reserves the name: renaming onto an empty directory replaces it
        except FileExistsError:
            continue
        os.replace(run_dir, target)
        return target


def _free_name(run_dir: Path) -> Path:
    number = 1
    while run_dir.with_name(f"{run_dir.name}{MOVED}{number}").exists():
        number += 1
    return run_dir.with_name(f"{run_dir.name}{MOVED}{number}")


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [saved value, current value]} for every key whose value differs."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted((old.keys() | new.keys()) - set(NOT_COMPARED))
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_changes(changes: dict[str, list[Any]]) -> str:
    """`train.lr 0.001 -> 0.002, train.steps 300 -> 600` (long values shortened)."""
    return ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def record(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one history record (main process only)."""
    entry = {
        "event": event,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **fields,
    }
    with (run_dir / HISTORY_FILE).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
