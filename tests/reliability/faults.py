"""Fault injection shared by tests/reliability (small) and bench/reliability.py (full run).

Each helper builds its own inputs, injects one kind of fault at a known place, and returns what
a correct toolkit must report, so a test and the benchmark assert the same thing at two sizes.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import NO_DEMO_EVAL
from vlp import checkpoint

REPO = Path(__file__).resolve().parents[2]
PAYLOAD_MARKER = "payload_ran"


# --- training runs ---------------------------------------------------------------------------


def demo_shards(out: Path, num_samples: int = 240, per_shard: int = 30) -> str:
    """Generated demo shards (32 px); returns the brace pattern of the training shards."""
    subprocess.run(
        [sys.executable, "-m", "data_tools", "demo", str(out), "--num-samples", str(num_samples),
         "--samples-per-shard", str(per_shard), "--image-size", "32", "--eval-samples", "8"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    last = -(-num_samples // per_shard) - 1
    return str(out / "train" / f"{{00000..{last:05d}}}.tar")


def train_command(shards: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """A deterministic tiny-CLIP run that checkpoints every step (keep 2: deletions too)."""
    return [
        sys.executable, "vlp/train.py", "--config", "configs/coca_demo.yaml",
        f"data.train_shards={shards}", f"run.output_dir={run_dir}", "model.name=vlp-tiny-clip",
        "objectives.caption.weight=0", "data.batch_size=8", "data.workers=2",
        "data.shuffle_buffer=60", f"train.steps={steps}", "train.warmup_steps=2",
        "train.deterministic=true", "train.log_every_steps=2", "checkpoint.every_steps=1",
        "checkpoint.keep=2", "resume=latest", "run.trackers=[]", *NO_DEMO_EVAL, *extra,
    ]  # fmt: skip


def final_weights(run_dir: Path, steps: int) -> dict:
    return load_file(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(steps)
                     / checkpoint.EXPORT_FILE)  # fmt: skip


def seconds_per_step(run_dir: Path) -> float:
    """From a finished run's metrics.jsonl timestamps (checkpoint saves included)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss/total" in r]
    first, last = records[0], records[-1]
    return (last["time"] - first["time"]) / max(1, last["step"] - first["step"])


def checkpoint_problems(path: Path) -> list[str]:
    """Why `path` is not a complete, loadable checkpoint (empty list: it is one)."""
    import torch

    try:
        meta = json.loads((path / checkpoint.META_FILE).read_text())
        if checkpoint.checkpoint_name(meta["step"]) != path.name:
            return [f"{path}: meta.json says step {meta['step']}"]
        load_file(path / checkpoint.EXPORT_FILE)
        load_file(path / checkpoint.STATE_DIR / "model.safetensors")
        for name in ("optimizer.bin", "random_states_0.pkl"):
            # accelerate's own RNG-state types: trusted here, these are our files
            torch.load(path / checkpoint.STATE_DIR / name, weights_only=False)
    except Exception as err:  # any failure to read is a corrupt checkpoint
        return [f"{path}: {type(err).__name__}: {err}"]
    return []


@dataclass
class KillReport:
    kills: int = 0
    kills_while_saving: int = 0
    """Kills that found a checkpoint's hidden temporary on disk (mid-save or mid-delete)."""
    starts_with_checkpoint: int = 0
    """Starts that found a complete checkpoint on disk (every one must resume from it)."""
    resumed_at_latest: int = 0
    """Starts that logged "resumed from" the newest complete checkpoint on disk."""
    corrupt_latest: list[str] = field(default_factory=list)
    """Problems of checkpoints that resume=latest would have loaded after a kill."""
    completed: bool = False
    failure: list[str] = field(default_factory=list)
    """Last stderr line of a start that failed (neither killed nor finished)."""
    seconds: float = 0.0


def _hidden(run_dir: Path) -> list[Path]:
    root = run_dir / checkpoint.CHECKPOINT_DIR
    return [p for pattern in checkpoint.HIDDEN_GLOBS for p in root.glob(pattern)]


def _wait_then_kill(process, run_dir: Path, log: Path, mode: str, rng, budget: float) -> bool:
    """SIGKILL at a random moment of training (`random`: up to `budget` seconds after the run
    said it started or resumed) or just after a checkpoint save began (`saving`).

    Returns whether a checkpoint temporary existed at the moment of the kill.
    """
    before, deadline = set(_hidden(run_dir)), time.monotonic() + 600
    while mode == "random" and process.poll() is None and time.monotonic() < deadline:
        if "vlp-train: started" in log.read_text() or "vlp-train: resumed" in log.read_text():
            deadline = time.monotonic() + rng.uniform(0, budget)
            break
        time.sleep(0.01)
    while time.monotonic() < deadline and process.poll() is None:
        if mode == "saving" and set(_hidden(run_dir)) - before:
            time.sleep(rng.uniform(0, 0.03))  # somewhere inside the save
            break
        time.sleep(0.002)
    saving = bool(_hidden(run_dir))
    process.send_signal(signal.SIGKILL)
    process.wait()
    return saving


