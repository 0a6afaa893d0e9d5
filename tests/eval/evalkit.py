"""Helpers for the eval tests: eval sets, fake models with known answers, tiny checkpoints.

Not a conftest.py: a second conftest module would shadow tests/conftest.py for the
`from tests.conftest import ...` lines of the other tests. Session-wide inputs are built once
under pytest's base temp directory, whichever test module asks first.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.models import EvalModel

REPO = Path(__file__).resolve().parents[2]

# ---- eval sets whose images carry an id the fake model can read back


def id_image(image_id: int, size: int = 8) -> Image.Image:
    """A flat image whose red value encodes `image_id` (0..11), exactly, as PNG."""
    return Image.new("RGB", (size, size), (10 + 20 * image_id, 128, 128))


def write_eval_set(
    root: Path,
    samples: Sequence[tuple[int, object]],
    kind: str = "classification",
    classnames: Sequence[str] = (),
    templates: Sequence[str] = ("a photo of a {c}.",),
    num_shards: int = 1,
) -> Path:
    """clip_benchmark's layout: `samples` are (image id, class index | list of captions)."""
    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(samples) // num_shards)
    for shard in range(num_shards):
        with tarfile.open(split / f"{shard}.tar", "w") as tar:
            for index in range(shard * per_shard, min((shard + 1) * per_shard, len(samples))):
                image_id, target = samples[index]
                _add(tar, f"{index:06d}.png", _png(id_image(image_id)))
                if kind == "classification":
                    _add(tar, f"{index:06d}.cls", str(target).encode())
                else:
                    _add(tar, f"{index:06d}.txt", "\n".join(target).encode())
    (split / "nshards.txt").write_text(f"{num_shards}\n")
    (root / "dataset_type.txt").write_text(f"{kind}\n")
    if kind == "classification":
        (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
        (root / "zeroshot_classification_templates.txt").write_text(
            "".join(f"{t}\n" for t in templates)
        )
    return root


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---- a fake CLIP-like model: embeddings chosen by the test


class FakeModule(torch.nn.Module):
    """encode_image returns image_table[id read from the pixels]; encode_text text_table[token]."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor):
        super().__init__()
        self.image_table, self.text_table = image_table, text_table

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        ids = ((images[:, 0] - 10) / 20).round().long()  # (B,)
        return self.image_table[ids]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_table[tokens[:, 0]]


def fake_model(
    image_table: torch.Tensor, text_table: torch.Tensor, vocabulary: Sequence[str]
) -> EvalModel:
    """An EvalModel whose tokenizer maps vocabulary[i] to token i (unknown text: an error)."""
    index = {text: i for i, text in enumerate(vocabulary)}

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[index[t]] for t in texts], dtype=torch.long)

    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.tensor([float(np.asarray(image)[0, 0, 0])])

    return EvalModel(FakeModule(image_table, text_table), preprocess, tokenizer, "fake")


def one_hot(rows: Sequence[int], dim: int) -> torch.Tensor:
    return torch.eye(dim)[list(rows)]


# ---- real tiny open_clip checkpoints and the demo eval sets


def session_dir(tmp_path_factory, name: str) -> tuple[Path, bool]:
    """A directory shared by the whole session; True if it still has to be filled."""
    path = tmp_path_factory.getbasetemp() / name
    done = path / ".done"
    return path, not done.exists()


def mark_done(path: Path) -> None:
    (path / ".done").touch()


def demo_eval_sets(tmp_path_factory) -> Path:
    """`vlp-shard demo --eval-samples 40 --image-size 32`: DIR/eval/shapes, DIR/eval/retrieval."""
    from data_tools.cli import main

    out, todo = session_dir(tmp_path_factory, "eval-demo")
    if todo:
        args = ["demo", str(out), "--num-samples", "10", "--eval-samples", "40"]
        assert main([*args, "--image-size", "32"]) == 0
        mark_done(out)
    return out / "eval"


def write_checkpoint(directory: Path, model_name: str, step: int, seed: int = 0) -> Path:
    """A vlp checkpoint directory: model.safetensors of a seeded random model + meta.json."""
    import open_clip
    from safetensors.torch import save_file

    from vlp.model import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    meta = {"step": step, "config": {"model": {"name": model_name}}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def tiny_run(tmp_path_factory) -> Path:
    """A run directory with one complete vlp-tiny-clip checkpoint (step 100) and metrics."""
    run, todo = session_dir(tmp_path_factory, "eval-run")
    if todo:
        write_checkpoint(run / "checkpoints" / "step_000000100", "vlp-tiny-clip", step=100)
        (run / "config.yaml").write_text("model:\n  name: vlp-tiny-clip\n")
        write_metrics(run / "metrics.jsonl")
        mark_done(run)
    return run


def write_metrics(path: Path, steps: int = 60) -> None:
    """metrics.jsonl as the training loop writes it, with eval records every 20 steps."""
    lines = []
    for step in range(10, steps + 1, 10):
        lines.append(
            {
                "step": step,
                "samples": step * 128,
                "lr": 5e-4 * step / steps,
                "loss/total": 3.0 - step / 100,
                "loss/contrastive": 2.0 - step / 100,
                "loss/caption": 1.0,
                "samples_per_s": 140.0,
                "data_wait": 0.03,
            }
        )
        if step % 20 == 0:
            lines.append(
                {
                    "step": step,
                    "eval/shapes/acc1": step / 100,
                    "eval/retrieval/image_retrieval_recall@1": step / 200,
                    "eval/retrieval/gap": 1 - step / 100,
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
