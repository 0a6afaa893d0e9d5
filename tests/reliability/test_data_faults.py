"""Every kind of bad sample, injected at known places: training completes and counts each skip
under its reason, and the sharder and `vlp-shard verify` report the same counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_tools.verify import verify
from tests.conftest import NO_DEMO_EVAL
from tests.reliability.faults import (
    TRAIN_REASON,
    VERIFY_REASON,
    FaultySet,
    faulty_shards,
    train_one_pass,
)
from vlp.train import main

BATCH = 7


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> FaultySet:
    return faulty_shards(tmp_path_factory.mktemp("faulty"), per_kind=1, shards=6, per_shard=21)


def _stats(directory: Path) -> Counter:
    total = Counter()
    for path in directory.glob("*_stats.json"):
        total.update(json.loads(path.read_text())["errors"])
    return total


def test_verify_and_reshard_count_every_injected_fault(faulty, tmp_path, cli):
    report = verify(faulty.pattern)
    assert report.errors == faulty.expected(VERIFY_REASON)
    assert report.good == faulty.good
    code, out, err = cli("reshard", faulty.pattern, tmp_path / "re", "--image-size", "32",
                         "--samples-per-shard", "50")  # fmt: skip
    assert code == 0, err
    train = tmp_path / "re" / "train"
    assert _stats(train) == faulty.expected(TRAIN_REASON)
    # duplicate keys are no skip (both samples are written, re-keyed) but both tools count them
    manifest = json.loads((train / "manifest.json").read_text())
    duplicates = faulty.injected["duplicate_key"]
    assert manifest["source"]["duplicate_keys"] == report.errors["duplicate_key"] == duplicates
    assert f"{duplicates} input sample" in out and "repeated a key already seen" in out
    assert sum(json.loads((train / "sizes.json").read_text()).values()) == faulty.good
    clean = verify(str(train / "{00000..00002}.tar"))
    assert clean.ok and clean.good == faulty.good


def test_training_completes_and_counts_every_skip_by_reason(faulty, tmp_path):
    report = train_one_pass(faulty, tmp_path / "run", BATCH)
    assert report.exit_code == 0 and report.lost == 0, report
    assert report.skipped == report.expected, report
    # the pass's items after the run's position are faults only, and with those the pass
    # held exactly the injected faults
    assert all(TRAIN_REASON.get(kind) for kind in report.left), report.left
    rest = Counter({TRAIN_REASON[k]: n for k, n in report.left.items()})
    assert report.skipped + rest == faulty.expected(TRAIN_REASON)


def test_wrong_member_keys_stop_after_one_whole_pool(faulty, tmp_path, capsys):
    """Every sample bad is a configuration mistake: one line naming the members found, exit 2
    (and one bad first sample alone, as in the test above, never triggers it)."""
    code = main(["--config", "configs/coca_demo.yaml", f"data.train_shards={faulty.pattern}",
                 f"run.output_dir={tmp_path}", "model.name=vlp-tiny-clip",
                 "objectives.caption.weight=0", "data.workers=0", "data.shuffle_buffer=1",
                 "data.text_key=caption", "run.trackers=[]", *NO_DEMO_EVAL])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, errors
    assert "members seen" in errors[0] and ".txt" in errors[0] and "data.text_key" in errors[0]
