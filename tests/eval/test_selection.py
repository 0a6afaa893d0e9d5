"""Image-caption selection: the metric, the binding sets the sources write, agreement with
clip_benchmark's own implementation on the same checkpoint, the CLI and the report."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from evalkit import demo_eval_sets, fake_model, one_hot, tiny_run, write_eval_set

from data_tools.sources import binding
from data_tools.sources import demo as dm
from data_tools.sources import demo_scene as scene
from data_tools.sources.negatives import DemoNegatives
from eval.checkpoints import resolve_checkpoint
from eval.datasets import open_eval_set
from eval.errors import UsageError
from eval.models import load_model
from eval.options import EvalOptions
from eval.selection import overall_results, selection_hits
from eval.tasks import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")


def test_a_hit_needs_the_true_caption_strictly_highest():
    images = torch.eye(3)
    # image 0: true 1.0 vs 0.5 (hit); image 1: true 0.2 vs 0.9 (miss); image 2: a tie (miss)
    texts = torch.tensor([[1.0, 0, 0], [0.5, 0, 0], [0, 0.2, 0], [0, 0.9, 0], [0, 0, 0.3],
                          [0, 0, 0.3], [0, 0, 0.1]])  # fmt: skip
    owners = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    is_true = torch.tensor([True, False, True, False, True, False, False])
    hits, ties = selection_hits(images, texts, owners, is_true)
    assert hits.tolist() == [True, False, False] and ties.tolist() == [False, False, True]


def _objects(meta_objects):
    return Counter((o["colour"], o["shape"]) for o in meta_objects)


@pytest.mark.parametrize("kind", binding.KINDS)
def test_demo_binding_negatives_are_false_and_differ_only_in_their_kind(kind):
    source = binding.DemoBindingSource(kind, 30, image_size=32, seed=0)
    for index in range(len(source)):
        sample = source.read(index)
        true, negative = sample.caption
        objects = sample.meta["objects"]
        assert true != negative and len(objects) == 2
        pairs = zip(true.split(), negative.split(), strict=True)
        changed = [a for a, b in pairs if a != b and {a, b} != {"a", "an"}]  # "an orange"
        if kind == "swap_attribute":  # exactly the two colour words trade places
            assert sorted(changed) == sorted(o["colour"] for o in objects)
        elif kind == "replace_object":  # one shape word, now a shape absent from the scene
            assert len(changed) == 1 and changed[0] in {o["shape"] for o in objects}
        else:  # the two cells trade places
            assert {o["position"] for o in objects} <= {p for p in scene.POSITIONS if p in true}
            words = [sorted(c.replace(".", "").split()) for c in (true, negative)]
            assert words[0] == words[1]  # the same words, other cells
    again = binding.DemoBindingSource(kind, 30, image_size=32, seed=0).read(7)
    assert again.caption == source.read(7).caption


def test_demo_training_negatives_name_other_colour_shape_pairs():
    source = DemoNegatives(dm.DemoSource(60, image_size=32, seed=0))
    kinds = Counter()
    for index in range(len(source)):
        meta = source.read(index).meta
        truth = _objects(meta["objects"])
        assert len(meta["negatives"]) == len(meta["negative_kinds"]) == 2
        for negative, kind in zip(meta["negatives"], meta["negative_kinds"], strict=True):
            kinds[kind] += 1
            assert negative != meta["raw"]
            named = Counter(
                (c, s) for c in scene.COLOURS for s in scene.SHAPES if f"{c} {s}" in negative
            )  # every pair the negative names (as "colour shape" word pairs)
            assert named != truth, (meta["raw"], negative)
    assert kinds["swap_colour"] > 0 and kinds["replace_colour"] > 0
    assert kinds["replace_shape"] == len(source)


def test_fashion_negatives_swap_or_replace_items():
    from data_tools.sources import fashion_mnist as fm

    rng = np.random.default_rng(0)
    for _ in range(50):
        names = [fm.CLASSNAMES[i] for i in rng.integers(0, 10, 4)]
        negatives, kinds = fm.item_negatives(names, rng)
        for negative, kind in zip(negatives, kinds, strict=True):
            if kind == "swap_position":
                assert sorted(negative) == sorted(names) and negative != names
            else:
                assert kind == "replace_item"
                assert sum(a != b for a, b in zip(names, negative, strict=True)) == 1
                assert len(set(negative) - set(names)) == 1
    same = ["bag"] * 4  # nothing to swap: only the replaced item
    assert fm.item_negatives(same, rng)[1] == ["replace_item"]


# ---- real tiny checkpoint: agreement with clip_benchmark, CLI, report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    eval_dir = demo_eval_sets(tmp_path_factory)
    return eval_dir / "binding", tiny_run(tmp_path_factory)


@pytest.mark.parametrize("kind", binding.KINDS)
def test_agrees_with_clip_benchmark(setup, kind):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import image_caption_selection

    binding_dir, run = setup
    model = load_model(resolve_checkpoint(run), "cpu")
    dataset = build_dataset(f"wds/{kind}", root=str(binding_dir / kind), split="test",
                            transform=model.preprocess, download=False,
                            task="image_caption_selection")  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, num_workers=0)
    theirs = image_caption_selection.evaluate(model.module, loader, model.tokenizer, "cpu",
                                              amp=False)  # fmt: skip
    result = evaluate(model, open_eval_set(binding_dir / kind), "auto", EvalOptions())
    assert result.task == "image_caption_selection" and result.details["ties"] == 0
    assert result.details["num_images"] == 40
    for name in ("acc", "text_acc", "image_acc"):
        assert abs(result.metrics[name] - theirs[name]) < 1e-9, (name, result.metrics, theirs)
    assert 0 < result.metrics["acc"] < 1  # a random model: neither degenerate nor perfect


def test_cli_writes_each_kind_and_their_mean_and_the_report_shows_them(setup, tmp_path, capsys):
    from eval.cli import main

    binding_dir, run = setup
    sets = [str(binding_dir / kind) for kind in binding.KINDS]
    assert main(["--checkpoint", str(run), "--dataset", *sets, "--output", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "### image_caption_selection" in table and "wds/binding" in table
    results = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {
        f"{k}_image_caption_selection.json" for k in (*binding.KINDS, "binding")
    }
    kinds = [results[f"{k}_image_caption_selection.json"]["metrics"]["acc"] for k in binding.KINDS]
    overall = results["binding_image_caption_selection.json"]
    assert overall["metrics"]["acc"] == pytest.approx(sum(kinds) / 3)
    assert main(["report", str(run), "--dataset", *sets, "--output", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("image-caption selection examples") == 3 and "wds/binding" in report


def test_set_mistakes_are_one_line_usage_errors(tmp_path, capsys):
    from eval.cli import main

    model = fake_model(one_hot([0, 1], 2), one_hot([0, 1], 2), ["a", "b"])
    single = write_eval_set(tmp_path / "single", [(0, ["a"]), (1, ["b", "a"])], kind="retrieval")
    (single / "task.txt").write_text("image_caption_selection\n")
    with pytest.raises(UsageError, match="item 000000 has 1 caption"):
        evaluate(model, open_eval_set(single), "auto", EvalOptions(workers=0))
    (single / "task.txt").write_text("sugar\n")
    with pytest.raises(UsageError, match="task 'sugar' is not supported"):
        open_eval_set(single)
    classification = write_eval_set(tmp_path / "cls", [(0, 0)], classnames=["a"])
    with pytest.raises(UsageError, match="needs a image_caption_selection set"):
        evaluate(model, open_eval_set(classification), "image_caption_selection", EvalOptions())
    code = main(["--checkpoint", str(tmp_path), "--dataset", str(single)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "task.txt" in err


def test_overall_is_per_directory_of_at_least_two_sets():
    from eval.results import EvalResult

    def result(root, acc):
        return EvalResult("x", "image_caption_selection", {"acc": acc, "text_acc": acc,
                          "image_acc": 1.0}, {"dataset_root": root})  # fmt: skip

    results = [result("a/one", 0.5), result("a/two", 1.0), result("b/one", 0.2)]
    (overall,) = overall_results(results)
    assert overall.dataset == "wds/a" and overall.metrics["acc"] == 0.75
    assert overall.details["mean_of"] == {"one": 0.5, "two": 1.0}
