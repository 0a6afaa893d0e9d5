"""Existing webdataset shards (e.g. img2dataset output), re-encoded and resized.

The input tars are indexed once (headers only) so each output shard can read its samples by
byte offset. A truncated or missing input tar becomes one counted bad item at its place in the
order, so the loss is visible in stats instead of silent.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from braceexpand import braceexpand

from data_tools.errors import UsageError
from data_tools.sample import BadSample, RawSample, Reason
from data_tools.sources import Source
from vlp.data import format as fmt
from vlp.data.shards import index_tar


class _Item(NamedTuple):
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)
    problem: BadSample | None = None


def index_items(path: Path, shard: int) -> list[_Item]:
    """The shard's samples, then one bad item if the tar is missing or truncated."""
    index = index_tar(path)
    items = [_Item(shard, key, members) for key, members in index.samples]
    if index.problem is not None:
        items.append(_Item(shard, "", {}, BadSample(index.problem, index.detail)))
    return items


class ReshardSource(Source):
    """One item per input sample; keeps the input `.json` and records the input key."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        # '::' joins several patterns, as in webdataset and open_clip
        urls = [url for part in pattern.split("::") for url in braceexpand(part)]
        remote = [u for u in urls if "://" in u and not u.startswith("file://")]
        if remote:
            raise UsageError(f"{remote[0]}: reshard reads local shards; download them first")
        self.paths = [Path(u.removeprefix("file://")) for u in urls]
        if not any(p.is_file() for p in self.paths):
            raise UsageError(f"{pattern}: no such shard files")
        self.items = [item for i, p in enumerate(self.paths) for item in index_items(p, i)]
        self._open: tuple[int, int, Any] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> RawSample:
        item = self.items[index]
        if item.problem is not None:
            raise item.problem
        image_ext = next((e for e in fmt.IMAGE_EXTENSIONS if e in item.members), None)
        meta: dict[str, Any] = {}
        if fmt.METADATA_EXTENSION in item.members:
            try:
                meta = json.loads(self._member(item, fmt.METADATA_EXTENSION))
            except ValueError as err:
                raise BadSample(Reason.MALFORMED_ROW, f"bad .json: {err}") from None
            if not isinstance(meta, dict):
                raise BadSample(Reason.MALFORMED_ROW, ".json is not an object")
        meta["source_key"] = item.key
        caption = None
        if fmt.CAPTION_EXTENSION in item.members:
            caption = self._member(item, fmt.CAPTION_EXTENSION)
        image = self._member(item, image_ext) if image_ext else None
        return RawSample(image=image, caption=caption, label=self._label(item), meta=meta)

    def _label(self, item: _Item) -> int | None:
        """clip_benchmark's `.cls` member, when present (eval sets)."""
        if fmt.LABEL_EXTENSION not in item.members:
            return None
        text = self._member(item, fmt.LABEL_EXTENSION).strip()
        if not text.isdigit():
            raise BadSample(Reason.BAD_LABEL, f".cls holds {text[:20]!r}, not a class index")
        return int(text)

    def _member(self, item: _Item, extension: str) -> bytes:
        offset, size = item.members[extension]
        handle = self._handle(item.shard)
        handle.seek(offset)
        return handle.read(size)

    def _handle(self, shard: int):
        # items are read in order, so one open input per process suffices; the pid check keeps
        # forked workers from sharing (and moving) the parent's file offset
        if self._open is None or self._open[:2] != (os.getpid(), shard):
            if self._open is not None and self._open[0] == os.getpid():
                self._open[2].close()
            self._open = (os.getpid(), shard, self.paths[shard].open("rb"))
        return self._open[2]

    def locate(self, index: int) -> str:
        item = self.items[index]
        return f"{self.paths[item.shard]}:{item.key}" if item.key else str(self.paths[item.shard])

    @cached_property
    def duplicate_keys(self) -> int:
        """Readable input samples whose key an earlier one already has (webdataset would group
        such samples by key within a shard; across shards both are samples of their own)."""
        keys = Counter(item.key for item in self.items if item.problem is None)
        return sum(n - 1 for n in keys.values() if n > 1)

    def describe(self) -> dict[str, Any]:
        # the duplicate count goes into the manifest: the output's keys are new and unique
        return {
            "type": "reshard",
            "pattern": self.pattern,
            "num_shards": len(self.paths),
            "duplicate_keys": self.duplicate_keys,
        }
