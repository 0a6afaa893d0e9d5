"""Shard lists and raw (undecoded) samples read from tar shards with webdataset.

Each logical data worker walks its own infinite sequence of shards:
- epoch mode: epoch e visits a seeded permutation of all shards, split into `num_slots` slices
  (slot = rank * workers + worker); workers move to the next epoch independently;
- resampled mode: shards drawn with replacement from a seeded stream.
The n-th shard of a slot's sequence depends only on (urls, mode, seed, slot, num_slots, n), which
is what lets a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from braceexpand import braceexpand
from webdataset import tariterators

from vlp.data.format import Reason


class DataError(ValueError):
    """The data cannot train at all (no shards, wrong keys): one line for the user, exit 2."""


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns; '::' joins several patterns, as in webdataset and open_clip."""
    urls = [url for part in pattern.split("::") for url in braceexpand(part.strip()) if url]
    if not urls:
        raise DataError(f"data.train_shards: {pattern!r} names no shards")
    return urls


def shard_sequence(
    urls: list[str], mode: str, seed: list[int], slot: int, num_slots: int, start: int = 0
) -> Iterator[tuple[int, str]]:
    """Yield (n, url) for n = start, start+1, ... of this slot's infinite shard sequence."""
    if mode == "resampled":
        for n in range(start, 2**62):  # one generator per draw: skipping ahead is O(1)
            yield n, urls[int(np.random.default_rng([*seed, slot, n]).integers(len(urls)))]
    n = 0
    for epoch in range(2**62):
        order = np.random.default_rng([*seed, epoch]).permutation(len(urls))
        mine = order[slot::num_slots]
        if n + len(mine) <= start:
            n += len(mine)
            continue
        for index in mine:
            if n >= start:
                yield n, urls[int(index)]
            n += 1


def read_shard(url: str) -> tuple[list[dict[str, Any]], Reason | None]:
    """All samples of one shard as {"__key__", ext: bytes}, and a reason if it ended badly."""
    samples: list[dict[str, Any]] = []
    problem: list[Reason] = []

    def note(error: Exception) -> bool:
        # webdataset calls this for I/O errors (missing or truncated tar) and moves on
        problem.append(
            Reason.MISSING_FILE if isinstance(error, FileNotFoundError) else Reason.TRUNCATED_TAR
        )
        return True

    streams = tariterators.url_opener([{"url": url}], handler=note)
    files = tariterators.tar_file_expander(streams, handler=note)
    for sample in tariterators.group_by_keys(files, handler=note):
        samples.append(
            {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        )
    if problem and problem[0] is Reason.TRUNCATED_TAR:
        samples = samples[:-1]  # the sample at the cut may lack members (vlp-shard does the same)
    return samples, (problem[0] if problem else None)
