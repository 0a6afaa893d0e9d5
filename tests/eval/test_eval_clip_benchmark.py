"""vlp-eval agrees with clip_benchmark's own metric code on the same checkpoint and eval sets.

clip_benchmark 1.6.2's `accuracy` calls float() on a one-element array, which numpy >= 2.4
rejects. Rather than pin numpy for the whole project, the test gives that one module a
`float` that accepts exactly that case (module globals shadow builtins); every other line that
runs is clip_benchmark's: its dataset builder, classifier, logits, top-k, balanced accuracy and
retrieval recall. bench/eval_vs_clip_benchmark.py runs clip_benchmark's unpatched CLI in its
own environment with numpy < 2.4.
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from evalkit import demo_eval_sets, tiny_run

from eval.checkpoints import resolve_checkpoint
from eval.datasets import open_eval_set
from eval.models import load_model
from eval.options import EvalOptions
from eval.tasks import evaluate

TOLERANCE = 0.001
"""0.1 point, as fractions."""
# clip_benchmark's wds reader leaves webdataset's shardshuffle unset
pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")


def _float(value):
    """builtins.float, also for a one-element array (what clip_benchmark passes)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return builtins.float(value.reshape(()))
    return builtins.float(value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    eval_dir = demo_eval_sets(tmp_path_factory)
    model = load_model(resolve_checkpoint(tiny_run(tmp_path_factory)), "cpu")
    return eval_dir, model


def _their_loader(dataset):
    # as clip_benchmark's CLI builds it for wds/ sets
    return torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, num_workers=0)


def test_zero_shot_classification_agrees(setup, monkeypatch):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    eval_dir, model = setup
    monkeypatch.setattr(zeroshot_classification, "float", _float, raising=False)
    dataset = build_dataset("wds/shapes", root=str(eval_dir / "shapes"),
                            transform=model.preprocess, split="test", download=False)  # fmt: skip
    theirs = zeroshot_classification.evaluate(
        model.module, _their_loader(dataset), model.tokenizer, dataset.classes,
        dataset.templates, "cpu", amp=False,
    )  # fmt: skip
    ours = evaluate(model, open_eval_set(eval_dir / "shapes"), "auto", EvalOptions()).metrics
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours[name] - theirs[name]) <= TOLERANCE, (name, ours[name], theirs[name])
    assert 0 < ours["acc5"] < 1  # a random model: neither degenerate nor perfect


def test_zero_shot_retrieval_agrees(setup):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval

    eval_dir, model = setup
    dataset = build_dataset("wds/retrieval", root=str(eval_dir / "retrieval"),
                            transform=model.preprocess, split="test", download=False,
                            task="zeroshot_retrieval")  # fmt: skip
    theirs = zeroshot_retrieval.evaluate(model.module, _their_loader(dataset), model.tokenizer,
                                         "cpu", amp=False, recall_k_list=[1, 5, 10])  # fmt: skip
    ours = evaluate(model, open_eval_set(eval_dir / "retrieval"), "auto", EvalOptions()).metrics
    for name, value in theirs.items():
        assert abs(ours[name] - value) <= TOLERANCE, (name, ours[name], value)
    assert ours["image_retrieval_recall@10"] > 0
