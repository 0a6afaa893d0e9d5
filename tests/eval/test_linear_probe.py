"""Linear probe: clip_benchmark's protocol (sweep, validation split, refit), its agreement with
clip_benchmark's own linear_probe.evaluate, the train/ splits vlp-shard writes, and mistakes."""

from __future__ import annotations

import builtins
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from evalkit import demo_eval_sets, tiny_run

from eval import linear_probe
from eval.checkpoints import resolve_checkpoint
from eval.cli import main
from eval.datasets import open_eval_set
from eval.during_training import open_evaluators
from eval.linear_probe import WEIGHT_DECAYS, choose_weight_decay, fit_probe, validation_split
from eval.models import load_model
from eval.options import EvalOptions
from eval.tasks import evaluate
from vlp.config import EvalConfig, ProbeConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_validation_split_is_a_seeded_partition():
    train, val = validation_split(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(val, validation_split(100, 0.2, seed=3)[1])
    assert not torch.equal(val, validation_split(100, 0.2, seed=4)[1])
    assert len(validation_split(3, 0.01, 0)[1]) == 1 and len(validation_split(3, 0.99, 0)[0]) == 1


def test_sweep_is_the_coarse_grid_then_halving_spans_around_the_best(monkeypatch):
    """Validation accuracy peaking at grid index 37: coarse 0, 16, ..., 96 finds 32; then
    (24, 32, 40) -> 40, (36, 40, 44) -> 36, (34, 36, 38) -> 36 (a tie keeps the first),
    (35, 36, 37) -> 37."""
    index = {wd: i for i, wd in enumerate(WEIGHT_DECAYS)}

    def fake_fit(features, labels, num_classes, weight_decay, probe, seed):
        right = round(100 * (1 - abs(index[weight_decay] - 37) / 100))

        def layer(val_features):  # the first `right` of 100 rows classified right (label 0)
            return torch.eye(2)[(torch.arange(len(val_features)) >= right).long()]

        return layer

    monkeypatch.setattr(linear_probe, "fit_probe", fake_fit)
    val = (torch.zeros(100, 4), torch.zeros(100, dtype=torch.long))
    chosen, tried = choose_weight_decay(val, val, 2, ProbeConfig(), 0)
    assert chosen == WEIGHT_DECAYS[37]
    expected = {0, 16, 32, 48, 64, 80, 96, 24, 40, 36, 44, 34, 38, 35, 37}
    assert set(tried) == {WEIGHT_DECAYS[i] for i in expected}


def test_a_fit_separates_separable_features_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    features = centres[labels] + 0.05 * torch.randn(200, 16, generator=generator)
    layer = fit_probe(features, labels, 4, 1e-4, ProbeConfig(), seed=0)
    with torch.no_grad():
        assert (layer(features).argmax(dim=1) == labels).float().mean() == 1
    again = fit_probe(features, labels, 4, 1e-4, ProbeConfig(), seed=0)
    assert torch.equal(layer.weight, again.weight)


# ---- agreement with clip_benchmark's linear_probe.evaluate on real Fashion-MNIST images


class _OnCpu(str):
    """A device name equal to "cuda" (clip_benchmark's linear probe asserts it) that torch
    reads as the CPU."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def _float(value):
    """builtins.float, also for a one-element array (clip_benchmark's accuracy passes one,
    which numpy >= 2.4 refuses; see test_eval_clip_benchmark.py)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return builtins.float(value.reshape(()))
    return builtins.float(value)


@pytest.fixture(scope="module")
def fashion_set(tmp_path_factory) -> Path:
    """The first 2000 Fashion-MNIST train images (train/) and 1000 test images (test/), 32 px."""
    from data_tools.evalsets import write_classification_set, write_train_split
    from data_tools.images import ImageOptions
    from data_tools.sources import fashion_mnist as fm
    from data_tools.writer import WriteOptions

    out = tmp_path_factory.mktemp("fashion") / "fashion-mnist"
    image = ImageOptions(size=32, resize_mode="keep_ratio", format="png", quality=95,
                         max_pixels=10**8)  # fmt: skip
    opts = WriteOptions(5000, 1, 1, 0, False)
    test = fm.FashionMnistSource(FASHION_MNIST, "test", num_samples=1000)
    write_classification_set(test, out, fm.CLASSNAMES, ["a photo of a {c}."], image, opts)
    write_train_split(fm.FashionMnistSource(FASHION_MNIST, "train", num_samples=2000), out,
                      image, opts)  # fmt: skip
    return out


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.slow
def test_agrees_with_clip_benchmark(fashion_set, tmp_path_factory, monkeypatch):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import linear_probe as theirs_module
    from clip_benchmark.metrics import zeroshot_classification

    model = load_model(resolve_checkpoint(tiny_run(tmp_path_factory)), "cpu")
    ours = evaluate(model, open_eval_set(fashion_set), "linear_probe", EvalOptions())
    # their loaders over the same images, validation rows as ours; CPU stands in for CUDA
    monkeypatch.setattr(zeroshot_classification, "float", _float, raising=False)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)

    def items(split):
        return list(build_dataset("wds/fashion-mnist", root=str(fashion_set), split=split,
                                  transform=model.preprocess, download=False))  # fmt: skip

    train, test = items("train"), items("test")
    fit_rows, val_rows = validation_split(len(train), 0.2, seed=0)

    def loader(rows):
        return torch.utils.data.DataLoader(rows, batch_size=64)

    threads = torch.get_num_threads()
    torch.manual_seed(0)  # their feature order draws from the global generator
    torch.set_num_threads(1)  # as our probe runs; many tiny steps are slow on several threads
    try:
        theirs = theirs_module.evaluate(
            model.module, loader([train[i] for i in fit_rows]), loader(test), -1, 64, 0, 0.1,
            10, "tiny", 0, tempfile.mkdtemp(), _OnCpu("cpu"),
            val_dataloader=loader([train[i] for i in val_rows]), amp=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for name in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert abs(ours.metrics[name] - theirs[name]) <= 0.01, (name, ours.metrics, theirs)
    assert 0.3 < ours.metrics["lp_acc1"] < 0.9  # a random tower: informative, not perfect


# ---- vlp-shard's train/ splits, vlp-eval --task linear_probe, evaluators, mistakes


def test_demo_writes_a_train_split_clip_benchmark_reads(tmp_path_factory):
    from clip_benchmark.datasets.builder import build_dataset

    shapes = demo_eval_sets(tmp_path_factory) / "shapes"
    train = build_dataset("wds/shapes", root=str(shapes), split="train", transform=None,
                          download=False)  # fmt: skip
    labels = [label for _, label in train]
    assert len(labels) == 40 and sorted(set(labels)) == list(range(8))
    test_keys = {p.name for p in (shapes / "test").iterdir()}
    assert "0.tar" in test_keys and (shapes / "train" / "nshards.txt").read_text() == "1\n"


def test_cli_scores_a_demo_checkpoint(tmp_path_factory, tmp_path, capsys):
    shapes = demo_eval_sets(tmp_path_factory) / "shapes"
    args = ["--checkpoint", tiny_run(tmp_path_factory), "--dataset", shapes, "--task",
            "linear_probe", "--probe-epochs", "2", "--output", tmp_path / "lp.json"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert "### linear_probe" in capsys.readouterr().out
    result = json.loads((tmp_path / "lp.json").read_text())
    assert set(result["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    details = result["details"]
    assert details["num_train"] == 32 and details["num_validation"] == 8
    assert details["weight_decay"] in WEIGHT_DECAYS and details["probe"]["epochs"] == 2


@pytest.fixture
def fails(capsys):
    def run(*args) -> str:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("vlp-eval: error: "), err
        return err

    return run


def test_user_mistakes_are_one_line(tmp_path_factory, tmp_path, fails):
    import shutil

    run, shapes = tiny_run(tmp_path_factory), demo_eval_sets(tmp_path_factory) / "shapes"
    base = ["--checkpoint", run, "--task", "linear_probe"]
    copy = shutil.copytree(shapes, tmp_path / "shapes", ignore=shutil.ignore_patterns("train"))
    err = fails(*base, "--dataset", copy)
    assert f"{copy}: linear_probe needs a train/ split beside test/" in err
    err = fails(*base, "--dataset", shapes, "--probe-val-proportion", 1)
    assert "--probe-val-proportion 1.0: must be in (0, 1)" in err
    assert "--probe-lr -0.1: must be a positive number" in fails(
        *base, "--dataset", shapes, "--probe-lr", -0.1
    )
    err = fails(*base, "--dataset", shapes.parent / "retrieval")
    assert "task linear_probe needs a classification set" in err


def test_an_evaluator_without_a_train_split_is_switched_off(tmp_path_factory, tmp_path):
    import shutil

    shapes = demo_eval_sets(tmp_path_factory) / "shapes"
    copy = shutil.copytree(shapes, tmp_path / "shapes", ignore=shutil.ignore_patterns("train"))
    configs = {
        "probe": EvalConfig(dataset=str(shapes), type="linear_probe"),
        "lost": EvalConfig(dataset=str(copy), type="linear_probe"),
    }
    messages: list[str] = []
    evaluators = open_evaluators(configs, 10, messages.append)
    assert list(evaluators.schedule) == ["probe"]
    assert len(messages) == 1 and "eval.lost switched off" in messages[0]
    assert "needs a train/ split" in messages[0]
