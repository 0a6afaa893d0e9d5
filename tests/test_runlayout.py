"""vlp.runlayout: the run directory's names and meta.json schema, once, torch-free, shared by
training and evaluation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vlp.runlayout import CheckpointMeta, checkpoint_name, checkpoint_step

REPO = Path(__file__).resolve().parents[1]
NAMES = ("meta.json", "metrics.jsonl", "model.safetensors", "config.yaml", "history.jsonl")


def test_it_imports_without_torch():
    code = "import sys, vlp.runlayout; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_no_other_module_spells_a_run_file_name():
    for package in ("vlp", "eval"):
        for path in (REPO / package).rglob("*.py"):
            if path.name == "runlayout.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert node.value not in NAMES, f"{path}: {node.value!r}"


def test_meta_round_trips_and_readers_take_what_is_there(tmp_path):
    meta = CheckpointMeta(7, 56, {"model": {"name": "vlp-tiny-clip"}}, {"stream": {}}, {"x": 1})
    assert CheckpointMeta.from_json(meta.to_json()) == meta
    assert meta.model_name == "vlp-tiny-clip"
    assert CheckpointMeta.from_json('{"step": 3, "extra": 1}') == CheckpointMeta(step=3)
    for bad in ("[]", '{"step": "3"}', '{"config": []}', '{"step": true}'):
        with pytest.raises(ValueError):
            CheckpointMeta.from_json(bad)
    assert checkpoint_step(tmp_path / checkpoint_name(12)) == 12
    assert checkpoint_step(tmp_path / f".{checkpoint_name(12)}.tmp") is None