def kill_and_resume(
    shards: str, run_dir: Path, steps: int, kills: int, seed: int, budget: float = 2.0
) -> KillReport:
    """Start the run, SIGKILL it `kills` times (alternately at random and while saving), check
    what resume=latest would load after each kill, then let it finish."""
    rng, report, started = random.Random(seed), KillReport(), time.monotonic()
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    while not report.completed:
        latest = checkpoint.resolve("latest", run_dir)
        if latest is not None:
            report.corrupt_latest += checkpoint_problems(latest)
        with log.open("w") as stderr:
            process = subprocess.Popen(
                train_command(shards, run_dir, steps), cwd=REPO, stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
            if report.kills < kills:
                mode = "random" if report.kills % 2 == 0 else "saving"
                saving = _wait_then_kill(process, run_dir, log, mode, rng, budget)
                killed = process.returncode == -signal.SIGKILL
                report.kills += killed
                report.kills_while_saving += saving and killed
            else:
                process.wait(timeout=900)
        text = log.read_text()
        if latest is not None:
            report.starts_with_checkpoint += 1
            report.resumed_at_latest += f"resumed from {latest} at step" in text
        if process.returncode == 0:
            report.completed = True
        elif process.returncode != -signal.SIGKILL:
            report.failure = text.strip().splitlines()[-1:]
            break
    report.seconds = time.monotonic() - started
    return report


@dataclass
class StarvedRun:
    """A run whose output stops taking data mid-run, and the same command run again after."""

    exit_code: int
    error_lines: list[str]
    traceback: bool
    latest: str | None
    """The newest complete checkpoint after the failure."""
    latest_problems: list[str]
    temporaries_left: int
    resumed: bool = False
    """The rerun (with space again) finished and said it resumed."""

    @property
    def clean(self) -> bool:
        """One `cannot write checkpoint` line naming the intact newest checkpoint, exit 1."""
        return (
            self.exit_code == 1 and not self.traceback and len(self.error_lines) == 1
            and self.error_lines[0].startswith("vlp-train: error: cannot write checkpoint")
            and self.latest is not None and f"{self.latest} is intact" in self.error_lines[0]
            and not self.latest_problems and self.temporaries_left == 0
        )  # fmt: skip


def starved_run(shards: str, run_dir: Path, steps: int, starve, restore=None) -> StarvedRun:
    """Run until `starve(process)` returns (it waits for its moment and takes the space away),
    check what is left, then `restore()` the space and run the same command again."""
    command = train_command(shards, run_dir, steps, "train.log_every_steps=1000")
    process = subprocess.Popen(
        command, cwd=REPO, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    )  # fmt: skip
    starve(process)
    _, stderr = process.communicate(timeout=600)
    root = run_dir / checkpoint.CHECKPOINT_DIR
    complete = checkpoint.complete_checkpoints(root)
    result = StarvedRun(
        process.returncode,
        [line for line in stderr.splitlines() if "error" in line.lower()],
        "Traceback" in stderr,
        str(complete[-1]) if complete else None,
        checkpoint_problems(complete[-1]) if complete else ["no checkpoint"],
        len(_hidden(run_dir)),
    )
    if restore is not None:
        restore()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    result.resumed = again.returncode == 0 and "resumed from" in again.stderr
    return result


def limit_file_size_after(run_dir: Path, step: int, limit: int = 16384):
    """A `starve` for starved_run: once checkpoint `step` exists, RLIMIT_FSIZE makes every
    larger write fail with EFBIG, as a full disk fails them (no root or special filesystem)."""

    def starve(process) -> None:
        published = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(step)
        deadline = time.monotonic() + 300
        while not published.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))

    return starve


# --- data faults -----------------------------------------------------------------------------

