"""Eval sets in clip_benchmark's local webdataset layout: the metadata, checked up front.

    DIR/test/nshards.txt, DIR/test/0.tar ... DIR/test/{n-1}.tar
    DIR/dataset_type.txt                          classification (default) | retrieval
    DIR/classnames.txt                            classification: one class per line, label order
    DIR/zeroshot_classification_templates.txt     classification: one template per line, with {c}
    DIR/task.txt                                  image_caption_selection: a retrieval-typed set
                                                  whose captions are the true one, then negatives

Samples are `{key}.{webp|png|jpg|jpeg}` plus `{key}.cls` (the class index as text) or `{key}.txt`
(captions, one per line; any of them is a positive); eval.samples streams them. This module
imports no torch, so a mistyped path fails at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UsageError
from vlp.data import format as fmt

KINDS = ("classification", "retrieval")
SELECTION = fmt.SELECTION_TASK
"""The kind of a retrieval-typed set that task.txt marks as an image-caption selection set."""


@dataclass(frozen=True)
class EvalSet:
    """An eval set's metadata; eval.samples.read_batches streams its samples."""

    root: Path
    kind: str
    """"classification" or "retrieval" (dataset_type.txt), or "image_caption_selection" (a
    retrieval set marked so by task.txt)."""
    shards: tuple[Path, ...]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    expected_samples: int | None = None
    """The sample count sizes.json records (vlp-shard writes one), to catch truncated shards."""

    @property
    def captioned(self) -> bool:
        """Samples carry captions (`.txt`), not class labels (`.cls`)."""
        return self.kind != "classification"

    @property
    def name(self) -> str:
        """clip_benchmark's dataset name for this set (`--dataset wds/NAME`)."""
        return f"wds/{self.root.name}"


def open_eval_set(root: Path, split: str = fmt.EVAL_SPLIT) -> EvalSet:
    """Read and check the set's metadata files; a usage error names what is missing."""
    if not root.is_dir():
        raise UsageError(f"{root}: no such dataset directory")
    shards = _shards(root / split)
    kind = _dataset_type(root)
    expected = _expected_samples(root / split, shards)
    if kind == "retrieval":
        return EvalSet(root, _selection_or(kind, root), shards, expected_samples=expected)
    classnames = _lines(root / fmt.CLASSNAMES_FILE, "one class name per line, in label order")
    templates = _lines(root / fmt.TEMPLATES_FILE, "one prompt per line, e.g. 'a photo of a {c}.'")
    for template in templates:
        if fmt.CLASS_PLACEHOLDER not in template:
            raise UsageError(
                f"{root / fmt.TEMPLATES_FILE}: template {template!r} has no "
                f"{fmt.CLASS_PLACEHOLDER} placeholder"
            )
    return EvalSet(root, kind, shards, tuple(classnames), tuple(templates), expected)


def _shards(split_dir: Path) -> tuple[Path, ...]:
    nshards_file = split_dir / fmt.NSHARDS_FILE
    if not nshards_file.is_file():
        raise UsageError(
            f"{nshards_file}: missing; not an eval set in clip_benchmark's layout "
            "(make one with `vlp-shard eval-set`)"
        )
    text = nshards_file.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise UsageError(f"{nshards_file}: expected the number of shards, found {text!r}")
    if int(text) == 0:
        raise UsageError(f"{split_dir}: empty split (nshards.txt says 0 shards)")
    shards = tuple(split_dir / fmt.EVAL_SHARD_NAME.format(index=i) for i in range(int(text)))
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: missing ({len(missing)} of {len(shards)} shards absent)")
    return shards


def _expected_samples(split_dir: Path, shards: tuple[Path, ...]) -> int | None:
    path = split_dir / fmt.SIZES_FILE
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    counts = [sizes.get(shard.name) for shard in shards] if isinstance(sizes, dict) else [None]
    return sum(counts) if all(isinstance(c, int) for c in counts) else None


def _dataset_type(root: Path) -> str:
    path = root / fmt.DATASET_TYPE_FILE
    # clip_benchmark treats a set without dataset_type.txt as classification
    kind = path.read_text(encoding="utf-8").strip().lower() if path.is_file() else "classification"
    if kind not in KINDS:
        raise UsageError(f"{path}: dataset type {kind!r} is not supported; expected {KINDS}")
    return kind


def _selection_or(kind: str, root: Path) -> str:
    """SELECTION where task.txt names it, else `kind`."""
    path = root / fmt.TASK_FILE
    if not path.is_file():
        return kind
    task = path.read_text(encoding="utf-8").strip()
    if task != SELECTION:
        raise UsageError(f"{path}: task {task!r} is not supported; expected {SELECTION}")
    return SELECTION


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UsageError(f"{path}: missing; a classification set needs it ({what})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{path}: empty; expected {what}")
    return lines
