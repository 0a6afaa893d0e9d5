"""`vlp-eval report`: report.md with training curves and evaluation figures."""

from __future__ import annotations

import json
import shutil

from evalkit import demo_eval_sets, tiny_run
from PIL import Image

from eval.cli import main
from eval.report.curves import eval_panels, read_metrics, training_panels


def test_report_on_a_run_with_both_demo_sets(tmp_path_factory, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run(tmp_path_factory), tmp_path / "run")
    eval_dir = demo_eval_sets(tmp_path_factory)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 70, "loss/tot')  # the loop is halfway through a line
    code = main(["report", str(run_dir), "--dataset", str(eval_dir / "shapes"),
                 str(eval_dir / "retrieval"), "--workers", "0", "--examples", "3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = run_dir / "report"
    text = (report / "report.md").read_text()
    figures = ["training.png", "eval_curves.png", "confusion_shapes.png", "gap_retrieval.png",
               "retrieval_retrieval.png"]  # fmt: skip
    for name in figures:
        assert f"]({name})" in text
        with Image.open(report / name) as image:
            assert image.format == "PNG" and min(image.size) > 300
    assert "(1 unreadable lines skipped)" in text
    assert "step 100" in text and "| acc1 |" in text and "| gap |" in text
    result = json.loads((report / "results" / "shapes_zeroshot_classification.json").read_text())
    assert result["dataset"] == "wds/shapes" and result["details"]["num_samples"] == 40
    _check_headline(text, report / "results")


def _check_headline(text: str, results_dir) -> None:
    """The first section states each headline figure, as in the result files, beside chance."""
    assert text.index("## Results at a glance") < text.index("## Training")
    shapes = json.loads((results_dir / "shapes_zeroshot_classification.json").read_text())
    retrieval = json.loads((results_dir / "retrieval_zeroshot_retrieval.json").read_text())
    acc1, chance = shapes["metrics"]["acc1"], 1 / shapes["details"]["num_classes"]
    table = f"|---|---|---:|---:|\n| wds/shapes | zero-shot acc1 | {acc1:.3f} | {chance:.3f} |\n"
    assert table in text  # the table's first row right under its header: one markdown table
    chance = 1 / retrieval["details"]["num_images"]
    for label, key in (("text→image", "image"), ("image→text", "text")):
        value = retrieval["metrics"][f"{key}_retrieval_recall@1"]
        assert f"| wds/retrieval | {label} R@1 | {value:.3f} | {chance:.3f} |" in text


def test_curves_group_training_and_eval_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 10, "loss/total": 3.0, "loss/caption": 1.0, "lr": 1e-4, "samples_per_s": 9.0,
         "tflops": 0.02, "mfu": 0.3},
        {"step": 20, "eval/shapes/acc1": 0.5, "eval/shapes/acc5": 0.9, "eval/retrieval/gap": 1.1,
         "eval/retrieval/image_retrieval_recall@1": 0.2, "eval/retrieval/uniformity": -3.1,
         "eval/retrieval/alignment": 0.9, "eval/retrieval/linear_separability": 0.7},
        ["not", "a", "record"],
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, unreadable = read_metrics(path)
    assert len(loaded) == 2 and unreadable == 1
    assert [(p.title, p.keys) for p in training_panels(loaded)] == [
        ("losses", ["loss/total", "loss/caption"]),
        ("learning rate", ["lr"]),
        ("throughput", ["samples_per_s"]),
        ("achieved TFLOP/s", ["tflops"]),
        ("MFU", ["mfu"]),
    ]
    assert [(p.title, p.keys) for p in eval_panels(loaded)] == [
        ("eval: shapes", ["eval/shapes/acc1", "eval/shapes/acc5"]),
        ("eval: retrieval", ["eval/retrieval/image_retrieval_recall@1"]),
        ("embedding geometry", ["eval/retrieval/gap", "eval/retrieval/linear_separability"]),
        ("uniformity and alignment", ["eval/retrieval/uniformity", "eval/retrieval/alignment"]),
    ]


def test_curves_only_report_without_datasets(tmp_path_factory, tmp_path, capsys):
    run_dir = tiny_run(tmp_path_factory)
    code = main(["report", str(run_dir), "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "training.png" in text and "Evaluation of" not in text
