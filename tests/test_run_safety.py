"""Run safety: one writer per directory, fresh vs resume explicit, stop requests, the PCA check.

The fast tests fabricate run directories; the slow ones train the tiny CLIP and stop it with
signals through vlp-train, `accelerate launch` and torchrun, then check that every resume lands
on the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.reliability.faults import (
    ACCELERATE,
    checkpoint_problems,
    ctrl_c,
    demo_shards,
    final_weights,
    signal_run,
    train_command,
)
from vlp import checkpoint, rundir, runlock
from vlp.config import ConfigError, load_config
from vlp.metrics import METRICS_FILE
from vlp.stopping import StopRequests

REPO = Path(__file__).resolve().parents[1]


# ---- the lock


def test_a_second_holder_is_refused_at_once_naming_pid_and_host(tmp_path):
    with runlock.acquire(tmp_path / "run", "vlp-train"):
        started = time.monotonic()
        with pytest.raises(runlock.Busy) as refused:
            runlock.acquire(tmp_path / "run", "vlp-train", advice="choose another")
        message = str(refused.value)
        assert time.monotonic() - started < 1 and "\n" not in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert message.startswith(f"{tmp_path / 'run'} is in use by vlp-train")
        assert message.endswith("; choose another")
    with runlock.acquire(tmp_path / "run", "vlp-train"):  # released: free again
        pass
    with runlock.acquire(tmp_path / "run", "vlp-shard", name="vlp-shard-node-1"):  # another name
        runlock.acquire(tmp_path / "run", "vlp-train").release()


HOLDER = """
import multiprocessing, sys, time
from vlp import runlock
lock = runlock.acquire(sys.argv[1], "holder")
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_sigkilled_holder_frees_the_directory_at_once_though_its_children_live(tmp_path):
    """A forked child (a DataLoader worker, say) outlives its SIGKILLed parent for a while;
    it must not keep the directory locked."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(runlock.Busy, match=f"pid {holder.pid} "):
            runlock.acquire(tmp_path, "vlp-train")
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the orphan still lives
        runlock.acquire(tmp_path, "vlp-train").release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


# ---- how a run starts in its directory


def _fake_run(run_dir: Path, steps=(2, 4), records: int = 4) -> None:
    """Complete checkpoints at `steps` and metrics records at steps 1..records."""
    for step in steps:
        directory = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(step)
        directory.mkdir(parents=True)
        (directory / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    lines = [json.dumps({"step": s, "loss/total": 1.0 / s}) + "\n" for s in range(1, records + 1)]
    (run_dir / METRICS_FILE).write_text("".join(lines))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != runlock.lock_path(directory).name
    }


def _claim(run_dir: Path, resume: str | None, overwrite: bool = False) -> rundir.Start:
    lock, start = rundir.claim(run_dir, resume, overwrite, "test")
    lock.release()
    return start


def test_a_fresh_start_on_a_run_is_refused_in_one_line_and_nothing_is_touched(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    before = _snapshot(run)
    with pytest.raises(ConfigError) as refused:
        _claim(run, None)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{run} already holds a run")
    assert "checkpoints up to step 4 and 4 metrics records" in message
    for way in ("resume=latest", "run.output_dir", "--overwrite", f"{run}.old-1"):
        assert way in message
    assert _snapshot(run) == before
    runlock.acquire(run, "vlp-train").release()  # the refusal released the lock


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    before = _snapshot(run)
    (tmp_path / "run.old-1").mkdir()  # taken: the next free name is used
    for resume in (None, "latest"):
        start = _claim(run, resume, overwrite=True)
        moved = tmp_path / f"run.old-{2 if resume is None else 3}"
        assert start == rundir.Start(None, str(moved))
        assert _snapshot(moved) == before and _snapshot(run) == {}
        _fake_run(run)


def test_resume_latest_continues_the_newest_and_an_older_checkpoint_needs_overwrite(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, steps=(2, 4), records=5)
    newest, older = (run / "checkpoints" / checkpoint.checkpoint_name(s) for s in (4, 2))
    assert _claim(run, "latest") == rundir.Start(str(newest))
    assert _claim(run, str(newest)) == rundir.Start(str(newest))
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="holds checkpoints after step 2") as refused:
        _claim(run, str(older))
    assert "\n" not in str(refused.value) and _snapshot(run) == before
    start = _claim(run, str(older), overwrite=True)  # continues from the moved copy
    moved = tmp_path / "run.old-1"
    assert start == rundir.Start(str(moved / "checkpoints" / older.name), str(moved))
    assert _snapshot(moved) == before
    records = [json.loads(line)["step"] for line in (run / METRICS_FILE).open()]
    assert records == [1, 2]  # carried over up to the resumed step


def test_resuming_another_runs_checkpoint_into_a_directory_with_a_run_is_refused(tmp_path):
    _fake_run(tmp_path / "a")
    _fake_run(tmp_path / "b")
    source = tmp_path / "a" / "checkpoints" / checkpoint.checkpoint_name(4)
    with pytest.raises(ConfigError, match="which resuming from .* would replace"):
        _claim(tmp_path / "b", str(source))
    assert _claim(tmp_path / "new", str(source)) == rundir.Start(str(source))


def test_directories_that_hold_no_run_start_fresh(tmp_path):
    """Empty, missing, only a partial (hidden) checkpoint or an empty metrics file, foreign
    files: nothing of a run to lose."""
    partial = tmp_path / "partial" / "checkpoints" / ".step_000000002.tmp"
    partial.mkdir(parents=True)
    (tmp_path / "partial" / METRICS_FILE).write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for name in ("missing", "partial", "foreign"):
        for resume in (None, "latest"):
            assert _claim(tmp_path / name, resume) == rundir.Start(None)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_config_changes_name_every_changed_key_but_resume():
    old = {"train": {"lr": 0.001, "steps": 10}, "eval": {}, "resume": None, "run": {"x": [1]}}
    new = {"train": {"lr": 0.002, "steps": 10}, "eval": {"s": {"every_steps": 5}},
           "resume": "latest", "run": {"x": [1, 2]}}  # fmt: skip
    changes = rundir.config_changes(old, new)
    assert changes == {
        "eval": [{}, None],
        "eval.s.every_steps": [None, 5],
        "run.x": [[1], [1, 2]],
        "train.lr": [0.001, 0.002],
    }
    assert rundir.describe_changes({"train.lr": [0.001, 0.002]}) == "train.lr 0.001 -> 0.002"


# ---- stop requests


def test_the_first_signal_requests_a_stop_a_launchers_repeat_is_the_same_a_second_ctrl_c_not():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # accelerate's SIGTERM right after a Ctrl-C
        assert stops.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        stops._first_at -= 2  # a later SIGTERM is a second request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_worker_ending_as_the_stop_request_arrives_prints_nothing():
    """SIGINT and SIGCHLD pending together: the stop handler runs first and replaces torch's
    SIGCHLD handler; the pending SIGCHLD must still find a Python handler, or CPython prints
    'Signal 17 ignored due to race condition' with a traceback (seen at a SIGTERM stop)."""
    script = """
