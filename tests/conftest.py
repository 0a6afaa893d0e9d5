"""Shared helpers: every test builds its own inputs (images, tables, shards) in tmp_path."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NO_DEMO_EVAL = (
    "eval.shapes.every_steps=0",
    "eval.shapes.at_end=false",
    "eval.retrieval.every_steps=0",
    "eval.retrieval.at_end=false",
)
"""Overrides that switch off configs/demo.yaml's evaluators: with data/demo built (make demo)
they would otherwise run inside tests that train from that config on their own shards."""


def demo_shards(out: Path, samples: int, per_shard: int) -> Path:
    """`vlp-shard demo` into `out`: `samples` training samples in shards of `per_shard` at
    32 px, and eval sets of 8 samples each; returns `out`."""
    subprocess.run(
        [sys.executable, "-m", "data_tools", "demo", str(out), "--num-samples", str(samples),
         "--samples-per-shard", str(per_shard), "--image-size", "32", "--eval-samples", "8"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return out


def make_image(path: Path, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    """A smooth random colour image (compresses like a photo), format from the suffix."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def image_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def shard_bytes(directory: Path) -> dict[str, bytes]:
    """Every visible shard's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def free_port() -> int:
    """A port nothing listens on now (tests of other checkouts may run torchrun meanwhile)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(module: str, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m MODULE ARGS` from the repository (gloo on a CPU)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
    return subprocess.run(
        [*command, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run `python -m data_tools ARGS` in a fresh process (exit codes, stderr, no traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )


@pytest.fixture
def cli(capsys):
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    from data_tools.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
