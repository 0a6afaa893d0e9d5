"""The training data pipeline: shards -> pooled shuffle -> decode -> transform -> tokenize -> batch.

Everything runs inside DataLoader workers and every random choice is seeded by position, so the
batch stream is a pure function of the config and the step. Each batch carries its worker's
position; the training loop stores the positions of the batches it consumed, and a resumed run
restarts every worker there, skipping already-seen samples before decoding them.

Shuffling is pooled: a worker reads whole shards until it holds `shuffle_buffer` samples and emits
that pool in a seeded random order. A position is (first shard of the pool, items emitted), so a
resume re-reads at most one pool.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.decode import BadSample, SampleDecoder
from vlp.data.format import NEGATIVES_FIELD, Reason
from vlp.data.shards import DataError, expand_shards, read_shard, shard_sequence


@dataclass
class Cursor:
    """One source's place in a worker's stream: the pool's first shard, items emitted from it.

    A pool's items are its shards' problems (missing or truncated tars) first, then its samples
    in shuffled order; `item` counts both, so a resume skips exactly what was already seen.
    """

    shard: int = 0
    item: int = 0


@dataclass
class Position:
    """Where a logical worker's stream stands."""

    cursors: list[Cursor]
    """One per source, in config order."""
    drawn: int = 0
    """Samples drawn across sources (the mixing stream's counter)."""
    bad: dict[str, int] = field(default_factory=dict)
    """Skipped samples by reason, cumulative for this worker."""

    @classmethod
    def start(cls, num_sources: int) -> Position:
        return cls([Cursor() for _ in range(num_sources)])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Position:
        return cls([Cursor(**c) for c in data["cursors"]], data["drawn"], dict(data["bad"]))


@dataclass
class Batch:
    images: Tensor
    """[B, 3, H, W] images as the worker transform leaves them: uint8 for vlp's training, which
    normalises them on the device (vlp/data/transforms.py)."""
    text: Tensor
    """[B, T, L] token ids of the captions (T = 1 for one caption per image)."""
    text_mask: Tensor
    """[B, T] bool: False where a sub-caption slot repeats the raw caption (empty pool), or a
    hard-negative slot is empty."""
    decoder_text: Tensor | None
    """[B, L] decoder targets when they differ from text slot 0, else None."""
    keys: list[str]
    worker: int
    """Logical worker that produced this batch."""
    position: Position
    """That worker's position after this batch."""
    num_negatives: int = 0
    """The last this many text slots are hard negatives of slot 0 (data.hard_negatives)."""

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True) for fast copies to GPU."""
        self.images = self.images.pin_memory()
        self.text = self.text.pin_memory()
        self.text_mask = self.text_mask.pin_memory()
        if self.decoder_text is not None:
            self.decoder_text = self.decoder_text.pin_memory()
        return self


@dataclass(frozen=True)
class StreamSpec:
    """What determines every worker's sample stream."""

    sources: list[list[str]]
    """Shard URLs of each source."""
    weights: list[float]
    """Each source's share of the samples drawn."""
    mode: str
    seed: int
    shuffle_buffer: int
    batch_size: int
    num_workers: int
    """Logical workers per process (at least 1, also when reading in the main process)."""
    rank: int
    world_size: int

    def slot(self, worker: int) -> int:
        return self.rank * self.num_workers + worker

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers


def pooled_items(spec: StreamSpec, source: int, worker: int, start: Cursor):
    """Yield (raw sample or shard-level Reason, cursor after it) of one source, forever."""
    slot, urls = spec.slot(worker), spec.sources[source]
    sequence = shard_sequence(
        urls, spec.mode, [spec.seed, source], slot, spec.num_slots, start.shard
    )
    skip, empty_shards = start.item, 0
    next_shard = next(sequence)
    while True:
        pool_start, pool, problems = next_shard[0], [], []
        while len(pool) < spec.shuffle_buffer:
            samples, problem = read_shard(next_shard[1])
            empty_shards = 0 if samples else empty_shards + 1
            if empty_shards > len(urls):
                raise DataError(f"no samples in any shard of {urls[0]} ... (missing or empty)")
            pool.extend(samples)
            problems += [problem] if problem else []
            next_shard = next(sequence)
        order = np.random.default_rng([spec.seed, source, slot, pool_start]).permutation(len(pool))
        items = problems + [pool[i] for i in order]
        for emitted in range(skip + 1, len(items) + 1):
            yield items[emitted - 1], Cursor(pool_start, emitted)
        skip = 0


MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A well-spread 63-bit integer from integers (splitmix64 rounds): a cheap per-sample seed."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = ((state ^ (value & MASK64)) * 0xBF58476D1CE4E5B9) & MASK64
        state = ((state ^ (state >> 31)) * 0x94D049BB133111EB) & MASK64
        state ^= state >> 29
    return state >> 1


def _choose_source(spec: StreamSpec, worker: int, drawn: int) -> int:
    """The source of draw number `drawn`: a function of the counter, so a resume repeats it."""
    if len(spec.weights) == 1:
        return 0
    point = mix(spec.seed, spec.slot(worker), drawn, 1) / 2**63 * sum(spec.weights)
    return min(bisect.bisect_right(list(accumulate(spec.weights)), point), len(spec.weights) - 1)


def worker_batches(
    spec: StreamSpec, decode: SampleDecoder, worker: int, start: Position, own_rng: bool = True
):
    """Batches of `spec.batch_size` good samples for one logical worker, forever.

    Augmentations draw from torch's global generator, reseeded per sample from the sample's
    position so they repeat after a resume. `own_rng=False` (reading in the training process)
    restores the generator around each sample, leaving the trainer's random stream untouched.
    """
    streams = [pooled_items(spec, s, worker, c) for s, c in enumerate(start.cursors)]
    cursors, drawn, bad = list(start.cursors), start.drawn, Counter(start.bad)
    items, good, seen_keys = [], 0, set()
    pools_begun = [0] * len(cursors)  # pools whose first item this worker has read, per source
    while True:
        source = _choose_source(spec, worker, drawn)
        sample, cursor = next(streams[source])
        pools_begun[source] += cursor.item == 1
        cursors[source] = cursor
        if isinstance(sample, Reason):  # a shard problem is not a draw: draw again
            bad[sample.value] += 1
            continue
        drawn += 1
        try:
            with contextlib.nullcontext() if own_rng else torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix(spec.seed, spec.slot(worker), drawn))
                texts_seed = mix(spec.seed, spec.slot(worker), drawn, 2)
                items.append((*decode(sample, texts_seed), sample["__key__"]))
            good += 1
        except BadSample as bad_sample:
            bad[bad_sample.reason.value] += 1
            seen_keys.update(k for k in sample if not k.startswith("__"))
            # a whole pool (at least one shard) read without one good sample: wrong keys, not
            # bad luck (a second pool begun means the first one ended)
            if good == 0 and max(pools_begun) >= 2:
                raise DataError(_no_usable_samples(decode, seen_keys, bad)) from None
            continue
        if len(items) == spec.batch_size:
            position = Position(list(cursors), drawn, dict(bad))
            yield _collate(items, worker, position, decode.hard_negatives)
            items = []


def _no_usable_samples(decode: SampleDecoder, keys: set[str], bad: Counter) -> str:
    seen = ", ".join(f".{k}" for k in sorted(keys))
    reasons = ", ".join(f"{r} {n}" for r, n in bad.most_common())
    if bad.most_common(1)[0][0] == Reason.MISSING_NEGATIVES.value:
        return (
            f"no usable sample in the first shards: skipped {reasons}. With "
            f"data.hard_negatives={decode.hard_negatives} every sample's .json needs a "
            f"'{NEGATIVES_FIELD}' list: write shards with negatives (vlp-shard demo, "
            "fashion-mnist) or set data.hard_negatives=0"
        )
    return (
        f"no usable sample in the first shards: members seen {seen}; skipped {reasons}. "
        f"Expected an image ({'/'.join(decode.image_keys)}) and caption "
        f"'{decode.text_key if decode.caption in ('raw', 'subcaptions') else decode.caption}': "
        "set data.image_key / data.text_key / data.caption to match the shards"
    )


