"""Eval sets in clip_benchmark's local webdataset layout.

    DIR/test/0.tar ... DIR/test/{n-1}.tar, DIR/test/nshards.txt
    DIR/train/...                      (optional, classification: the linear probe's train split)
    DIR/classnames.txt, DIR/zeroshot_classification_templates.txt   (classification)
    DIR/dataset_type.txt                                             ("classification"|"retrieval")
    DIR/task.txt                       ("image_caption_selection": a retrieval-typed set whose
                                        .txt holds the true caption, then its hard negatives)

so `clip_benchmark eval --dataset wds/NAME --dataset_root DIR` and `vlp-eval` both read it
(clip_benchmark runs a selection set with `--task image_caption_selection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools import layouts
from data_tools.errors import UsageError
from data_tools.images import ImageOptions
from data_tools.sample import RawSample
from data_tools.sources import Source
from data_tools.sources.folder import find_images
from data_tools.sources.table import TableSource, read_table
from data_tools.writer import Summary, WriteOptions, write_dataset
from vlp.data import format as fmt

GENERIC_TEMPLATES = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "a photo of the {c}.",
    "an image of a {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of a {c}.",
)


def write_classification_set(
    source: Source,
    out_dir: Path,
    classnames: Sequence[str],
    templates: Sequence[str],
    image: ImageOptions,
    opts: WriteOptions,
) -> Summary:
    """Shards with `.cls` labels plus classnames and `{c}` templates."""
    bad = [t for t in templates if fmt.CLASS_PLACEHOLDER not in t]
    if bad:
        raise UsageError(f"template {bad[0]!r} has no {fmt.CLASS_PLACEHOLDER} placeholder")
    summary = write_dataset(source, out_dir / fmt.EVAL_SPLIT, layouts.CLASSIFICATION, image, opts)
    if summary.complete:
        _write_lines(out_dir / fmt.CLASSNAMES_FILE, classnames)
        _write_lines(out_dir / fmt.TEMPLATES_FILE, templates)
        _finish(out_dir, summary, "classification")
    return summary


def write_retrieval_set(
    source: Source, out_dir: Path, image: ImageOptions, opts: WriteOptions
) -> Summary:
    """Shards whose `.txt` holds one caption per line (any of them is a positive)."""
    summary = write_dataset(source, out_dir / fmt.EVAL_SPLIT, layouts.RETRIEVAL, image, opts)
    if summary.complete:
        _finish(out_dir, summary, "retrieval")
    return summary


def write_selection_set(
    source: Source, out_dir: Path, image: ImageOptions, opts: WriteOptions
) -> Summary:
    """Image-caption selection: `.txt` lines are the true caption, then its negatives."""
    summary = write_dataset(source, out_dir / fmt.EVAL_SPLIT, layouts.RETRIEVAL, image, opts)
    if summary.complete:
        _finish(out_dir, summary, "retrieval")
        _write_lines(out_dir / fmt.TASK_FILE, [fmt.SELECTION_TASK])
    return summary


def write_train_split(
    source: Source, out_dir: Path, image: ImageOptions, opts: WriteOptions
) -> Summary:
    """A classification set's train/ split (the linear probe's), in the layout of its test/."""
    split = out_dir / fmt.EVAL_TRAIN_SPLIT
    summary = write_dataset(source, split, layouts.CLASSIFICATION, image, opts)
    if summary.complete:
        _write_lines(split / fmt.NSHARDS_FILE, [str(summary.num_shards)])
    return summary


def _finish(out_dir: Path, summary: Summary, dataset_type: str) -> None:
    _write_lines(out_dir / fmt.EVAL_SPLIT / fmt.NSHARDS_FILE, [str(summary.num_shards)])
    _write_lines(out_dir / fmt.DATASET_TYPE_FILE, [dataset_type])


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(GENERIC_TEMPLATES)
    if not path.is_file():
        raise UsageError(f"{path}: no such templates file")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [t for t in templates if t]


class ClassFolderSource(Source):
    """`root/<class name>/<image>`: one class per sub-folder, classes in sorted order."""

    def __init__(self, root: Path):
        self.root = root
        self.images = find_images(root)
        self.classnames = sorted(
            {p.relative_to(root).parts[0] for p in self.images if p.parent != root}
        )
        if not self.classnames:
            raise UsageError(f"{root}: expected one sub-folder per class, found none")
        self.images = [p for p in self.images if p.parent != root]
        self.labels = [self.classnames.index(p.relative_to(root).parts[0]) for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> RawSample:
        return RawSample(image=self.images[index], label=self.labels[index])

    def locate(self, index: int) -> str:
        return str(self.images[index])

    def describe(self) -> dict[str, Any]:
        return {"type": "class-folders", "path": str(self.root.resolve())}


class LabeledTableSource(TableSource):
    """Table rows with an image path and a label column (class names, or class indices)."""

    def __init__(
        self,
        path: Path,
        image_col: str,
        label_col: str,
        root: Path | None = None,
        classnames: Sequence[str] | None = None,
    ):
        super().__init__(path, image_col, label_col, root)
        self.label_col = label_col
        labels = [_text(v) for v in self.captions]
        present = [v for v in labels if v is not None]
        if classnames is None:
            if present and all(v.isdigit() for v in present):
                raise UsageError(
                    f"{path}: column {label_col!r} holds class indices; pass --classnames FILE "
                    "(one class name per line, in index order)"
                )
            classnames = sorted(set(present))
            lookup = {name: i for i, name in enumerate(classnames)}
        else:
            # labels may be indices or names; a name wins where a name looks like an index
            lookup = {str(i): i for i in range(len(classnames))}
            lookup.update({name: i for i, name in enumerate(classnames)})
        self.classnames = list(classnames)
        self.labels = [lookup.get(v) if v is not None else None for v in labels]

    def read(self, index: int) -> RawSample:
        sample = super().read(index)
        return RawSample(image=sample.image, label=self.labels[index])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_col": self.label_col, "classnames": self.classnames}


class RetrievalTableSource(TableSource):
    """Table rows with an image path and one or more caption columns."""

    def __init__(
        self, path: Path, image_col: str, caption_cols: Sequence[str], root: Path | None = None
    ):
        super().__init__(path, image_col, caption_cols[0], root)
        self.caption_cols = list(caption_cols)
        _, values = read_table(path, self.caption_cols)
        self.caption_lists = list(zip(*(values[c] for c in self.caption_cols), strict=True))

    def read(self, index: int) -> RawSample:
        sample = super().read(index)
        captions: list[Any] = []
        for cell in self.caption_lists[index]:
            captions.extend(cell if isinstance(cell, list) else [cell])
        return RawSample(image=sample.image, caption=captions)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "caption_cols": self.caption_cols}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value).strip()
