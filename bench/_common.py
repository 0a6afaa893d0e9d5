"""Helpers shared by the benchmarks: peer environments, timed runs, inputs and result files.

Benchmarks run vlp and a peer tool as separate commands, alternating, on a noisy machine
(see /work/shared/design/BENCHMARKS.md), so everything here measures whole subprocesses.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp import provenance

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PEERS = BENCH / ".peers"
WORK = BENCH / ".work"
RESULTS = BENCH / "results"
PSS_SAMPLE_SECONDS = 0.2


class PeerError(RuntimeError):
    """A peer tool could not be installed or run; the message is one line for the user."""


# --- peer environments -------------------------------------------------------------------


def ensure_venv(name: str, requirements: Sequence[str], probe: str, env: dict[str, str]) -> Path:
    """Python of `bench/.peers/NAME`, created with `requirements` unless `probe` already runs.

    Peers get their own environment because their pins (numpy, webdataset, opencv) must not
    change what vlp's own environment resolves to.
    """
    venv = PEERS / name
    python = venv / "bin" / "python"
    if python.exists() and _runs(python, probe, env):
        return python
    print(f"installing {' '.join(requirements)} into {venv.relative_to(REPO)} ...", flush=True)
    _check_call([sys.executable, "-m", "venv", "--clear", str(venv)], f"create {venv}")
    _check_call([str(python), "-m", "pip", "install", "-q", *requirements], "pip install")
    if not _runs(python, probe, env):
        raise PeerError(f"{name} was installed into {venv} but `{probe}` still fails there")
    return python


def _runs(python: Path, code: str, env: dict[str, str]) -> bool:
    result = subprocess.run(
        [str(python), "-c", code], env=env, capture_output=True, timeout=300, check=False
    )
    return result.returncode == 0


def _check_call(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise PeerError(f"{what} failed (exit {result.returncode}): {lines[-1]}")


def dist_version(python: Path | str, dist: str) -> str:
    """Installed version of distribution `dist` in the environment of `python`."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "not installed"


# --- timed runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    seconds: float
    cpu_seconds: float
    """User + system time of the command and every descendant it waited for."""
    others_cpu_share: float
    """Share of the machine's CPU capacity used by processes outside this benchmark during the
    run: on a shared machine this says how far a wall time (and a scaling figure) was squeezed."""
    peak_pss_mb: float
    """Peak of the summed proportional set size of the command's whole process tree (sampled
    every PSS_SAMPLE_SECONDS): PSS, not RSS, so pages shared by forked workers count once."""


def run_timed(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> RunResult:
    """Wall time of one complete command, its output kept in `log`; raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        busy_before, (own_before, children_before) = _machine_busy_seconds(), _cpu_seconds()
        start = time.perf_counter()
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, stdin=subprocess.DEVNULL
        )
        # sampling runs in a thread so that the wall time is not rounded up to a sample period
        sampler = _PssSampler(process.pid)
        sampler.start()
        returncode = process.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
        busy = _machine_busy_seconds() - busy_before
        own_after, children_after = _cpu_seconds()
    if returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{cmd[0]} exited {returncode}; log {log}:\n" + "\n".join(tail))
    cpu = children_after - children_before
    others = busy - cpu - (own_after - own_before)
    share = max(0.0, others) / (seconds * (os.cpu_count() or 1))
    return RunResult(seconds, cpu, share, sampler.peak_kb / 1024)


def _cpu_seconds() -> tuple[float, float]:
    """User + system seconds of this process (all threads) and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot, summed over cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _PssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _tree(self.pid)))
            self._done.wait(PSS_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:  # the task ended between listing and reading
                continue
    return found


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


# --- inputs ------------------------------------------------------------------------------

ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)


def photo_like_jpegs(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` deterministic JPEGs (quality 90) that decode and compress like photos.

    Image `i` depends only on (seed, i), so a larger set extends a smaller one and only the
    missing files are generated.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:06d}.jpg" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if missing:
        print(f"generating {len(missing)} images in {directory} ...", flush=True)
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            jobs = [(paths[i], seed, i) for i in missing]
            list(pool.map(_write_photo_like, *zip(*jobs, strict=True), chunksize=16))
    return paths


def _write_photo_like(path: Path, seed: int, index: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    long_side = int(rng.integers(480, 1025))
    short_side = max(400, round(long_side / ASPECTS[rng.integers(len(ASPECTS))]))
    width, height = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    # smooth colour fields at two scales, plus sensor-like noise: compresses like a photo,
    # unlike pure noise (far too big) or flat colour (far too small)
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 150.0), (40, 50.0), (200, 25.0)):
        grid = rng.random((max(2, round(cells * height / width)), cells, 3), np.float32)
        small = Image.fromarray((grid * 255).astype(np.uint8))
        smooth = small.resize((width, height), Image.Resampling.BICUBIC)
        image += (np.asarray(smooth, np.float32) / 255 - 0.5) * amplitude
    image += 128 + rng.normal(0, 5, image.shape).astype(np.float32)
    pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    # rename into place so an interrupted run never leaves a truncated image behind
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        pixels.save(handle, "JPEG", quality=90)
    os.replace(handle.name, path)


# --- results -----------------------------------------------------------------------------


machine_info = provenance.machine_info


def git_state() -> dict[str, Any]:
    """HEAD of this checkout and whether tracked files differ from it."""
    return provenance.git_state(REPO)


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
