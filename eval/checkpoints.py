"""Find the weights to evaluate: a checkpoint directory, a run's latest checkpoint, or a file.

The run layout (RUN/checkpoints/step_N/{model.safetensors,meta.json}, RUN/metrics.jsonl) is
vlp.runlayout's, shared with training. A checkpoint is written under a name starting with "."
and renamed when complete, so a `step_*` directory with a `meta.json` is complete; the latest is
the one with the highest step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from eval.errors import UsageError
from vlp.runlayout import (
    CHECKPOINT_DIR,
    EXPORT_FILE,
    META_FILE,
    OPEN_CLIP_CONFIG_FILE,
    CheckpointMeta,
    complete_checkpoints,
)


@dataclass(frozen=True)
class CheckpointRef:
    """What to load: open_clip model `model_name` with the weights in `weights`."""

    weights: Path
    model_name: str
    step: int | None = None
    """Training step of a vlp checkpoint; None for a bare weights file."""
    run_dir: Path | None = None
    hub_dir: Path | None = None
    """A directory with open_clip's hub config (OPEN_CLIP_CONFIG_FILE): the model is built from
    it (`local-dir:`), which holds what a name cannot, e.g. a Hugging Face text tower."""


def is_run_dir(path: Path) -> bool:
    return (path / CHECKPOINT_DIR).is_dir()


def latest_checkpoint(run_dir: Path) -> Path:
    """The complete checkpoint with the highest step; a usage error if there is none."""
    found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
    if not found:
        raise UsageError(
            f"{run_dir / CHECKPOINT_DIR}: no complete checkpoint (a step_* directory with "
            f"{META_FILE}); wait for the first checkpoint or pass a checkpoint directory"
        )
    return found[-1]


def resolve_checkpoint(path: Path, model_name: str | None = None) -> CheckpointRef:
    """A run directory, a checkpoint directory or a weights file -> what to load.

    `model_name` overrides the name recorded in a checkpoint's meta.json and is required
    for a bare weights file.
    """
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint, run directory or weights file")
    if path.is_file():
        if model_name is None:
            raise UsageError(f"{path} is a weights file: pass --model NAME (its architecture)")
        return CheckpointRef(weights=path, model_name=model_name)
    if path.name == CHECKPOINT_DIR and is_run_dir(path.parent):
        path = path.parent
    if is_run_dir(path):
        return replace(_from_checkpoint_dir(latest_checkpoint(path), model_name), run_dir=path)
    if (path / META_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        return replace(_from_checkpoint_dir(path, model_name), run_dir=run_dir)
    raise UsageError(
        f"{path}: neither a checkpoint directory (no {META_FILE}) nor a run directory "
        f"(no {CHECKPOINT_DIR}/); an unfinished checkpoint has no {META_FILE} yet"
    )


def _from_checkpoint_dir(directory: Path, model_name: str | None) -> CheckpointRef:
    meta = read_meta(directory)
    weights = directory / EXPORT_FILE
    if not weights.is_file():
        raise UsageError(f"{weights}: missing; the checkpoint has no open_clip weights export")
    hub = directory if (directory / OPEN_CLIP_CONFIG_FILE).is_file() and not model_name else None
    model_name = model_name or meta.model_name
    if model_name is None:
        raise UsageError(f"{directory / META_FILE}: no config.model.name; pass --model NAME")
    return CheckpointRef(weights, model_name, meta.step, hub_dir=hub)


def read_meta(directory: Path) -> CheckpointMeta:
    path = directory / META_FILE
    try:
        return CheckpointMeta.read(directory)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path}: cannot read checkpoint metadata ({err})") from err