def _collate(items: list[tuple], worker: int, position: Position, num_negatives: int) -> Batch:
    images, tokens, masks, decoder, keys = zip(*items, strict=True)
    return Batch(
        images=torch.stack(images),
        text=torch.stack(tokens),
        text_mask=torch.stack(masks),
        decoder_text=None if decoder[0] is None else torch.stack(decoder),
        keys=list(keys),
        worker=worker,
        position=position,
        num_negatives=num_negatives,
    )


class TrainStream(IterableDataset):
    """One process's batch stream; physical DataLoader workers play rotated logical roles.

    DataLoader returns batches round-robin from workers 0, 1, ..., so global batch i comes from
    logical worker i % W. After `consumed` batches the loader restarts at physical worker 0,
    which must therefore play logical worker consumed % W.
    """

    def __init__(
        self, spec: StreamSpec, decode: SampleDecoder, positions: dict[int, Position], consumed: int
    ):
        self.spec, self.decode = spec, decode
        self.positions, self.consumed = positions, consumed

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.consumed) % self.spec.num_workers
        start = self.positions.get(worker, Position.start(len(self.spec.sources)))
        yield from worker_batches(self.spec, self.decode, worker, start, own_rng=info is not None)


@dataclass(frozen=True)
class ShardSubset:
    """Shards a method reads instead of the configured ones (e.g. one ProtoCLIP episode's)."""

    urls: list[str]
    key: str
    """The config key that sets how many there are (named in errors)."""


def build_loader(
    data_cfg: Any,
    seed: int,
    transform,
    tokenizer,
    rank: int,
    world_size: int,
    positions: dict[int, Position],
    consumed: int,
    pin_memory: bool,
    subset: ShardSubset | None = None,
) -> DataLoader:
    """A DataLoader over the configured shards for this process (not to be accelerate-prepared:
    splitting across ranks happens here). `subset`: read these shards, epoch-wise, instead."""
    advice = "use data.mode=resampled, or reshard with a smaller --samples-per-shard"
    if subset is not None:
        patterns, sources, mode = [(subset.key, 1.0)], [subset.urls], "epoch"
        advice = f"or raise {subset.key}"
    else:
        patterns = [(s.shards, s.weight) for s in data_cfg.sources]
        patterns = patterns or [(data_cfg.train_shards, 1.0)]
        sources, mode = [expand_shards(pattern) for pattern, _ in patterns], data_cfg.mode
    num_workers = max(1, data_cfg.workers)
    for (pattern, _), urls in zip(patterns, sources, strict=True):
        if mode == "epoch" and len(urls) < world_size * num_workers:
            raise DataError(
                f"{pattern}: {len(urls)} shards for {world_size} processes x "
                f"{num_workers} workers: lower data.workers, {advice}"
            )
    spec = StreamSpec(
        sources,
        [float(weight) for _, weight in patterns],
        mode,
        seed,
        data_cfg.shuffle_buffer,
        data_cfg.batch_size,
        num_workers,
        rank,
        world_size,
    )
    return DataLoader(
        TrainStream(spec, sample_decoder(data_cfg, transform, tokenizer), positions, consumed),
        batch_size=None,
        num_workers=data_cfg.workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if data_cfg.workers else None,
    )


def sample_decoder(data_cfg: Any, transform, tokenizer) -> SampleDecoder:
    return SampleDecoder(
        transform,
        tokenizer,
        tuple(data_cfg.image_key.split(";")),
        data_cfg.text_key,
        data_cfg.caption,
        data_cfg.decoder_caption,
        data_cfg.subcaptions,
        data_cfg.hard_negatives,
    )
