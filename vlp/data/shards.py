"""Shard lists and raw (undecoded) samples read from tar shards with webdataset.

Each logical data worker walks its own infinite sequence of shards:
- epoch mode: epoch e visits a seeded permutation of all shards, split into `num_slots` slices
  (slot = rank * workers + worker); workers move to the next epoch independently;
- resampled mode: shards drawn with replacement from a seeded stream.
The n-th shard of a slot's sequence depends only on (urls, mode, seed, slot, num_slots, n), which
is what lets a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from braceexpand import braceexpand

from vlp.data.format import Reason

END_OF_ARCHIVE = 1024
"""A complete tar ends with two 512-byte zero blocks after its last member."""


class TarSample(NamedTuple):
    key: str
    members: dict[str, tuple[int, int]]
    """extension -> (data offset, size) in the tar file."""


class TarIndex(NamedTuple):
    samples: list[TarSample]
    problem: Reason | None
    detail: str


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


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def index_tar(path: Path) -> TarIndex:
    """A local tar's samples by byte offset (headers only), grouped by key as webdataset does.

    A tar cut short anywhere (inside a member, at a member boundary, or just before its
    end-of-archive marker) is reported as TRUNCATED_TAR, and the sample at the cut, which may be
    missing members, is dropped. The trainer, `vlp-shard reshard` and `verify` all read tars
    through this function, so they count the same problems.
    """
    if not path.is_file():
        return TarIndex([], Reason.MISSING_FILE, f"{path}: no such shard")
    samples: list[TarSample] = []
    size, end, truncated = path.stat().st_size, 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                end = member.offset_data + member.size
                if end > size:
                    truncated = f"{path}: member {member.name} is cut short"
                    break
                key, extension = split_name(member.name)
                if not samples or samples[-1].key != key:
                    samples.append(TarSample(key, {}))
                samples[-1].members[extension] = (member.offset_data, member.size)
    except (tarfile.ReadError, EOFError) as err:
        truncated = f"{path}: {err}"
    block = tarfile.BLOCKSIZE
    if truncated is None and size - (-(-end // block) * block) < END_OF_ARCHIVE:
        truncated = f"{path}: ends without the end-of-archive marker"
    if truncated is not None:
        return TarIndex(samples[:-1], Reason.TRUNCATED_TAR, truncated)
    return TarIndex(samples, None, "")


def read_shard(url: str) -> tuple[list[dict[str, Any]], Reason | None]:
    """All samples of one shard as {"__key__", ext: bytes}, and a reason if it ended badly."""
    if "://" in url and not url.startswith("file://") or url.startswith("pipe:"):
        return _read_remote(url)
    path = Path(url.removeprefix("file://"))
    index = index_tar(path)
    if not index.samples:
        return [], index.problem
    data = memoryview(path.read_bytes())
    samples = [
        {"__key__": key, **{ext: bytes(data[o : o + n]) for ext, (o, n) in members.items()}}
        for key, members in index.samples
    ]
    return samples, index.problem


def _read_remote(url: str) -> tuple[list[dict[str, Any]], Reason | None]:
    """Stream a shard from a URL or pipe with webdataset (no seeking, so no end-marker check)."""
    from webdataset import tariterators  # imports torch: only where shards are remote

    samples: list[dict[str, Any]] = []
    problem: list[Reason] = []

    def note(error: Exception) -> bool:
        # webdataset calls this for I/O errors (missing or truncated tar) and moves on
        missing = isinstance(error, FileNotFoundError)
        problem.append(Reason.MISSING_FILE if missing else Reason.TRUNCATED_TAR)
        return True

    streams = tariterators.url_opener([{"url": url}], handler=note)
    files = tariterators.tar_file_expander(streams, handler=note)
    for sample in tariterators.group_by_keys(files, handler=note):
        samples.append(
            {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        )
    if problem and problem[0] is Reason.TRUNCATED_TAR:
        samples = samples[:-1]  # the sample at the cut may lack members, as for local tars
    return samples, (problem[0] if problem else None)
