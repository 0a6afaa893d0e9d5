"""`vlp-eval` end to end on a tiny vlp-tiny-clip checkpoint and the demo eval sets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from evalkit import REPO, demo_eval_sets, tiny_run, write_checkpoint

from eval.checkpoints import latest_checkpoint, resolve_checkpoint
from eval.cli import build_parser, main
from eval.models import EvalModel, load_model
from vlp.runlayout import CHECKPOINT_DIR, checkpoint_step, complete_checkpoints


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run(tmp_path_factory), demo_eval_sets(tmp_path_factory)


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_dir_on_both_demo_sets_writes_clip_benchmark_json(inputs, capsys, tmp_path):
    run_dir, eval_dir = inputs
    code, out, err = run(capsys, "--checkpoint", run_dir, "--dataset", eval_dir / "shapes",
                         eval_dir / "retrieval", "--output", f"{tmp_path}/", "--batch-size", 16,
                         "--workers", 0)  # fmt: skip
    assert code == 0, err
    assert "### zeroshot_classification" in out and "| image_retrieval_recall@1 |" in out
    assert "step 100" in out
    shapes = json.loads((tmp_path / "shapes_zeroshot_classification.json").read_text())
    weights = run_dir / "checkpoints" / "step_000000100" / "model.safetensors"
    assert shapes["dataset"] == "wds/shapes" and shapes["model"] == "vlp-tiny-clip"
    assert shapes["pretrained"] == str(weights) and shapes["language"] == "en"
    assert set(shapes["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert shapes["details"]["step"] == 100 and len(shapes["details"]["per_class_recall"]) == 8
    retrieval = json.loads((tmp_path / "retrieval_zeroshot_retrieval.json").read_text())
    assert retrieval["task"] == "zeroshot_retrieval"
    assert {"image_retrieval_recall@10", "text_retrieval_recall@1", "gap"} <= set(
        retrieval["metrics"]
    )
    assert all(isinstance(v, float) for v in retrieval["metrics"].values())


def test_weights_file_with_model_and_geometry_task(inputs, capsys, tmp_path):
    run_dir, eval_dir = inputs
    weights = run_dir / "checkpoints" / "step_000000100" / "model.safetensors"
    output = tmp_path / "geometry.json"
    code, out, err = run(capsys, "--checkpoint", weights, "--model", "vlp-tiny-clip",
                         "--dataset", eval_dir / "retrieval", "--task", "geometry",
                         "--output", output, "--workers", 0)  # fmt: skip
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["task"] == "geometry" and 0 <= result["metrics"]["gap"] <= 2
    assert "image_retrieval_recall@1" not in result["metrics"]


def test_latest_checkpoint_ignores_unfinished_ones(tmp_path):
    run_dir = tmp_path / "run"
    for step in (100, 300):
        write_checkpoint(run_dir / "checkpoints" / f"step_{step:09d}", "vlp-tiny-clip", step)
    (run_dir / "checkpoints" / ".step_000000400").mkdir()  # being written
    (run_dir / "checkpoints" / "step_000000500").mkdir()  # no meta.json yet
    found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
    assert [checkpoint_step(p) for p in found] == [100, 300]
    assert latest_checkpoint(run_dir).name == "step_000000300"
    for path in (run_dir, run_dir / "checkpoints"):
        ref = resolve_checkpoint(path)
        assert ref.step == 300 and ref.model_name == "vlp-tiny-clip" and ref.run_dir == run_dir
    ref = resolve_checkpoint(run_dir / "checkpoints" / "step_000000100", "vlp-tiny-clip")
    assert ref.step == 100 and ref.weights.name == "model.safetensors"


def test_loaded_weights_and_trimmed_text_match_open_clip(tmp_path):
    import open_clip

    directory = write_checkpoint(tmp_path / "step_000000007", "vlp-tiny-clip", 7, seed=3)
    model = load_model(resolve_checkpoint(directory), "cpu")
    torch.manual_seed(3)
    reference = open_clip.create_model("vlp-tiny-clip").eval()
    tokens = model.tokenizer(["a red circle", "a much longer caption " * 3, "x"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
    # EvalModel cuts the padding after the longest caption; the result must not change
    torch.testing.assert_close(model.encode_tokens(tokens), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(model, EvalModel) and model.step == 7


def test_python_dash_m_eval_reports_a_usage_error_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "eval", "--checkpoint", tmp_path / "nowhere", "--dataset",
         tmp_path / "missing"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "missing: no such dataset directory" in result.stderr


def test_acc5_nan_is_written_as_clip_benchmark_writes_it(tmp_path, capsys):
    from evalkit import write_eval_set

    root = write_eval_set(tmp_path / "three", [(i, i % 3) for i in range(6)], "classification",
                          ["cat", "dog", "bird"])  # fmt: skip
    directory = write_checkpoint(tmp_path / "ckpt", "vlp-tiny-clip", 1)
    output = tmp_path / "out.json"
    code, _, err = run(capsys, "--checkpoint", directory, "--dataset", root, "--output", output,
                       "--workers", 0)  # fmt: skip
    assert code == 0, err
    assert '"acc5": NaN' in output.read_text()
    assert math.isnan(json.loads(output.read_text())["metrics"]["acc5"])


def test_a_coca_checkpoint_evaluates_too(inputs, capsys, tmp_path):
    _, eval_dir = inputs
    directory = write_checkpoint(tmp_path / "step_000000002", "vlp-tiny-coca", 2)
    code, out, err = run(capsys, "--checkpoint", directory, "--dataset", eval_dir / "shapes",
                         eval_dir / "retrieval", "--workers", 0)  # fmt: skip
    assert code == 0, err
    assert "vlp-tiny-coca" in out and "| text_retrieval_recall@10 |" in out


def test_cli_choices_follow_the_registries():
    from eval.cli import TASK_CHOICES
    from eval.retrieval import METHODS
    from eval.tasks import AUTO, TASKS

    assert set(TASK_CHOICES) == {AUTO, *TASKS}
    retrieval_action = next(a for a in build_parser()._actions if a.dest == "retrieval_method")
    assert tuple(retrieval_action.choices) == METHODS


def test_decoding_workers_default_to_the_cores_the_process_may_use(monkeypatch):
    from eval import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    args = build_parser().parse_args(["--checkpoint", "x", "--dataset", "d"])
    assert cli._options(args).workers == 3
    args = build_parser().parse_args(["--checkpoint", "x", "--dataset", "d", "--workers", "0"])
    assert cli._options(args).workers == 0
