"""User mistakes give one line naming the path or key and what to do, exit code 2."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
from evalkit import demo_eval_sets, tiny_run, write_checkpoint, write_eval_set

from eval.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run(tmp_path_factory), demo_eval_sets(tmp_path_factory)


@pytest.fixture
def fails(capsys):
    """Run vlp-eval; assert exit 2 and a one-line error; return that line."""

    def run(*args) -> str:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("vlp-eval: error: "), err
        return err

    return run


def copy_set(source, target):
    shutil.copytree(source, target)
    return target


def test_missing_dataset_directory(inputs, fails, tmp_path):
    run_dir, _ = inputs
    err = fails("--checkpoint", run_dir, "--dataset", tmp_path / "nope")
    assert f"{tmp_path / 'nope'}: no such dataset directory" in err


def test_missing_nshards_and_empty_splits(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    shapes = copy_set(eval_dir / "shapes", tmp_path / "shapes")
    (shapes / "test" / "nshards.txt").unlink()
    err = fails("--checkpoint", run_dir, "--dataset", shapes)
    assert "test/nshards.txt: missing" in err and "vlp-shard eval-set" in err
    (shapes / "test" / "nshards.txt").write_text("0\n")
    assert "empty split" in fails("--checkpoint", run_dir, "--dataset", shapes)
    # a shard without samples
    (shapes / "test" / "nshards.txt").write_text("1\n")
    tarfile.open(shapes / "test" / "0.tar", "w").close()
    err = fails("--checkpoint", run_dir, "--dataset", shapes, "--workers", 0)
    assert "empty split (no samples in the shards)" in err


def test_missing_classnames_and_templates_without_placeholder(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    shapes = copy_set(eval_dir / "shapes", tmp_path / "shapes")
    (shapes / "classnames.txt").unlink()
    err = fails("--checkpoint", run_dir, "--dataset", shapes)
    assert "classnames.txt: missing" in err and "one class name per line" in err
    (shapes / "classnames.txt").write_text("a\nb\n")
    (shapes / "zeroshot_classification_templates.txt").write_text("a photo of a cat\n")
    assert "has no {c} placeholder" in fails("--checkpoint", run_dir, "--dataset", shapes)


def test_samples_of_the_wrong_kind_name_the_key_and_members(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    shapes = copy_set(eval_dir / "shapes", tmp_path / "shapes")
    (shapes / "dataset_type.txt").write_text("retrieval\n")
    err = fails("--checkpoint", run_dir, "--dataset", shapes, "--workers", 2)
    assert "0.tar: sample 000000000: no .txt captions (found .cls .jpg)" in err


def test_checkpoint_that_does_not_match_model(inputs, fails):
    run_dir, eval_dir = inputs
    weights = run_dir / "checkpoints" / "step_000000100" / "model.safetensors"
    err = fails("--checkpoint", weights, "--model", "vlp-small-clip",
                "--dataset", eval_dir / "shapes")  # fmt: skip
    assert f"{weights} does not fit model 'vlp-small-clip'" in err
    assert "tensors of other shapes" in err and "pass the --model" in err


def test_not_a_weights_file(inputs, fails, tmp_path):
    _, eval_dir = inputs
    fake = tmp_path / "model.safetensors"
    fake.write_text("not weights")
    err = fails("--checkpoint", fake, "--model", "vlp-tiny-clip", "--dataset", eval_dir / "shapes")
    assert "not a weights file open_clip can read" in err


def test_unknown_model_name_lists_close_matches(inputs, fails):
    run_dir, eval_dir = inputs
    err = fails("--checkpoint", run_dir, "--model", "vlp-tiny-clp",
                "--dataset", eval_dir / "shapes")  # fmt: skip
    assert "unknown model 'vlp-tiny-clp'" in err and "vlp-tiny-clip" in err


def test_run_dir_without_a_complete_checkpoint(inputs, fails, tmp_path):
    _, eval_dir = inputs
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".step_000000100").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000000200").mkdir()  # no meta.json
    err = fails("--checkpoint", run_dir, "--dataset", eval_dir / "shapes")
    assert "no complete checkpoint" in err and str(run_dir / "checkpoints") in err
    err = fails("--checkpoint", run_dir / "checkpoints" / "step_000000200",
                "--dataset", eval_dir / "shapes")  # fmt: skip
    assert "no meta.json" in err


def test_weights_file_needs_model_and_meta_needs_a_name(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    weights = run_dir / "checkpoints" / "step_000000100" / "model.safetensors"
    assert "pass --model NAME" in fails("--checkpoint", weights, "--dataset", eval_dir / "shapes")
    directory = write_checkpoint(tmp_path / "step_000000001", "vlp-tiny-clip", 1)
    (directory / "meta.json").write_text('{"step": 1}')
    err = fails("--checkpoint", directory, "--dataset", eval_dir / "shapes")
    assert "meta.json: no config.model.name" in err


def test_task_that_does_not_fit_the_set_and_output_for_several_results(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    err = fails("--checkpoint", run_dir, "--dataset", eval_dir / "shapes",
                "--task", "zeroshot_retrieval")  # fmt: skip
    assert "needs a retrieval set" in err and "dataset_type.txt says classification" in err
    err = fails("--checkpoint", run_dir, "--dataset", eval_dir / "shapes", eval_dir / "retrieval",
                "--output", tmp_path / "one.json")  # fmt: skip
    assert "2 results need one file each" in err


def test_bad_images_are_reported_not_skipped(inputs, fails, tmp_path):
    run_dir, _ = inputs
    root = write_eval_set(tmp_path / "broken", [(0, 0), (1, 1)], "classification", ["a", "b"])
    with tarfile.open(root / "test" / "0.tar", "a") as tar:
        info = tarfile.TarInfo("000009.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"oops"))
        info = tarfile.TarInfo("000009.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))
    err = fails("--checkpoint", run_dir, "--dataset", root, "--workers", 0)
    assert "sample 000009: cannot decode the png image" in err


def test_report_needs_something_to_report(fails, tmp_path):
    (tmp_path / "run").mkdir()
    err = fails("report", tmp_path / "run")
    assert "metrics.jsonl: missing, and no --dataset given" in err


def test_a_shorter_shard_than_sizes_json_records(inputs, fails, tmp_path):
    run_dir, eval_dir = inputs
    shapes = copy_set(eval_dir / "shapes", tmp_path / "shapes")
    shard = shapes / "test" / "0.tar"
    with tarfile.open(eval_dir / "shapes" / "test" / "0.tar") as source:
        members = [(m, source.extractfile(m).read()) for m in source][:20]  # 10 samples
    with tarfile.open(shard, "w") as target:
        for member, data in members:
            target.addfile(member, io.BytesIO(data))
    err = fails("--checkpoint", run_dir, "--dataset", shapes, "--workers", 0)
    assert "read 10 samples but sizes.json says 40" in err
