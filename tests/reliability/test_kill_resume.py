"""SIGKILL at random points and in the middle of checkpoint writes; every resume continues from
a complete checkpoint and the run lands on the uninterrupted run's weights."""

from __future__ import annotations

import subprocess

import torch

from tests.reliability.faults import (
    REPO,
    demo_shards,
    final_weights,
    kill_and_resume,
    train_command,
)
from vlp import checkpoint
from vlp.runlayout import CheckpointMeta

STEPS = 30  # enough that the resumed run is still going when the second kill comes


def test_kills_mid_run_and_mid_save_resume_to_identical_weights(tmp_path):
    shards = demo_shards(tmp_path / "shards", num_samples=120, per_shard=15)
    straight = tmp_path / "straight"
    subprocess.run(train_command(shards, straight, STEPS), cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    report = kill_and_resume(shards, tmp_path / "killed", STEPS, kills=2, seed=0)
    assert report.completed, report
    assert report.kills == 2 and report.kills_while_saving >= 1, report
    assert (
        report.corrupt_latest == [] and report.starts_with_checkpoint == report.resumed_at_latest
    ), report  # on a loaded machine both kills may land before the first checkpoint exists
    a, b = final_weights(straight, STEPS), final_weights(tmp_path / "killed", STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Accelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass


class _Engine:
    """Just what checkpoint.save needs from an engine (vlp/engine.py), on one process."""

    accelerator = _Accelerator()

    def save_state(self, directory):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x")
        return {"clip.w": torch.zeros(1)}


def test_a_kill_while_deleting_never_leaves_a_step_directory_resume_could_pick(
    tmp_path, monkeypatch
):
    """Pruning renames a checkpoint to a hidden name before removing it: interrupt the removal
    and the half-deleted directory is invisible, and the next save clears it."""
    for step in (1, 2):
        checkpoint.save(_Engine(), tmp_path, step, CheckpointMeta(step=step), keep=2)

    real_rmtree = checkpoint.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if path.exists():  # the weights are gone, meta.json not yet: then the process dies
            real_rmtree(path / checkpoint.STATE_DIR)
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    try:
        checkpoint.save(_Engine(), tmp_path, 3, CheckpointMeta(step=3), keep=2)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    root = tmp_path / checkpoint.CHECKPOINT_DIR
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == [
        "step_000000002",
        "step_000000003",
    ]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000000002", "step_000000003"]
    checkpoint.save(_Engine(), tmp_path, 4, CheckpointMeta(step=4), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000000003", "step_000000004"]
