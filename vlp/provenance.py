"""Where a result came from: the commit of the code that produced it and the machine it ran on.

Studies and benchmarks write both into their results JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
"""The checkout vlp runs from (for an installed wheel, a site-packages folder: no git there)."""


def git_state(directory: Path = CHECKOUT) -> dict[str, Any]:
    """HEAD of the checkout at `directory` and whether tracked files differ from it."""
    head = _git(directory, "rev-parse", "HEAD")
    if not head:
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status)}


def _git(directory: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True)
    except OSError:  # no git installed
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine_info() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