import os, signal, time
from vlp.stopping import StopRequests
signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # torch's DataLoader handler
both = {signal.SIGINT, signal.SIGCHLD}
with StopRequests() as stops:
    signal.pthread_sigmask(signal.SIG_BLOCK, both)
    os.kill(os.getpid(), signal.SIGCHLD)
    os.kill(os.getpid(), signal.SIGINT)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # handlers run in signal-number order
    time.sleep(0.05)
    assert stops.signum == signal.SIGINT
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines == ["vlp: SIGINT: stopping after this step (Ctrl-C again: at once)"], lines


# ---- the ProtoCLIP teacher's PCA


def _episode_config(tmp_path: Path, *overrides: str):
    (tmp_path / "sizes.json").write_text(json.dumps({f"{i}.tar": 40 for i in range(4)}))
    return load_config(None, [f"data.train_shards={tmp_path}/{{0..3}}.tar",
                              "objectives.prototype.weight=1", "prototypes.episode_shards=1",
                              "prototypes.episode_steps=2", *overrides])  # fmt: skip


def test_a_pca_wider_than_an_episode_is_one_line_at_start_up_and_at_clustering(tmp_path):
    import torch

    from vlp.data.shards import DataError
    from vlp.episode_state import Bank, Clustering, Teacher, build_state
    from vlp.episodes import EpisodePlan

    teacher = ["objectives.prototype_external.weight=1"]
    EpisodePlan.from_config(_episode_config(tmp_path, *teacher, "objectives.prototype_"
                                            "external.pca_dim=40"), 8)  # fmt: skip
    EpisodePlan.from_config(_episode_config(tmp_path), 8)  # no teacher: no PCA
    with pytest.raises(ConfigError) as refused:
        EpisodePlan.from_config(_episode_config(tmp_path, *teacher), 8)
    assert str(refused.value) == (
        "objectives.prototype_external.pca_dim=64 exceeds episode 1's 40 samples (its PCA "
        "needs as many samples as dimensions): lower it or raise prototypes.episode_shards"
    )
    rows = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    bank = Bank([f"k{i}" for i in range(12)], rows, rows, ["a caption"] * 12)
    with pytest.raises(DataError, match="pca_dim=64 exceeds the episode's 12 samples"):
        build_state(bank, Clustering(4, 5, 1, "faiss", 0), Teacher(None, 64), "cpu", print)


