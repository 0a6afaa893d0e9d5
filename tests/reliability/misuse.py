"""Run directories misused as a new user would, for bench/reliability.py's misuse trials.

On a finished run: a fresh start (resume unset), a resume with a changed data stream, a resume
with changed settings, a second writer while the run goes on, and `--overwrite`. Each trial
records what vlp said and what the directory lost: metrics records and checkpoints that were
there before and are gone after (a refused start must leave every byte; a continued run keeps
every record up to its checkpoint; --overwrite keeps the old run whole beside the new one).
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.faults import REPO, train_command
from vlp import checkpoint
from vlp.metrics import METRICS_FILE


@dataclass
class Trial:
    name: str
    exit_code: int
    lines: list[str]
    """vlp's error and warning lines."""
    traceback: bool
    records_lost: int
    checkpoints_lost: int
    as_documented: bool
    notes: list[str] = field(default_factory=list)


def _records(run_dir: Path) -> set[str]:
    path = run_dir / METRICS_FILE
    return set(path.read_text().splitlines()) if path.is_file() else set()


def _checkpoints(run_dir: Path) -> set[str]:
    found = checkpoint.complete_checkpoints(run_dir / checkpoint.CHECKPOINT_DIR)
    return {p.name for p in found}


def _trial(name: str, result, before: tuple, after_dir: Path, expect_code: int, expect: list[str],
           keep_checkpoints: bool = True) -> Trial:  # fmt: skip
    """Compare the directory with `before` (records, checkpoints) and the output with what the
    docs promise: `expect_code` and one line containing each of `expect`."""
    records, checkpoints = before
    lines = [line for line in result.stderr.splitlines() if "error" in line or "warning:" in line]
    said = [line for line in lines if all(text in line for text in expect)]
    lost_checkpoints = len(checkpoints - _checkpoints(after_dir)) if keep_checkpoints else 0
    trial = Trial(name, result.returncode, lines, "Traceback" in result.stderr,
                  len(records - _records(after_dir)), lost_checkpoints, False)  # fmt: skip
    trial.as_documented = (
        result.returncode == expect_code and len(said) == 1 and not trial.traceback
        and trial.records_lost == 0 and trial.checkpoints_lost == 0
    )  # fmt: skip
    return trial


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def misuse_trials(shards: str, work: Path, steps: int) -> list[Trial]:
    run = work / "run"
    command = train_command(shards, run, steps, "checkpoint.every_steps=2")
    finished = _run(command)
    assert finished.returncode == 0, finished.stderr[-2000:]
    state = (_records(run), _checkpoints(run))
    trials = [
        _trial("fresh start on a finished run", _run([*command, "resume=null"]), state, run, 2,
               [f"{run} already holds a run", "--overwrite"]),
        _trial("resume with a changed data stream", _run([*command, "data.batch_size=4"]),
               state, run, 2, ["different data stream", "batch_size"]),
        _trial("resume with changed settings",
               _run([*command, f"train.steps={steps + 2}", "train.lr=2e-3"]), state, run, 0,
               ["warning: resuming with a changed config", "train.lr", "train.steps"],
               keep_checkpoints=False),  # checkpoint.keep prunes as the run goes on
    ]  # fmt: skip
    trials.append(_second_writer(command, run, steps + 2))
    state = (_records(run), _checkpoints(run))
    overwrite = _run([*command, "resume=null", "train.steps=1", "--overwrite"])
    moved = run.with_name(f"{run.name}.old-1")
    trials.append(_trial("--overwrite on a run", overwrite, state, moved, 0, []))
    trials[-1].as_documented = (
        overwrite.returncode == 0 and trials[-1].records_lost == 0
        and trials[-1].checkpoints_lost == 0 and f"to {moved} (--overwrite)" in overwrite.stderr
    )  # fmt: skip
    return trials


def _second_writer(command: list[str], run: Path, done: int) -> Trial:
    """The run goes on (40 more steps); a second identical command starts meanwhile and must be
    refused at once; the first is then stopped with SIGTERM and keeps every record."""
    first = subprocess.Popen([*command, f"train.steps={done + 40}"], cwd=REPO,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in first.stderr:
        if "vlp-train: resumed" in line:
            break
    state = (_records(run), _checkpoints(run))
    started = time.monotonic()
    second = _run([*command, f"train.steps={done + 40}"])
    seconds = time.monotonic() - started
    first.send_signal(signal.SIGTERM)
    rest = first.communicate(timeout=900)[1]
    holder = f"{run} is in use by vlp-train (pid {first.pid} "
    trial = _trial("second writer while the run goes on", second, state, run, 2, [holder],
                   keep_checkpoints=False)  # fmt: skip
    trial.notes.append(f"refused after {seconds:.1f} s (process start included)")
    trial.notes.append(f"first run: exit {first.returncode} after SIGTERM")
    trial.as_documented &= first.returncode == 143 and "stopped by SIGTERM" in rest
    return trial
