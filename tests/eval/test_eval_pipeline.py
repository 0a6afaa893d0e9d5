"""Eval sets -> evaluators -> JSON, with a fake model whose embeddings make every answer known."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from evalkit import fake_model, one_hot, write_eval_set

from eval.datasets import open_eval_set
from eval.encode import encode_images
from eval.options import EvalOptions
from eval.results import EvalResult, markdown_tables, output_paths, write_result
from eval.tasks import evaluate

CLASSES = ("cat", "dog", "bird")
TEMPLATES = ("a {c}.", "the {c}.")
PROMPTS = [t.replace("{c}", c) for c in CLASSES for t in TEMPLATES]


def classification_model(predicted_class: list[int]):
    """Image id i embeds as class predicted_class[i]'s direction; prompts of class c as e_c."""
    texts = one_hot([PROMPTS.index(p) // len(TEMPLATES) for p in PROMPTS], 4)
    return fake_model(one_hot(predicted_class, 4), texts, PROMPTS)


@pytest.mark.parametrize("workers, num_shards", [(0, 1), (2, 3)])
def test_classification_exactly_right_with_fewer_than_5_classes(tmp_path, workers, num_shards):
    labels = [i % 3 for i in range(9)]
    root = write_eval_set(tmp_path / "pets", list(enumerate(labels)), "classification",
                          CLASSES, TEMPLATES, num_shards)  # fmt: skip
    model = classification_model(labels)
    result = evaluate(model, open_eval_set(root), "auto", EvalOptions(workers=workers))
    assert result.task == "zeroshot_classification" and result.dataset == "wds/pets"
    assert result.metrics["acc1"] == 1.0 and result.metrics["mean_per_class_recall"] == 1.0
    assert math.isnan(result.metrics["acc5"])  # 3 classes
    assert result.details["per_class_samples"] == {"cat": 3, "dog": 3, "bird": 3}


def test_mean_per_class_recall_on_an_imbalanced_set(tmp_path):
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 0, 0, 0, 0, 1, 0, 2]  # one dog taken for a cat
    root = write_eval_set(tmp_path / "pets", list(enumerate(labels)), "classification",
                          CLASSES, TEMPLATES)  # fmt: skip
    result = evaluate(classification_model(predicted), open_eval_set(root), "auto", EvalOptions())
    assert result.metrics["acc1"] == pytest.approx(8 / 9)
    assert result.metrics["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result.details["per_class_recall"] == {"cat": 1.0, "dog": 0.5, "bird": 1.0}


def test_images_come_back_in_set_order_whatever_the_workers(tmp_path):
    root = write_eval_set(tmp_path / "pets", [(i % 12, 0) for i in range(30)], "classification",
                          CLASSES, TEMPLATES, num_shards=4)  # fmt: skip
    model = classification_model([0] * 12)
    dataset = open_eval_set(root)
    one = encode_images(model, dataset, batch_size=4, workers=0)
    two = encode_images(model, dataset, batch_size=4, workers=2)
    assert one.keys == sorted(one.keys) == two.keys
    assert torch.equal(one.embeddings, two.embeddings)


def retrieval_set(tmp_path):
    """Images 0-5; each has a right caption ("right i") and one pointing nowhere ("lost i");
    image 5 has a second right caption."""
    captions = [[f"right {i}", f"lost {i}"] for i in range(6)]
    captions[5].append("right 5 again")
    root = write_eval_set(tmp_path / "pairs", list(enumerate(captions)), "retrieval")
    vocabulary = [c for image in captions for c in image]
    texts = torch.stack(
        [
            F.normalize(torch.eye(8)[6] + torch.eye(8)[7], dim=0)  # orthogonal to every image
            if text.startswith("lost")
            else torch.eye(8)[int(text.split()[1])]
            for text in vocabulary
        ]
    )
    return root, fake_model(torch.eye(8)[:6], texts, vocabulary)


def test_retrieval_with_several_captions_per_image(tmp_path):
    root, model = retrieval_set(tmp_path)
    result = evaluate(model, open_eval_set(root), "auto", EvalOptions())
    metrics = result.metrics
    assert result.task == "zeroshot_retrieval"
    # image→text: every image's right caption is its best match
    assert metrics["text_retrieval_recall@1"] == 1.0
    # text→image: 7 right captions hit; a lost caption ties its image with all 5 others,
    # and ties count against: rank 5, a miss at k = 1 and 5, a hit at 10
    assert metrics["image_retrieval_recall@1"] == pytest.approx(7 / 13)
    assert metrics["image_retrieval_recall@5"] == pytest.approx(7 / 13)
    assert metrics["image_retrieval_recall@10"] == 1.0
    # geometry pairs each image with its first caption, here identical to it
    assert metrics["gap"] == pytest.approx(0, abs=1e-7)
    assert metrics["alignment"] == pytest.approx(0, abs=1e-7)
    assert metrics["linear_separability"] == 0.5
    assert result.details["num_captions"] == 13


def test_geometry_task_alone_and_faiss_method_agree(tmp_path):
    root, model = retrieval_set(tmp_path)
    dataset = open_eval_set(root)
    geometry = evaluate(model, dataset, "geometry", EvalOptions())
    retrieval = evaluate(model, dataset, "zeroshot_retrieval", EvalOptions())
    assert geometry.task == "geometry"
    assert geometry.metrics == {k: retrieval.metrics[k] for k in geometry.metrics}
    with_faiss = evaluate(model, dataset, "auto", EvalOptions(retrieval_method="faiss"))
    assert with_faiss.metrics["text_retrieval_recall@1"] == 1.0
    assert with_faiss.details["retrieval_method"] == "faiss"


def test_results_merge_with_clip_benchmark_build(tmp_path):
    from clip_benchmark.cli import main_build

    ours = EvalResult("wds/shapes", "zeroshot_classification",
                      {"acc1": 0.5, "acc5": math.nan, "mean_per_class_recall": 0.5},
                      {"per_class_recall": {"cat": 0.5}})  # fmt: skip
    write_result(tmp_path / "results" / "ours.json", ours, "vlp-tiny-clip", "w.safetensors")
    theirs = {
        "dataset": "wds/shapes", "model": "vlp-tiny-clip", "pretrained": "w.safetensors",
        "task": "zeroshot_classification", "language": "en",
        "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.5},
    }  # fmt: skip
    (tmp_path / "results" / "theirs.json").write_text(json.dumps(theirs))
    main_build(
        argparse.Namespace(files=[str(tmp_path / "results")], output=str(tmp_path / "b.csv"))
    )
    with (tmp_path / "b.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert {row["model_fullname"] for row in rows} == {"vlp-tiny-clip w.safetensors"}
    assert {row["acc1"] for row in rows} == {"0.5"}
    assert json.loads((tmp_path / "results" / "ours.json").read_text())["metrics"]["acc1"] == 0.5


def test_output_paths_templates_directories_and_single_files(tmp_path):
    planned = [("wds/shapes", "zeroshot_classification"), ("wds/pairs", "zeroshot_retrieval")]
    paths = output_paths(f"{tmp_path}/", planned, "m", "dir/w.safetensors")
    assert [p.name for p in paths] == [
        "shapes_zeroshot_classification.json",
        "pairs_zeroshot_retrieval.json",
    ]
    template = f"{tmp_path}/{{model}}_{{pretrained}}_{{dataset}}_{{task}}.json"
    assert output_paths(template, planned[:1], "m", "dir/w.safetensors")[0].name == (
        "m_w.safetensors_shapes_zeroshot_classification.json"
    )
    assert output_paths(f"{tmp_path}/one.json", planned[:1], "m", "w") == [tmp_path / "one.json"]
    # a path without a file suffix is a directory, existing or not (make demo's runs/demo/eval)
    in_directory = output_paths(str(tmp_path / "runs" / "eval"), planned, "m", "w")
    assert in_directory[0] == tmp_path / "runs" / "eval" / "shapes_zeroshot_classification.json"


def test_markdown_tables_one_per_task():
    results = [
        EvalResult("wds/a", "zeroshot_classification", {"acc1": 0.5, "acc5": math.nan}),
        EvalResult("wds/b", "zeroshot_classification", {"acc1": 0.25, "acc5": 1.0}),
    ]
    text = markdown_tables(results)
    assert "| metric | wds/a | wds/b |" in text
    assert "| acc5 | n/a | 1.0000 |" in text
