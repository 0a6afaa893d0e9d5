"""vlp installed like a library: the wheel, in a fresh venv, outside the repository.

The venv reuses the dev venv's packages (torch included) through a .pth file instead of
downloading them again; vlp itself comes only from the wheel (the dev venv's editable-install
hooks are .pth files of its own site-packages, which a path added this way does not run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "vlp", "eval", "data_tools")


def _run(command: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv's
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding the wheel of this checkout, its dependencies found in the dev venv."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            caches = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, source / name, ignore=caches)
        else:
            shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source], root)
    env = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env], root)
    python = env / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    (Path(site.strip()) / "dev-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("vlp-*.whl")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], root)
    return env


def test_the_wheel_installs_with_satisfied_dependencies_and_ships_its_configs(venv):
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "check"], venv)
    where = _run([python, "-c", "import vlp.config as c; print(c.PACKAGED_CONFIGS)"], venv)
    packaged = Path(where.strip())
    assert packaged.is_relative_to(venv), f"vlp imported from {packaged}, not the wheel"
    for shipped in ("demo.yaml", "models/vlp-demo-clip.json", "accelerate/ddp.yaml"):
        assert (packaged / shipped).is_file(), shipped


def test_shard_train_and_eval_run_from_outside_the_repository(venv, tmp_path):
    bin_ = venv / "bin"
    _run([bin_ / "vlp-shard", "demo", "data/demo", "--num-samples", "256", "--eval-samples", "64"],
         tmp_path)  # fmt: skip
    # the packaged demo config (no --config), cut to a few steps; a user config extends it
    (tmp_path / "mine.yaml").write_text("base: demo.yaml\ntrain:\n  steps: 2\n")
    small = ["data.train_shards=data/demo/train/00000.tar", "data.batch_size=16",
             "data.workers=0", "train.warmup_steps=1", "run.trackers=[]"]  # fmt: skip
    _run([bin_ / "vlp-train", "--config", "mine.yaml", *small], tmp_path)
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "step_000000002").is_dir()
    _run([bin_ / "vlp-eval", "--checkpoint", "runs/demo", "--dataset", "data/demo/eval/shapes",
          "--output", "shapes.json"], tmp_path)  # fmt: skip
    assert (tmp_path / "shapes.json").is_file()