# ---- training runs: refusals, stop requests and exact resumes (slow)

STEPS = 40  # each stopped start trains a few steps; the last must still be ahead


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return demo_shards(tmp_path_factory.mktemp("shards"), num_samples=120, per_shard=15)


def _command(shards: str, run_dir: Path, *extra: str, launcher=None) -> list[str]:
    """The deterministic tiny-CLIP run of tests/reliability, logging every step and saving
    only at the end (or when stopped); `python vlp/train.py` unless another launcher."""
    command = train_command(shards, run_dir, STEPS, "checkpoint.every_steps=1000",
                            "train.log_every_steps=1", "data.workers=1", *extra)  # fmt: skip
    return command if launcher is None else [*launcher, *command[1:]]


def _main(capsys, command: list[str], *extra: str) -> tuple[int, str]:
    """vlp-train in this process with `command`'s arguments; (exit code, stderr)."""
    from vlp.train import main

    capsys.readouterr()
    code = main([*command[2:], *extra])
    return code, capsys.readouterr().err


def _stopped_at(result, name: str, launcher_traceback: bool = False) -> int:
    """The step the run says it stopped at, checking its line and its checkpoint (torchrun
    adds a traceback of its own after a child's non-zero exit; never one through vlp)."""
    stopped = [line for line in result.stderr.splitlines() if f"stopped by {name} at step" in line]
    assert len(stopped) == 1, result.stderr[-3000:]
    assert launcher_traceback or "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f'File "{REPO / "vlp"}' not in result.stderr, result.stderr[-3000:]
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    path = stopped[0].split(": ")[2].split(" holds it")[0]
    assert step >= result.started_at + 2 and path.endswith(checkpoint.checkpoint_name(step))
    assert not checkpoint_problems(Path(path)), checkpoint_problems(Path(path))
    return step


def _kill_group(signum: int):
    return lambda process: os.killpg(process.pid, signum)


@pytest.mark.slow
def test_stops_through_vlp_train_and_accelerate_resume_exactly_and_reuse_is_explicit(
    shards, tmp_path, capsys
):
    import torch

    straight, run = tmp_path / "straight", tmp_path / "run"
    subprocess.run(_command(shards, straight), cwd=REPO, check=True, capture_output=True)
    refused: list[tuple[int, str, int]] = []

    def second_writer_then_sigint(process) -> None:  # while the run holds its directory
        refused.append((*_main(capsys, _command(shards, run)), process.pid))
        process.send_signal(signal.SIGINT)

    stops = [  # (launcher, send, signal named, exit code)
        (None, second_writer_then_sigint, "SIGINT", 130),
        (None, lambda p: p.send_signal(signal.SIGTERM), "SIGTERM", 143),
        (ACCELERATE, ctrl_c, "SIGINT", 130),  # the launcher adds a SIGTERM to every process
        (ACCELERATE, _kill_group(signal.SIGTERM), "SIGTERM", 143),
    ]
    resumed_at = None
    for launcher, send, name, code in stops:
        result = signal_run(_command(shards, run, launcher=launcher), 2, send)
        assert result.exit_code == code, result.stderr[-3000:]
        assert result.started_at == (resumed_at or 0)
        resumed_at = _stopped_at(result, name)
        # (accelerate's copy of the child's stderr may drop the chunk its Ctrl-C interrupts)
        assert launcher or f"{name}: stopping after this step" in result.stderr
    code, err, pid = refused[0]
    holder = f"{run} is in use by vlp-train (pid {pid} on host {socket.gethostname()}, since"
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and holder in errors[0], err
    # a second Ctrl-C stops at once: nothing saved, the last stop's checkpoint stays newest
    result = signal_run(_command(shards, run), 2, ctrl_c, then=ctrl_c)
    assert result.exit_code == 130 and "interrupted: stopped at once" in result.stderr
    newest = checkpoint.complete_checkpoints(run / "checkpoints")[-1]
    assert newest.name == checkpoint.checkpoint_name(resumed_at)
    # a fresh start on the stopped run is refused and erases nothing
    before = _snapshot(run)
    code, err = _main(capsys, _command(shards, run), "resume=null")
    assert code == 2 and f"error: {run} already holds a run" in err and _snapshot(run) == before
    # the rest of the run, then the weights of the uninterrupted run, bit for bit
    subprocess.run(_command(shards, run), cwd=REPO, check=True, capture_output=True)
    a, b = final_weights(straight, STEPS), final_weights(run, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line)["step"] for line in (run / METRICS_FILE).open()]
    assert records == list(range(1, STEPS + 1))  # every record kept, none twice
    history = [json.loads(line) for line in (run / rundir.HISTORY_FILE).open()]
    events = ["start"] + ["stop", "resume"] * 4 + ["resume", "finish"]  # + the at-once start
    assert [h["event"] for h in history] == events
    # a resume with a changed setting: one warning line naming it, recorded in the history
    code, err = _main(capsys, _command(shards, run), f"train.steps={STEPS + 1}", "train.lr=2e-3")
    warning = [line for line in err.splitlines() if "warning: resuming with a changed" in line]
    assert code == 0 and len(warning) == 1 and "train.lr 0.001 -> 0.002" in warning[0]
    resume = [json.loads(line) for line in (run / rundir.HISTORY_FILE).open()][-2]
    assert resume["changed"] == {"train.lr": [0.001, 0.002], "train.steps": [STEPS, STEPS + 1]}
    # --overwrite: the old run moves aside whole, a fresh one starts
    before = _snapshot(run)
    code, err = _main(capsys, _command(shards, run), "resume=null", "train.steps=1", "--overwrite")
    assert code == 0 and f"to {run}.old-1 (--overwrite)" in err
    assert _snapshot(tmp_path / "run.old-1") == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == [checkpoint.checkpoint_name(1)]


