"""A full disk or a read-only output while checkpointing: the run stops with one clear line,
the previous checkpoint stays loadable, and running again continues from it."""

from __future__ import annotations

import errno

import pytest

from tests.reliability.faults import (
    checkpoint_problems,
    demo_shards,
    limit_file_size_after,
    starved_run,
    train_command,
)
from vlp import checkpoint
from vlp.train import main

STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("shards"), num_samples=120, per_shard=15)


def test_file_size_limit_hit_mid_run(shards, tmp_path):
    """RLIMIT_FSIZE, lowered once two checkpoints exist, fails the next checkpoint's writes."""
    run_dir = tmp_path / "run"
    result = starved_run(shards, run_dir, STEPS, limit_file_size_after(run_dir, 2))
    assert result.clean and result.resumed, result


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
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    root = run_dir / checkpoint.CHECKPOINT_DIR
    assert f"{root / 'step_000000002'} is intact" in errors[0]
    assert checkpoint_problems(root / "step_000000002") == []
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
