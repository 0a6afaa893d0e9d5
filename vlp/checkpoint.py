"""Checkpoints: accelerate state + meta.json + an open_clip export, written atomically.

    RUN/checkpoints/step_000000100/
        state/               accelerator.save_state: model (safetensors), optimizer, RNG states
        model.safetensors    open_clip weights: open_clip.create_model(name, pretrained=this file)
        meta.json            step, samples seen, data positions, skipped samples, config, versions

Every file goes into a hidden `.step_*.tmp` directory that is renamed when complete, so a run
killed while saving leaves no directory that `resume=latest` could mistake for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from vlp.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
EXPORT_FILE = "model.safetensors"
STATE_DIR = "state"
VERSIONED = ("vlp", "torch", "open_clip_torch", "accelerate", "webdataset")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def save(accelerator, model, run_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory."""
    root = run_dir / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    temporary = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary / STATE_DIR))
    weights = accelerator.get_state_dict(model)  # every process: FSDP gathers its shards here
    if accelerator.is_main_process:
        save_file(open_clip_weights(weights), temporary / EXPORT_FILE)
        (temporary / META_FILE).write_text(json.dumps({**meta, "versions": versions()}, indent=2))
        _fsync_tree(temporary)
        if final.exists():  # a rerun that reached the same step: replace it whole
            shutil.rmtree(final)
        os.replace(temporary, final)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def open_clip_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The open_clip model's own weights (VLPModel keeps it as `clip`), contiguous, on CPU."""
    prefix = "clip."
    return {
        k.removeprefix(prefix): v.detach().cpu().contiguous()
        for k, v in state.items()
        if k.startswith(prefix)
    }


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename publishes them (a crash must not publish zeros)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints in step order (hidden temporaries never count)."""
    found = [p for p in root.glob("step_*") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def resolve(resume: str, run_dir: Path) -> Path | None:
    """`latest` -> newest complete checkpoint of run_dir (None if there is none); else a path."""
    if resume == "latest":
        found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META_FILE).is_file():
        raise ConfigError(f"resume={resume}: not a checkpoint directory (no {META_FILE})")
    return path


def load(accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; return the checkpoint's meta."""
    accelerator.load_state(str(path / STATE_DIR))
    return json.loads((path / META_FILE).read_text())