KINDS = (
    "truncated_jpeg",
    "zero_byte_image",
    "wrong_extension",
    "decompression_bomb",
    "missing_caption",
    "non_utf8_caption",
    "long_caption",
    "duplicate_key",
    "truncated_tar",
    "missing_shard",
)
TRAIN_REASON: dict[str, str | None] = {
    "truncated_jpeg": "truncated_image",
    "zero_byte_image": "empty_image",
    "wrong_extension": "missing_image",
    "decompression_bomb": "decompression_bomb",
    "missing_caption": "missing_caption",
    "non_utf8_caption": "non_utf8_caption",
    "long_caption": None,  # truncated to the context by the tokenizer: trains
    "duplicate_key": None,  # two distinct samples in two shards: both train
    "truncated_tar": "truncated_tar",
    "missing_shard": "missing_file",
}
"""The skip reason each fault must produce in training and in `vlp-shard reshard`."""
VERIFY_REASON = {**TRAIN_REASON, "duplicate_key": "duplicate_key"}
"""`vlp-shard verify` also reports keys that occur twice in the set."""


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A 144-megapixel PNG of a few hundred KB (Pillow's default limit is 89 Mpx)."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample["members"].items():
                info = tarfile.TarInfo(f"{sample['key']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@dataclass
class FaultySet:
    pattern: str
    injected: Counter
    """Faults by kind."""
    kind_of: dict[str, str]
    """Sample key -> injected kind (good samples are absent)."""
    good: int
    """Samples every tool must keep (training, reshard and verify alike)."""
    pass_items: int
    """Items one pass over the set yields: readable samples plus one per shard-level problem."""

    def expected(self, table: dict[str, str | None]) -> Counter:
        return Counter({table[k]: n for k, n in self.injected.items() if table[k]})


def faulty_shards(root: Path, per_kind: int = 1, shards: int = 6, per_shard: int = 20) -> FaultySet:
    """`shards` tars of `per_shard` samples with `per_kind` faults of every sample kind spread
    over them, plus one truncated tar (cut inside its last member) and one missing shard."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(per_kind * 1000 + shards)
    tars = [
        [{"key": f"s{s}_{i:03d}", "members": {"jpg": jpeg(s * 1000 + i), "txt": b"a shape"}}
         for i in range(per_shard)]
        for s in range(shards)
    ]  # fmt: skip
    kind_of: dict[str, str] = {}
    injected: Counter = Counter()
    # the last sample of shard 0 is the truncated tar's victim; dupes use shard edges
    free = [(s, i) for s in range(1, shards) for i in range(1, per_shard - 1)]
    bomb = _bomb()
    for kind in KINDS[:7]:
        for s, i in rng.sample(free, per_kind):
            free.remove((s, i))
            sample = tars[s][i]
            _inject(kind, sample, bomb)
            kind_of[sample["key"]] = kind
            injected[kind] += 1
    for d in range(min(per_kind, shards - 2)):  # last key of shard d+1 = first key of shard d+2
        key = tars[d + 1][-1]["key"]
        tars[d + 2][0]["key"] = key
        kind_of[key] = "duplicate_key"
        injected["duplicate_key"] += 1
    for s, samples in enumerate(tars):
        _write_tar(root / f"{s:05d}.tar", samples)
    cut = root / "00000.tar"
    with tarfile.open(cut) as tar:
        last = [m for m in tar if m.isfile()][-1]
    cut.write_bytes(cut.read_bytes()[: last.offset_data + last.size // 2])
    injected["truncated_tar"] += 1
    injected["missing_shard"] += 1  # the pattern names one more shard than exists
    total = shards * per_shard
    lost_to_faults = sum(n for k, n in injected.items() if TRAIN_REASON[k]) - 2  # shard-level
    good = total - 1 - lost_to_faults  # 1: the sample at the truncated tar's cut
    pattern = str(root / f"{{00000..{shards:05d}}}.tar")
    return FaultySet(pattern, injected, kind_of, good, total - 1 + 2)


def _inject(kind: str, sample: dict, bomb: bytes) -> None:
    members = sample["members"]
    if kind == "truncated_jpeg":
        members["jpg"] = members["jpg"][: len(members["jpg"]) * 2 // 3]
    elif kind == "zero_byte_image":
        members["jpg"] = b""
    elif kind == "wrong_extension":
        members["tif"] = members.pop("jpg")
    elif kind == "decompression_bomb":
        members.pop("jpg")
        members["png"] = bomb
    elif kind == "missing_caption":
        members.pop("txt")
    elif kind == "non_utf8_caption":
        members["txt"] = b"caf\xe9 \xff\xfe"
    elif kind == "long_caption":
        members["txt"] = ("a very long caption " * 2000).encode()


@dataclass
class PassReport:
    """One training pass over a FaultySet, compared item by item with what was injected."""

    exit_code: int
    skipped: Counter
    """Skips by reason, as the run's final checkpoint records them."""
    expected: Counter
    """Injected faults among the items the run read, by the reason they must produce."""
    left: Counter
    """Kinds of the pass's items after the run's final position (all faults, if none lost)."""
    lost: int
    """Good samples the run passed without training on them (must be 0)."""


def train_one_pass(faulty: FaultySet, run_dir: Path, batch: int) -> PassReport:
    """Train on exactly the set's good samples (`batch` must divide them); shuffle_buffer=1
    makes one pass the first `faulty.pass_items` items of the worker's stream."""
    from vlp.data.pipeline import Cursor, Position, StreamSpec, pooled_items
    from vlp.data.shards import expand_shards
    from vlp.train import main

    steps = faulty.good // batch
    assert steps * batch == faulty.good, "the batch size must divide the good samples"
    code = main(["--config", "configs/coca_demo.yaml", f"data.train_shards={faulty.pattern}",
                 f"run.output_dir={run_dir}", "model.name=vlp-tiny-clip",
                 "objectives.caption.weight=0", f"data.batch_size={batch}", "data.workers=0",
                 "data.shuffle_buffer=1", f"train.steps={steps}", f"checkpoint.every_steps={steps}",
                 "train.log_every_steps=1000", "run.trackers=[]", *NO_DEMO_EVAL])  # fmt: skip
    if code != 0:
        return PassReport(code, Counter(), Counter(), Counter(), faulty.good)
    final = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(steps)
    meta = json.loads((final / checkpoint.META_FILE).read_text())
    end = Position.from_dict(meta["data"]["positions"][0]["0"]).cursors[0]
    spec = StreamSpec([expand_shards(faulty.pattern)], [1.0], "epoch", 0, 1, batch, 1, 0, 1)
    seen, left, reached = Counter(), Counter(), False
    for number, (item, cursor) in enumerate(pooled_items(spec, 0, 0, Cursor())):
        if number == faulty.pass_items:
            break
        (left if reached else seen)[_kind(item, faulty)] += 1
        reached = reached or cursor == end
    kept = sum(n for kind, n in seen.items() if not TRAIN_REASON.get(kind))
    expected = Counter({TRAIN_REASON[k]: n for k, n in seen.items() if TRAIN_REASON.get(k)})
    return PassReport(code, Counter(meta["skipped"]), expected, left, steps * batch - kept)


def _kind(item, faulty: FaultySet) -> str:
    """An item's injected kind: by key for samples, by reason for shard-level problems."""
    if isinstance(item, dict):
        return faulty.kind_of.get(item["__key__"], "good")
    return {"truncated_tar": "truncated_tar", "missing_file": "missing_shard"}[item.value]


# --- untrusted files -------------------------------------------------------------------------


class Payload:
    """Unpickling this runs `touch MARKER`: a loader that executes pickles would create it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(path: Path, marker: Path) -> Path:
    """A torch-style weights file whose state dict carries a code-running pickle."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "evil": Payload(marker)}, path)
    return path


def traversal_tar(path: Path, escape_dir: Path) -> list[Path]:
    """A tar of valid samples whose member names are absolute or climb with `..`; returns the
    paths an extracting tool would write outside its output directory."""
    targets = [escape_dir / "abs_sample.jpg", escape_dir / "abs_sample.txt"]
    names = {
        f"{escape_dir}/abs_sample": 0,
        f"../../../../../../../../../../..{escape_dir}/dotdot_sample": 1,
    }
    targets += [escape_dir / "dotdot_sample.jpg", escape_dir / "dotdot_sample.txt"]
    with tarfile.open(path, "w") as tar:
        for stem, seed in names.items():
            for extension, data in (("jpg", jpeg(seed)), ("txt", b"a traversal")):
                info = tarfile.TarInfo(f"{stem}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return targets


# --- stop requests ---------------------------------------------------------------------------

ACCELERATE = [
    str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip
"""`accelerate launch` as `make demo` runs it; followed by vlp/train.py and its arguments."""


@dataclass
class SignalledRun:
    exit_code: int
    stderr: str
    started_at: int
    """The step the run started (or resumed) at."""
    seconds_to_exit: float
    """From the first signal to the launched process's exit."""


def ctrl_c(process) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
    os.killpg(process.pid, signal.SIGINT)


def signal_run(
    command: list[str], steps_first: int, send, then=None, timeout: float = 600
) -> SignalledRun:
    """Start `command` in a process group of its own, wait until it has trained `steps_first`
    steps (its `step N:` log lines; log every step), `send(process)`, `then(process)` once it
    says it is stopping, and let it end."""
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    watchdog = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    lines, start, sent_at = [], None, None
    try:
        for line in process.stderr:
            lines.append(line)
            if start is None and ("vlp-train: started" in line or "vlp-train: resumed" in line):
                start = int(line.split(" at step ")[1].split(";")[0]) if "resumed" in line else 0
            if (
                start is not None
                and sent_at is None
                and line.startswith(f"step {start + steps_first}:")
            ):
                sent_at = time.monotonic()
                send(process)
            elif then is not None and ": stopping after this step" in line:
                then(process)
                then = None
        process.wait()
    finally:
        watchdog.cancel()
    seconds = time.monotonic() - sent_at if sent_at is not None else float("nan")
    return SignalledRun(process.returncode, "".join(lines), start or 0, seconds)
