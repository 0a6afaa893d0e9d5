"""Checkpoints: accelerate state + meta.json + an open_clip export, written atomically.

    RUN/checkpoints/step_000000100/
        state/               model (safetensors), optimizer, RNG states (vlp/engine.py)
        model.safetensors    open_clip weights: open_clip.create_model(name, pretrained=this file)
        open_clip_config.json  open_clip's hub config: create_model_and_transforms("local-dir:DIR")
        episode.safetensors  ProtoCLIP runs in a clustering episode: its labels and prototypes
        episode_keys.json    (and the sample keys they belong to)
        meta.json            step, samples seen, data positions, skipped samples, config, versions

Every file goes into a hidden `.step_*.tmp` directory that is renamed when complete, so a run
killed while saving leaves no directory that `resume=latest` could mistake for a checkpoint.
Deleting works the other way round: a checkpoint is first renamed to a hidden `.step_*.old` name,
then removed, so a kill in the middle of a deletion never leaves a half-deleted `step_*`.
A write that fails (disk full, read-only output) removes the temporary and raises
CheckpointError naming the newest complete checkpoint, which stays untouched.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from vlp.config import ConfigError
from vlp.runlayout import (
    CHECKPOINT_DIR,
    EXPORT_FILE,
    META_FILE,
    STATE_DIR,
    CheckpointMeta,
    checkpoint_name,
    complete_checkpoints,
)

VERSIONED = ("vlp", "torch", "open_clip_torch", "accelerate", "webdataset")
HIDDEN_GLOBS = (".step_*.tmp", ".step_*.old")
"""Temporaries of interrupted saves and deletions: never loaded, removed by the next save."""
OUTPUT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
    errno.ENOTDIR, errno.EISDIR,
}  # fmt: skip
"""Write failures that mean "this output location cannot take the data": a user-side problem."""


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What a failed write raises: OSError from Python, RuntimeError from torch.save ("unexpected
pos ..." on a full disk), SafetensorError from safetensors ("I/O error: No space left")."""


class CheckpointError(Exception):
    """A checkpoint could not be written; the previous one is intact (one line, exit 1)."""


def versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def save(
    engine,
    run_dir: Path,
    step: int,
    meta: CheckpointMeta,
    keep: int,
    extra: Callable[[Path], None] | None = None,
    hub: Any = None,
) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory.

    `engine` (vlp/engine.py) writes the model, optimizer and RNG states into state/ and hands
    back the whole model state for the open_clip export.

    `extra(directory)` writes further files of the main process into the checkpoint (before
    meta.json, so they are part of what makes it complete); `hub` (vlp.model.OpenClipHub) writes
    what lets open_clip load the checkpoint by path."""
    root = run_dir / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    temporary = root / f".{final.name}.tmp"
    main = engine.accelerator.is_main_process
    try:
        if main:
            _remove_hidden(root)
            temporary.mkdir(parents=True)
        engine.accelerator.wait_for_everyone()
        weights = engine.save_state(temporary / STATE_DIR)
        if main:
            _write_files(weights, temporary, meta, extra, hub)
            if final.exists():  # a rerun that reached the same step: replace it whole
                _delete(final)
            os.replace(temporary, final)
            _prune(root, keep)
    except WRITE_ERRORS as err:
        shutil.rmtree(temporary, ignore_errors=True)  # give the space back
        raise CheckpointError(_failure(err, final)) from err
    engine.accelerator.wait_for_everyone()
    return final


def open_clip_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The open_clip model's own weights (VLPModel keeps it as `clip`), contiguous, on CPU."""
    prefix = "clip."
    return {
        k.removeprefix(prefix): v.detach().cpu().contiguous()
        for k, v in state.items()
        if k.startswith(prefix)
    }


def _failure(err: Exception, final: Path) -> str:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    newest = complete_checkpoints(final.parent)
    kept = f"{newest[-1]} is intact" if newest else "there is no earlier checkpoint"
    free = shutil.disk_usage(final.parent).free / 2**20 if final.parent.exists() else 0
    return (
        f"cannot write checkpoint {final}: {reason} ({free:.0f} MiB free there); {kept}. "
        "Free space or make run.output_dir writable, then run again: resume=latest continues "
        "from the newest complete checkpoint"
    )


def _write_files(weights: dict[str, Tensor], temporary: Path, meta: CheckpointMeta, extra, hub):
    save_file(open_clip_weights(weights), temporary / EXPORT_FILE)
    if hub is not None:
        hub.write(temporary)
    if extra is not None:
        extra(temporary)
    # meta.json last: a directory is a checkpoint only once it has one (complete_checkpoints)
    (temporary / META_FILE).write_text(replace(meta, versions=versions()).to_json())
    _fsync_tree(temporary)


def _delete(checkpoint: Path) -> None:
    """Rename to a hidden name first: a kill mid-deletion leaves nothing resume could pick."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_hidden(root: Path) -> None:
    for pattern in HIDDEN_GLOBS:
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename publishes them (a crash must not publish zeros)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        _delete(old)


def resolve(resume: str, run_dir: Path) -> Path | None:
    """`latest` -> newest complete checkpoint of run_dir (None if there is none); else a path."""
    if resume == "latest":
        found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META_FILE).is_file():
        raise ConfigError(f"resume={resume}: not a checkpoint directory (no {META_FILE})")
    return path


def load(engine, path: Path) -> CheckpointMeta:
    """Restore model, optimizer and RNG states in place; return the checkpoint's meta.

    accelerate reads every pickled state with torch's weights_only loader, so a file carrying
    code is refused, never run; the refusal becomes a ConfigError naming the file. accelerate
    logs and ignores an unreadable RNG state, which would silently break exact resume, so
    those files are read first here.
    """
    from accelerate.utils import load as safe_load

    state = path / STATE_DIR
    culprit = state
    try:
        for culprit in sorted(state.glob("random_states_*.pkl")):
            safe_load(culprit)
        pickled = ", ".join(p.name for p in sorted(state.glob("*.bin"))) or "state"
        culprit = state / (pickled if "," not in pickled else f"{{{pickled}}}")
        engine.load_state(state)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"resume: {culprit}: not loadable as plain tensors ({first}); refusing it. "
            "Resume from another checkpoint or start a new run.output_dir"
        ) from None
    return CheckpointMeta.read(path)
