"""The on-disk contract between the sharder, the training pipeline and other tools.

Training shards follow img2dataset's layout so open_clip can read them: each sample is
`{key}.{jpg|png|webp}` + `{key}.txt` (the caption) + `{key}.json` (metadata, optional long
captions). Eval sets follow clip_benchmark's local webdataset layout exactly.
"""

from enum import Enum

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions, in the order a reader should prefer them."""

CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
NEGATIVES_FIELD = "negatives"
"""Sidecar field: a list of hard-negative captions of the `.txt` caption (data.hard_negatives);
`negative_kinds` beside it names each one's kind (e.g. swap_colour)."""
NEGATIVE_KINDS_FIELD = "negative_kinds"
LABEL_EXTENSION = "cls"
"""clip_benchmark's classification label member: the class index as decimal text."""

TRAIN_DIR = "train"
TRAIN_SHARD_NAME = "{index:05d}.tar"
SIZES_FILE = "sizes.json"
"""open_clip's format: {"00000.tar": number_of_samples, ...} beside the shards."""
STATS_SUFFIX = "_stats.json"
"""Per-shard statistics, `00000_stats.json` beside `00000.tar`."""
MANIFEST_FILE = "manifest.json"

EVAL_SPLIT = "test"
EVAL_TRAIN_SPLIT = "train"
"""A classification set's training split (for the linear probe), beside test/ in its layout."""
EVAL_SHARD_NAME = "{index}.tar"
"""clip_benchmark expects unpadded shard names `0.tar ... {n-1}.tar` and `nshards.txt`."""
NSHARDS_FILE = "nshards.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
TASK_FILE = "task.txt"
"""vlp's note of the task a set is for where dataset_type.txt cannot say it: SELECTION_TASK for
a retrieval-typed set whose `.txt` lists the true caption first, then its hard negatives
(clip_benchmark reads such a set with `--task image_caption_selection`)."""
SELECTION_TASK = "image_caption_selection"
BINDING_DIR = "binding"
"""`vlp-shard demo OUT` (and `fashion-mnist --mosaic`) write selection sets in
OUT/eval/binding/<kind>/."""
CLASS_PLACEHOLDER = "{c}"


def stats_name(shard_name: str) -> str:
    """`00000.tar` -> `00000_stats.json`."""
    return shard_name.removesuffix(".tar") + STATS_SUFFIX


class Reason(str, Enum):
    """Why a sample was skipped; the sharder, `verify` and the training pipeline share these."""

    MISSING_FILE = "missing_file"
    EMPTY_IMAGE = "empty_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    TRUNCATED_IMAGE = "truncated_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    MISSING_IMAGE = "missing_image"
    MISSING_CAPTION = "missing_caption"
    EMPTY_CAPTION = "empty_caption"
    NON_UTF8_CAPTION = "non_utf8_caption"
    MISSING_NEGATIVES = "missing_negatives"
    """Training with data.hard_negatives, and the `.json` sidecar has no `negatives` list."""
    BAD_LABEL = "bad_label"
    MALFORMED_ROW = "malformed_row"
    TRUNCATED_TAR = "truncated_tar"
    DUPLICATE_KEY = "duplicate_key"
