"""What a checkpoint records of a run's position, and whether a resume can continue it exactly.

A run continues bitwise from a checkpoint only on the same batch stream: `stream_identity`
lists everything that stream depends on, `checkpoint_meta` records it with every rank's data
positions (collective), and `check_resume` refuses a checkpoint of another model or stream.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlp import distributed
from vlp.config import Config, ConfigError, to_dict
from vlp.data.pipeline import Position
from vlp.runlayout import CheckpointMeta


def stream_identity(cfg: Config, method: dict[str, Any]) -> dict[str, Any]:
    """Everything the batch stream depends on; `method`: the method's share of it."""
    data = cfg.data
    return {
        "train_shards": data.train_shards,
        "sources": [asdict(source) for source in data.sources],
        "mode": data.mode,
        "seed": cfg.train.seed,
        "shuffle_buffer": data.shuffle_buffer,
        "batch_size": data.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "workers": max(1, data.workers),
        "processes": distributed.world_size(),
        "keys": [data.image_key, data.text_key, data.caption, data.decoder_caption]
        + ([asdict(data.subcaptions)] if data.caption == "subcaptions" else []),
        **method,
    }


def checkpoint_meta(
    step: int, global_batch: int, cfg: Config, positions: dict[int, Position], stream: dict
) -> CheckpointMeta:
    """Collective: this step's meta.json, with the data positions of every rank."""
    all_positions = distributed.all_gather_objects({w: asdict(p) for w, p in positions.items()})
    skipped: Counter = Counter()
    for rank_positions in all_positions:
        for position in rank_positions.values():
            skipped.update(position["bad"])
    return CheckpointMeta(
        step=step,
        samples_seen=step * global_batch,
        config=to_dict(cfg),
        data={"positions": all_positions, "stream": stream},
        skipped=dict(skipped),
    )


def check_resume(meta: CheckpointMeta, path: Path, cfg: Config, stream: dict[str, Any]) -> None:
    """A ConfigError unless the checkpoint is complete and holds this model and stream."""
    if meta.step is None or "stream" not in meta.data or "positions" not in meta.data:
        raise ConfigError(f"resume: {path}: its meta.json lacks the step or the data position")
    if meta.model_name != cfg.model.name:
        raise ConfigError(f"resume: {path} holds a {meta.model_name}, not {cfg.model.name}")
    saved = meta.data["stream"]
    changed = [k for k in {**stream, **saved} if saved.get(k) != stream.get(k)]
    if changed:
        raise ConfigError(
            f"resume: {path} was trained on a different data stream ({', '.join(changed)} "
            "changed), so it cannot continue exactly; restore them or use a new run.output_dir"
        )


def rank_positions(meta: CheckpointMeta) -> dict[int, Position]:
    """This rank's data positions in a checkpoint, by worker."""
    saved = meta.data["positions"][distributed.rank()]
    return {int(worker): Position.from_dict(p) for worker, p in saved.items()}
