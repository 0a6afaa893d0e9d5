"""`vlp-shard verify`: decode every sample of a shard set and count problems by reason.

It reads shards through the same indexing and validation code the sharder uses, so both
report the same counts for the same input.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby

from data_tools.images import DEFAULT_MAX_PIXELS, load_pixels, open_image
from data_tools.progress import Progress
from data_tools.sample import BadSample, Reason, clean_caption
from data_tools.sources.reshard import ReshardSource
from vlp.data import format as fmt

MAX_EXAMPLES = 10


@dataclass
class Report:
    samples: int = 0
    good: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    sizes_mismatches: list[str] = field(default_factory=list)
    """Shards whose sizes.json entry disagrees with the good samples found."""

    @property
    def ok(self) -> bool:
        return not self.errors and not self.sizes_mismatches


_source: ReshardSource | None = None  # set before forking workers; they inherit it


def check_sample(source: ReshardSource, index: int, max_pixels: int) -> None:
    """Raise BadSample if item `index` would not train or evaluate."""
    sample = source.read(index)
    if sample.label is None:
        clean_caption(sample.caption)
    if sample.image is None:
        raise BadSample(Reason.MISSING_IMAGE, "no image member")
    load_pixels(open_image(sample.image, max_pixels), None)


def _check_range(job: tuple[int, int, int, int]) -> tuple[int, Counter, list[str], int]:
    shard, start, stop, max_pixels = job
    assert _source is not None
    good, errors, examples = 0, Counter(), []
    for index in range(start, stop):
        try:
            check_sample(_source, index, max_pixels)
            good += 1
        except BadSample as bad:
            errors[bad.reason.value] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{_source.locate(index)}: {bad.detail}")
    return shard, errors, examples, good


def verify(pattern: str, workers: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> Report:
    """Check every sample of the shards matching `pattern` (brace syntax allowed)."""
    global _source
    _source = source = ReshardSource(pattern)
    report = Report(samples=len(source))
    duplicates = source.duplicate_keys
    if duplicates:
        report.errors[Reason.DUPLICATE_KEY.value] = duplicates
    jobs, start = [], 0
    for shard, group in groupby(source.items, key=lambda item: item.shard):
        stop = start + len(list(group))
        jobs.append((shard, start, stop, max_pixels))
        start = stop
    counts = {}
    progress = Progress(len(source), f"verify {pattern}")
    with mp.get_context("fork").Pool(workers) if workers > 1 else _Inline() as pool:
        for (shard, errors, examples, good), job in zip(
            pool.imap(_check_range, jobs), jobs, strict=True
        ):
            report.good += good
            report.errors.update(errors)
            report.examples.extend(examples[: MAX_EXAMPLES - len(report.examples)])
            counts[source.paths[shard]] = good
            progress.advance(job[2] - job[1])
    progress.close()
    report.sizes_mismatches = _compare_sizes(counts)
    return report


def _compare_sizes(counts: dict) -> list[str]:
    mismatches = []
    for path, count in counts.items():
        sizes_file = path.parent / fmt.SIZES_FILE
        if not sizes_file.is_file():
            continue
        expected = json.loads(sizes_file.read_text()).get(path.name)
        if expected is not None and expected != count:
            mismatches.append(f"{path}: sizes.json says {expected} samples, found {count} good")
    return mismatches


class _Inline:
    """The Pool interface, run in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs):
        return map(fn, jobs)
