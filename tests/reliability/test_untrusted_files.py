"""Untrusted files: a pickle payload in a weights file or checkpoint never runs, and tar members
named with absolute paths or `..` are never written outside an output directory."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from data_tools.verify import verify
from eval.cli import main as eval_main
from tests.conftest import NO_DEMO_EVAL
from tests.reliability.faults import (
    PAYLOAD_MARKER,
    Payload,
    demo_shards,
    pickle_payload,
    traversal_tar,
)
from vlp.train import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    return demo_shards(root, num_samples=60, per_shard=15), root / "eval" / "shapes"


def _train(shards: str, run_dir: Path, *extra: str) -> int:
    return train_main(["--config", "configs/coca_demo.yaml", f"data.train_shards={shards}",
                       f"run.output_dir={run_dir}", "model.name=vlp-tiny-clip",
                       "objectives.caption.weight=0", "data.batch_size=4", "data.workers=0",
                       "data.shuffle_buffer=15", "train.steps=1", "run.trackers=[]",
                       *NO_DEMO_EVAL,
                       *extra])  # fmt: skip


def _one_error(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_eval_refuses_a_pickled_weights_file(demo, tmp_path, capsys):
    marker = tmp_path / PAYLOAD_MARKER
    evil = pickle_payload(tmp_path / "evil.pt", marker)
    code = eval_main(["--checkpoint", str(evil), "--model", "vlp-tiny-clip",
                      "--dataset", str(demo[1])])  # fmt: skip
    line = _one_error(capsys.readouterr().err, "vlp-eval")
    assert code == 2 and str(evil) in line and not marker.exists()


def test_train_refuses_a_pickled_pretrained_file(demo, tmp_path, capsys):
    marker = tmp_path / PAYLOAD_MARKER
    evil = pickle_payload(tmp_path / "evil.pt", marker)
    code = _train(demo[0], tmp_path / "run", f"model.pretrained={evil}")
    line = _one_error(capsys.readouterr().err, "vlp-train")
    assert code == 2 and "model.pretrained" in line and not marker.exists()


@pytest.mark.parametrize("member", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_refuses_a_checkpoint_carrying_a_pickle(demo, tmp_path, capsys, member):
    run_dir, marker = tmp_path / "run", tmp_path / PAYLOAD_MARKER
    assert _train(demo[0], run_dir) == 0
    state = run_dir / "checkpoints" / "step_000000001" / "state"
    if member.endswith(".pkl"):
        (state / member).write_bytes(pickle.dumps(Payload(marker)))
    else:
        pickle_payload(state / member, marker)
    capsys.readouterr()
    code = _train(demo[0], run_dir, "train.steps=2", "resume=latest")
    line = _one_error(capsys.readouterr().err, "vlp-train")
    assert code == 2 and member in line and not marker.exists()


def test_traversing_member_names_stay_inside_every_output(demo, tmp_path, capsys, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    shards = tmp_path / "in"
    shards.mkdir()
    targets = traversal_tar(shards / "00000.tar", outside)
    for index in (1, 2):  # more shards: training needs one per data worker
        shutil.copy(shards / "00000.tar", shards / f"0000{index}.tar")
    pattern = str(shards / "{00000..00002}.tar")
    assert verify(pattern).good == 6
    code, _, err = cli("reshard", pattern, tmp_path / "re", "--image-size", "32")
    assert code == 0, err
    assert _train(pattern, tmp_path / "run", "data.shuffle_buffer=2") == 0
    eval_set = tmp_path / "eval_set"
    shutil.copytree(demo[1], eval_set)
    _rename_members(eval_set / "test" / "0.tar", f"../../../../../../../..{outside}/")
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(tmp_path / "run"), "--dataset", str(eval_set),
                      "--output", str(tmp_path / "eval.json")]) == 0  # fmt: skip
    assert not any(t.exists() for t in targets) and list(outside.iterdir()) == []


def _rename_members(path: Path, prefix: str) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.name = prefix + member.name
            tar.addfile(member, io.BytesIO(data))
