"""Run a study's runs as ordinary training processes, N at once, resumably.

A run is finished when its final checkpoint (`step_<train.steps>` with its meta.json) exists:
that is what the trainer writes last, after the final evaluation. Every other run is started
with resume=latest, so a run cut short continues from its newest checkpoint and a finished one
is never trained again. Each run's output goes to RUN/study.log (appended, attempt by attempt);
RUN/study-attempts.jsonl records when each attempt started and ended, for its wall time.
Score commands run after a run's training, once: their JSON is renamed into RUN/scores/ only
when the command succeeded.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.runlayout import CHECKPOINT_DIR, META_FILE, checkpoint_name
from vlp.study.spec import Run, Study, placeholders

LOG_FILE = "study.log"
ATTEMPTS_FILE = "study-attempts.jsonl"
SCORES_DIR = "scores"
TMP_SUFFIX = ".tmp.json"
"""A score command writes `.NAME.tmp.json` (a .json name, as vlp-eval --output wants); it is
renamed to NAME.json only when the command succeeded."""
POLL_SECONDS = 0.2
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def is_finished(run: Run) -> bool:
    final = run.run_dir / CHECKPOINT_DIR / checkpoint_name(run.config.train.steps)
    return (final / META_FILE).is_file()


def score_path(run: Run, name: str) -> Path:
    return run.run_dir / SCORES_DIR / f"{name}.json"


@dataclass
class Job:
    """A run's remaining commands: its training (unless finished), then missing scores."""

    run: Run
    commands: list[tuple[str, list[str], Path | None]]
    """(what, command, the score file it must write or None for training)."""
    process: subprocess.Popen | None = None
    current: tuple[str, list[str], Path | None] | None = None
    started: float = 0.0
    failure: str | None = None
    log: Any = field(default=None, repr=False)


def plan_jobs(study: Study, threads: int) -> list[Job]:
    """Jobs of every run with something left to do, in the study's run order."""
    jobs = []
    for run in study.runs:
        commands = []
        if not is_finished(run):
            train = [sys.executable, "-m", "vlp.train", "--config", str(study.config)]
            commands.append(("train", [*train, *run.overrides, f"train.threads={threads}"], None))
        for name, command in study.scores.items():
            if not score_path(run, name).is_file():
                tmp = score_path(run, name).with_name(f".{name}{TMP_SUFFIX}")
                values = {"python": sys.executable, "run_dir": str(run.run_dir),
                          "seed": str(run.seed), "output": str(tmp)}  # fmt: skip
                commands.append((f"score {name}", placeholders(command, values), tmp))
        if commands:
            jobs.append(Job(run, commands))
    return jobs


def run_jobs(jobs: list[Job], parallel: int, say: Callable[[str], None]) -> list[Job]:
    """Run the jobs, `parallel` at once; returns those that failed (each says why).

    A SIGTERM or Ctrl-C stops every running command before it propagates; the kernel kills
    the commands if this process is killed outright (Linux), so a killed study never leaves a
    trainer behind that a restarted study would race.
    """
    pending, running, failed = list(jobs), [], []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                (running if _start_next(job, say) else failed).append(job)
            time.sleep(POLL_SECONDS)
            for job in [j for j in running if j.process.poll() is not None]:
                if _finish_command(job, say) and job.commands and _start_next(job, say):
                    continue
                running.remove(job)
                if job.failure:
                    failed.append(job)
    finally:
        for job in running:
            _stop(job)
    return failed


def _start_next(job: Job, say: Callable[[str], None]) -> bool:
    """Start the job's next command, its output appended to the run's log; False if it
    could not start (job.failure says why)."""
    job.current = what, command, output = job.commands.pop(0)
    log_path = job.run.run_dir / LOG_FILE
    (log_path.parent if output is None else output.parent).mkdir(parents=True, exist_ok=True)
    if what == "train":
        _close_interrupted_attempt(job.run)  # before this attempt touches the log
    job.log = log_path.open("a")
    job.log.write(f"\n==> vlp-study: {what}: {' '.join(command)}\n")
    job.log.flush()
    job.started = time.time()
    try:
        job.process = subprocess.Popen(
            command,
            stdout=job.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    except OSError as err:  # e.g. a score command naming a program that does not exist
        job.log.close()
        job.failure = f"{what} could not start: {err}"
        say(f"{job.run.name}: {job.failure}")
        return False
    if what == "train":
        _append_attempt(job.run, {"started": job.started, "pid": job.process.pid})
    say(f"{job.run.name}: {what} started (log {log_path})")
    return True


def _finish_command(job: Job, say: Callable[[str], None]) -> bool:
    """Record how the current command ended; False (and job.failure) when it failed."""
    what, _, output = job.current
    code, seconds = job.process.returncode, time.time() - job.started
    job.log.close()
    log_path = job.run.run_dir / LOG_FILE
    if what == "train":
        _append_attempt(job.run, {"ended": time.time(), "exit": code})
    if code != 0:
        job.failure = f"{what} exited with code {code}; last lines in {log_path}"
    elif output is not None:
        job.failure = _score_problem(what, output)
    if job.failure:
        say(f"{job.run.name}: {job.failure}")
        return False
    if output is not None:
        final = output.name.removeprefix(".").removesuffix(TMP_SUFFIX) + ".json"
        os.replace(output, output.with_name(final))
    say(f"{job.run.name}: {what} done in {seconds:.0f} s")
    return True


def _score_problem(what: str, output: Path) -> str | None:
    """Why a score file is unusable (None if it is fine): study.json needs its metrics."""
    try:
        scores = json.loads(output.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{what} exited 0 but {output} is not readable JSON ({err})"
    metrics = scores.get("metrics") if isinstance(scores, dict) else None
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) for v in metrics.values()
    ):
        return f"{what}: {output} has no 'metrics' object of numbers"
    return None


def _stop(job: Job) -> None:
    if job.process is not None and job.process.poll() is None:
        job.process.terminate()
        try:
            job.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
    if job.log is not None:
        job.log.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the study process dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _append_attempt(run: Run, record: dict[str, Any]) -> None:
    with (run.run_dir / ATTEMPTS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _close_interrupted_attempt(run: Run) -> None:
    """An attempt whose study was killed has no end: it ended with its log's last write."""
    records = list(read_attempts(run))
    if records and "started" in records[-1]:
        log = run.run_dir / LOG_FILE
        ended = log.stat().st_mtime if log.is_file() else records[-1]["started"]
        _append_attempt(run, {"ended": ended, "exit": None, "interrupted": True})


def read_attempts(run: Run) -> Iterator[dict[str, Any]]:
    path = run.run_dir / ATTEMPTS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue


def wall_time(run: Run) -> tuple[float, int]:
    """(seconds trained over all attempts, number of attempts) of a finished run."""
    seconds, attempts, started = 0.0, 0, None
    for record in read_attempts(run):
        if "started" in record:
            started, attempts = record["started"], attempts + 1
        elif "ended" in record and started is not None:
            seconds += record["ended"] - started
            started = None
    return seconds, attempts


def run_prepare(study: Study, say: Callable[[str], None]) -> int:
    """The study's prepare commands in order; the first failure's exit code, else 0."""
    for command in study.prepare:
        filled = placeholders(command, {"python": sys.executable})
        say(f"prepare: {' '.join(filled)}")
        code = subprocess.run(filled, stdin=subprocess.DEVNULL).returncode
        if code != 0:
            say(f"prepare command failed with exit code {code}: {' '.join(filled)}")
            return code
    return 0
