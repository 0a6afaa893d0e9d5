"""Write a source into webdataset shards: atomically, resumably, in parallel, across nodes.

Shard `i` always holds items `[i * samples_per_shard, (i + 1) * samples_per_shard)` minus the
bad ones, so any process on any node can build it alone and get the same bytes. A shard is
written under a hidden temporary name, flushed to the disk and renamed when complete; its
`_stats.json` is written after the rename and marks it done. `sizes.json` and the final manifest
are written by whichever node sees every shard done. One process per node writes an output
directory at a time (a lock per --node-rank, vlp/runlock.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import socket
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vlp
from data_tools.errors import UsageError
from data_tools.images import ImageOptions
from data_tools.layouts import Layout
from data_tools.progress import Progress
from data_tools.sample import BadSample
from data_tools.sources import Source
from vlp import runlock
from vlp.data import format as fmt

TAR_MTIME = 0.0
"""Fixed member timestamps make reruns byte-identical."""
MAX_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class WriteOptions:
    """How work is split; none of these change the bytes written."""

    samples_per_shard: int = 1000
    workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    overwrite: bool = False


@dataclass
class Summary:
    """What one invocation did, plus the dataset totals when every shard is done."""

    out_dir: Path
    num_shards: int
    written_shards: int = 0
    skipped_shards: int = 0
    samples: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    complete: bool = False
    total_samples: int | None = None
    total_errors: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs to build one shard; inherited by forked workers."""

    source: Source
    out_dir: Path
    layout: Layout
    image: ImageOptions
    samples_per_shard: int
    key_width: int
    fingerprint_id: str
    """Hash of the settings that determine the bytes; a shard's stats must carry it to count."""

    def items(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, len(self.source)))


_job: _Job | None = None
_counter: Any = None


def write_dataset(
    source: Source,
    out_dir: Path,
    layout: Layout,
    image: ImageOptions,
    opts: WriteOptions,
) -> Summary:
    """Write every shard assigned to this node that is not already complete."""
    if len(source) == 0:
        raise UsageError("the source has no items: nothing to shard")
    lock = runlock.acquire(
        out_dir, "vlp-shard", f"vlp-shard-node-{opts.node_rank}",
        "wait for it to finish or stop it (other --node-rank processes may share the output)",
    )  # fmt: skip
    try:
        return _write_locked(source, out_dir, layout, image, opts)
    finally:
        lock.release()