def _torchrun(*args: str) -> list[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), *args]


def _signal_rank_1(process) -> None:
    """SIGTERM to the second process only: the first must stop at the same step."""
    import psutil

    ranks = {p.environ().get("RANK"): p for p in psutil.Process(process.pid).children()}
    ranks["1"].send_signal(signal.SIGTERM)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_exactly(shards, tmp_path):
    import torch

    straight, run = tmp_path / "straight", tmp_path / "run"
    command = _torchrun(*_command(shards, straight)[1:])
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    result = signal_run(_torchrun(*_command(shards, run)[1:]), 2, _signal_rank_1)
    step = _stopped_at(result, "SIGTERM", launcher_traceback=True)  # said by the first process
    meta = json.loads((run / "checkpoints" / checkpoint.checkpoint_name(step) / "meta.json")
                      .read_text())  # fmt: skip
    assert len(meta["data"]["positions"]) == 2 and meta["step"] == step
    # a refused start of 2 processes: both end at once, none waits for the other
    fresh = subprocess.run(_torchrun(*_command(shards, run, "resume=null")[1:]), cwd=REPO,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fresh.returncode != 0 and f"error: {run} already holds a run" in fresh.stderr
    subprocess.run(_torchrun(*_command(shards, run)[1:]), cwd=REPO, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    a, b = final_weights(straight, STEPS), final_weights(run, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- vlp-shard: one writer per output and node; files on disk before they are published


def test_vlp_shard_refuses_a_second_writer_of_an_output_but_not_another_node(tmp_path, capsys):
    from data_tools.cli import main

    out = tmp_path / "demo"
    args = ["demo", str(out), "--num-samples", "4", "--eval-samples", "2", "--image-size", "16",
            "--samples-per-shard", "2"]  # fmt: skip
    with runlock.acquire(out / "train", "vlp-shard", name="vlp-shard-node-0"):
        assert main(args) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(errors) == 1 and errors[0].startswith(
            f"vlp-shard: error: {out / 'train'} is in use by vlp-shard (pid {os.getpid()} "
        )
        assert not list((out / "train").glob("*.tar"))
        assert main([*args, "--num-nodes", "2", "--node-rank", "1"]) == 0  # node 1's shards
    assert [p.name for p in sorted((out / "train").glob("*.tar"))] == ["00001.tar"]
    assert main(args) == 0 and len(list((out / "train").glob("*.tar"))) == 2


def test_vlp_shard_flushes_every_file_before_renaming_it_into_place(tmp_path, monkeypatch):
    from data_tools import writer
    from data_tools.cli import main

    synced, unsynced = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(source, target) -> None:
        if str(Path(source).resolve()) not in synced:
            unsynced.append(str(source))
        real_replace(source, target)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "replace", replace)
    args = ["demo", str(tmp_path), "--num-samples", "4", "--eval-samples", "2", "--image-size",
            "16", "--samples-per-shard", "2"]  # fmt: skip
    assert main(args) == 0
    assert synced and unsynced == []
