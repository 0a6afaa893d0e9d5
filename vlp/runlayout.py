"""The run directory's layout: every name on disk, the `meta.json` schema, the eval task names.

Torch-free (only the standard library), so vlp/ and eval/ share it the way vlp/data/format.py
holds the shard format:

    RUN/config.yaml                      the resolved config (CONFIG_FILE)
    RUN/metrics.jsonl                    one JSON record per log step (METRICS_FILE)
    RUN/history.jsonl                    one record per start, stop and finish (HISTORY_FILE)
    RUN/checkpoints/step_000000100/      CHECKPOINT_DIR / checkpoint_name(100)
        state/                           model, optimizer, RNG states (STATE_DIR; vlp/engine.py)
        model.safetensors                open_clip weights (EXPORT_FILE)
        open_clip_config.json            open_clip's hub config (OPEN_CLIP_CONFIG_FILE)
        meta.json                        CheckpointMeta (META_FILE), written last
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoints"
STATE_DIR = "state"
EXPORT_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_MODEL_FILE = "model.safetensors"
STATE_OPTIMIZER_FILE = "optimizer.bin"
"""Inside STATE_DIR: the whole model and the optimizer state, under accelerate's names for its
model 0 and optimizer 0; vlp's FSDP engine writes the same two files itself."""
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
"""{"model_cfg": ..., "preprocess_cfg": ...} as open_clip's hub layout has it: with it, open_clip
loads a checkpoint (or an export) by path alone, `create_model_and_transforms("local-dir:DIR")`,
finding its weights as EXPORT_FILE (a checkpoint) or HUB_WEIGHTS_FILE (an export)."""
HUB_WEIGHTS_FILE = "open_clip_model.safetensors"
"""The weights of `vlp-eval export`, under the name open_clip's hub layout prefers."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""A Hugging Face text tower's tokenizer files, copied beside OPEN_CLIP_CONFIG_FILE: open_clip's
`local-dir:` loader reads the tokenizer from that directory itself."""
HF_TEXT_DIR = "hf_text"
"""An export's copy of its Hugging Face text tower (config, weights, tokenizer files)."""
CHECKPOINT_PREFIX = "step_"
STEP_DIR = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
"""A published checkpoint directory's name; temporaries start with '.' and never match."""

EVAL_TASKS = (
    "zeroshot_classification", "zeroshot_retrieval", "geometry", "captioning", "linear_probe",
    "image_caption_selection",
)  # fmt: skip
"""eval.tasks' task names, which configs name in `eval.NAME.type` (with AUTO_TASK)."""
AUTO_TASK = "auto"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def checkpoint_step(directory: Path) -> int | None:
    """The step of a published checkpoint directory's name (None: not one)."""
    match = STEP_DIR.fullmatch(directory.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The published checkpoints in RUN/checkpoints (`root`), in step order: step_N directories
    with a meta.json, which a save writes last; hidden temporaries never count."""
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    return sorted((p for p in found if (p / META_FILE).is_file()), key=checkpoint_step)


@dataclass
class CheckpointMeta:
    """meta.json: what a resume, an evaluation and a reader of the run need besides weights.

    Readers take what is there: evaluation needs only the model name (or --model), a resume
    needs every field (vlp.runstate checks)."""

    step: int | None = None
    samples_seen: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config (vlp.config.to_dict)."""
    data: dict[str, Any] = field(default_factory=dict)
    """{"positions": per rank {worker: position}, "stream": what the batch stream depends on}."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped samples by reason, summed over every rank and worker."""
    versions: dict[str, str] = field(default_factory=dict)
    """Package versions that wrote the checkpoint."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        """Raises ValueError (json.JSONDecodeError is one) unless a JSON object whose fields,
        where present, have their types; unknown fields are ignored."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        known = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        for name, value in known.items():
            if not isinstance(value, _TYPES.get(name, dict)) or isinstance(value, bool):
                raise ValueError(f"{name} is {type(value).__name__}")
        return cls(**known)

    @classmethod
    def read(cls, directory: Path) -> CheckpointMeta:
        return cls.from_json((directory / META_FILE).read_text(encoding="utf-8"))

    @property
    def model_name(self) -> str | None:
        model = self.config.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        return name if isinstance(name, str) and name else None


_TYPES: dict[str, type | tuple[type, ...]] = {"step": (int, type(None)), "samples_seen": int}
"""CheckpointMeta's non-dict field types, checked when reading."""