def _write_locked(source, out_dir, layout, image, opts: WriteOptions) -> Summary:
    fingerprint = _fingerprint(source, layout, image, opts)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    key_width = max(9, len(str(len(source))))
    job = _Job(source, out_dir, layout, image, opts.samples_per_shard, key_width, digest)
    num_shards = -(-len(source) // opts.samples_per_shard)
    _check_previous_run(out_dir, fingerprint, opts.overwrite)
    mine = [i for i in range(num_shards) if i % opts.num_nodes == opts.node_rank]
    _remove_leftovers(job, mine, num_shards, opts.overwrite)
    todo = [i for i in mine if opts.overwrite or not _is_complete(job, i)]
    _write_json(out_dir / fmt.MANIFEST_FILE, {**fingerprint, "status": "running"})

    summary = Summary(out_dir, num_shards, skipped_shards=len(mine) - len(todo))
    progress = Progress(sum(len(job.items(i)) for i in todo), f"shards -> {out_dir}")
    try:
        for stats in _run(job, todo, opts.workers, progress):
            summary.written_shards += 1
            summary.samples += stats["count"]
            summary.errors.update(stats["errors"])
    finally:
        progress.close()
    summary.seconds = progress.seconds
    _finish(job, num_shards, fingerprint, summary)
    return summary


def _run(job: _Job, shards: list[int], workers: int, progress: Progress):
    """Yield each shard's stats as it completes (inline for 1 worker, else a fork pool)."""
    global _job, _counter
    _job = job
    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            yield _write_shard(shard, progress.advance)
        return
    ctx = mp.get_context("fork")  # workers inherit the source instead of unpickling it
    _counter = ctx.Value("q", 0)
    with ctx.Pool(min(workers, len(shards))) as pool:
        pending = pool.imap_unordered(_write_shard_in_worker, shards)
        done = 0
        while done < len(shards):
            try:
                stats = pending.next(timeout=0.5)
            except mp.TimeoutError:
                progress.update_to(_counter.value)
                continue
            done += 1
            progress.update_to(_counter.value)
            yield stats


def _write_shard_in_worker(shard: int) -> dict[str, Any]:
    def advance(n: int = 1) -> None:
        with _counter.get_lock():
            _counter.value += n

    return _write_shard(shard, advance)


def _write_shard(shard: int, advance) -> dict[str, Any]:
    job = _job
    assert job is not None
    name = job.layout.shard_name.format(index=shard)
    final = job.out_dir / name
    temporary = job.out_dir / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
    start = time.monotonic()
    count, errors, examples = 0, Counter(), {}
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in job.items(shard):
            try:
                sample = job.source.read(index)
                _add_sample(tar, job.layout.build(f"{index:0{job.key_width}d}", sample, job.image))
                count += 1
            except BadSample as bad:
                errors[bad.reason.value] += 1
                found = examples.setdefault(bad.reason.value, [])
                if len(found) < MAX_EXAMPLES_PER_REASON:
                    found.append(f"{job.source.locate(index)}: {bad.detail}")
            advance(1)
    _fsync(temporary)  # the rename must never publish a shard whose bytes are not on disk
    os.replace(temporary, final)
    stats = {
        "shard": name,
        "count": count,
        "errors": dict(sorted(errors.items())),
        "examples": examples,
        "first_item": job.items(shard).start,
        "num_items": len(job.items(shard)),
        "bytes": final.stat().st_size,
        "seconds": round(time.monotonic() - start, 3),
        "fingerprint": job.fingerprint_id,
    }
    _write_json(job.out_dir / fmt.stats_name(name), stats)
    return stats


def _add_sample(tar: tarfile.TarFile, members: dict[str, Any]) -> None:
    """Write `{key}.{ext}` members in sorted order, as webdataset's TarWriter does.

    Plain tarfile rather than webdataset's writer: importing webdataset imports torch, which
    would add seconds to every vlp-shard command for no benefit.
    """
    key = members["__key__"]
    for extension in sorted(k for k in members if k != "__key__"):
        data = members[extension]
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        tar.addfile(info, io.BytesIO(data))


def _completed_stats(job: _Job, shard: int) -> dict[str, Any] | None:
    """The shard's stats if it is complete and was written with the current settings.

    Stats left by a run with other settings (an interrupted --overwrite, say) do not count.
    """
    name = job.layout.shard_name.format(index=shard)
    stats_path = job.out_dir / fmt.stats_name(name)
    if not (job.out_dir / name).exists() or not stats_path.exists():
        return None
    stats = json.loads(stats_path.read_text())
    return stats if stats.get("fingerprint") == job.fingerprint_id else None


def _is_complete(job: _Job, shard: int) -> bool:
    return _completed_stats(job, shard) is not None


def _remove_leftovers(job: _Job, mine: list[int], num_shards: int, overwrite: bool) -> None:
    """Delete dead temporaries of this host; with --overwrite also shards past the new end.

    Temporaries are named `.NAME.tmp-HOST-PID`: another live process (a concurrent run, or
    another node on a shared filesystem) may still be writing any other one.
    """
    names = {job.layout.shard_name.format(index=i) for i in mine}
    host = socket.gethostname()
    for path in job.out_dir.glob(".*.tar.tmp-*"):
        name, _, owner = path.name[1:].partition(".tmp-")
        owner_host, _, pid = owner.rpartition("-")
        if name in names and owner_host == host and pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
    if overwrite:
        index = num_shards
        while (job.out_dir / job.layout.shard_name.format(index=index)).exists():
            name = job.layout.shard_name.format(index=index)
            (job.out_dir / name).unlink(missing_ok=True)
            (job.out_dir / fmt.stats_name(name)).unlink(missing_ok=True)
            index += 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fingerprint(source: Source, layout: Layout, image: ImageOptions, opts: WriteOptions):
    """Everything that determines the shards' bytes."""
    return {
        "vlp_version": vlp.__version__,
        "layout": layout.name,
        "source": source.describe(),
        "num_items": len(source),
        "samples_per_shard": opts.samples_per_shard,
        "image": asdict(image),
    }


def _check_previous_run(out_dir: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    path = out_dir / fmt.MANIFEST_FILE
    if overwrite or not path.exists():
        return
    previous = json.loads(path.read_text())
    changed = [k for k in fingerprint if previous.get(k) != fingerprint[k]]
    if changed:
        raise UsageError(
            f"{out_dir} holds shards written with different {', '.join(changed)} "
            f"(see {path}); pass --overwrite to rebuild, or choose another output directory"
        )


def _finish(job: _Job, num_shards: int, fingerprint: dict[str, Any], summary: Summary) -> None:
    """Write sizes.json and the final manifest if every shard (from any node) is done."""
    all_stats = []
    for shard in range(num_shards):
        stats = _completed_stats(job, shard)
        if stats is None:
            return
        all_stats.append(stats)
    sizes = {stats["shard"]: stats["count"] for stats in all_stats}
    _write_json(job.out_dir / fmt.SIZES_FILE, sizes)
    for stats in all_stats:
        summary.total_errors.update(stats["errors"])
    summary.total_samples = sum(sizes.values())
    summary.complete = True
    totals = {
        "samples": summary.total_samples,
        "shards": num_shards,
        "errors": dict(sorted(summary.total_errors.items())),
        "bytes": sum(stats["bytes"] for stats in all_stats),
    }
    _write_json(job.out_dir / fmt.MANIFEST_FILE, {**fingerprint, "status": "complete", **totals})


def _write_json(path: Path, data: Any) -> None:
    """Atomic: readers see the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _fsync(temporary)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
