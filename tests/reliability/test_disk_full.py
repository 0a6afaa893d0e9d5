"""A full disk or a read-only output while checkpointing: the run stops with one clear line,
the previous checkpoint stays loadable, and running again continues from it."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import time

import pytest

from tests.reliability.faults import REPO, checkpoint_problems, demo_shards, train_command
from vlp import checkpoint
from vlp.train import main

STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("shards"), num_samples=120, per_shard=15)


def _check_stopped_cleanly(run_dir, stderr: str, code: int) -> None:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("vlp-train: error: cannot write checkpoint")
    root = run_dir / checkpoint.CHECKPOINT_DIR
    latest = checkpoint.complete_checkpoints(root)[-1]
    assert f"{latest} is intact" in errors[0]
    assert checkpoint_problems(latest) == []
    assert not [p for g in checkpoint.HIDDEN_GLOBS for p in root.glob(g)], "temporary left"


def test_file_size_limit_hit_mid_run(shards, tmp_path):
    """RLIMIT_FSIZE, lowered once two checkpoints exist, makes every larger write fail (EFBIG)
    as a full disk would, without root or a special filesystem."""
    run_dir = tmp_path / "run"
    command = train_command(shards, run_dir, STEPS, "train.log_every_steps=100")
    process = subprocess.Popen(
        command, cwd=REPO, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    )  # fmt: skip
    second = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(2)
    deadline = time.monotonic() + 300
    while not second.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (16384, 16384))
    _, stderr = process.communicate(timeout=300)
    _check_stopped_cleanly(run_dir, stderr, process.returncode)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-2000:]


def test_read_only_output_at_the_third_checkpoint(shards, tmp_path, monkeypatch, capsys):
    """A filesystem that turns read-only (the shim fails the third export write with EROFS)."""
    calls = []
    real = checkpoint.save_file

    def read_only_on_third(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", read_only_on_third)
    run_dir = tmp_path / "run"
    command = train_command(shards, run_dir, STEPS, "data.workers=0")
    code = main(command[4:])
    _check_stopped_cleanly(run_dir, capsys.readouterr().err, code)
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        "step_000000001",
        "step_000000002",
    ]


def test_output_directory_that_cannot_be_created_is_one_line(shards, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(train_command(shards, blocker / "run", STEPS, "data.workers=0")[4:])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and str(blocker) in err, err
