"""Every kind of bad sample, injected at known places: training completes and counts each skip
under its reason, and the sharder and `vlp-shard verify` report the same counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_tools.verify import verify
from tests.reliability.faults import TRAIN_REASON, VERIFY_REASON, FaultySet, faulty_shards
from vlp.data.pipeline import Cursor, Position, StreamSpec, pooled_items
from vlp.data.shards import expand_shards
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
    assert sum(json.loads((train / "sizes.json").read_text()).values()) == faulty.good
    clean = verify(str(train / "{00000..00002}.tar"))
    assert clean.ok and clean.good == faulty.good


def _kind(item, faulty: FaultySet) -> str:
    if isinstance(item, dict):
        return faulty.kind_of.get(item["__key__"], "good")
    return {"truncated_tar": "truncated_tar", "missing_file": "missing_shard"}[item.value]


def test_training_completes_and_counts_every_skip_by_reason(faulty, tmp_path, capsys):
    """One pass with batches that use exactly the set's good samples; shuffle_buffer=1 makes a
    pass the first (samples + shard problems) items of the stream."""
    steps, run_dir = faulty.good // BATCH, tmp_path / "run"
    assert steps * BATCH == faulty.good
    code = main(["--config", "configs/demo.yaml", f"data.train_shards={faulty.pattern}",
                 f"run.output_dir={run_dir}", "model.name=vlp-tiny-clip",
                 "objectives.caption.weight=0", f"data.batch_size={BATCH}", "data.workers=0",
                 "data.shuffle_buffer=1", f"train.steps={steps}", f"checkpoint.every_steps={steps}",
                 "train.log_every_steps=100", "run.trackers=[]"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.loads((run_dir / "checkpoints" / f"step_{steps:09d}" / "meta.json").read_text())
    end = Position.from_dict(meta["data"]["positions"][0]["0"]).cursors[0]
    spec = StreamSpec([expand_shards(faulty.pattern)], [1.0], "epoch", 0, 1, BATCH, 1, 0, 1)
    seen, rest, reached = Counter(), Counter(), False
    for number, (item, cursor) in enumerate(pooled_items(spec, 0, 0, Cursor())):
        if number == faulty.pass_items:
            break
        (rest if reached else seen)[_kind(item, faulty)] += 1
        reached = reached or cursor == end
    trained = {TRAIN_REASON.get(k) for k in seen} - {None}
    assert seen["good"] + sum(n for k, n in seen.items() if k in TRAIN_REASON
                              and not TRAIN_REASON[k]) == steps * BATCH  # fmt: skip
    skipped = Counter({TRAIN_REASON[k]: n for k, n in seen.items() if TRAIN_REASON.get(k)})
    assert meta["skipped"] == dict(skipped) and trained == set(skipped)
    # nothing good was left behind in the pass, and the pass held every injected fault
    assert all(k != "good" and TRAIN_REASON.get(k) for k in rest), rest
    assert skipped + Counter({TRAIN_REASON[k]: n for k, n in rest.items()}) == faulty.expected(
        TRAIN_REASON
    )


def test_wrong_member_keys_stop_after_one_whole_pool(faulty, tmp_path, capsys):
    """Every sample bad is a configuration mistake: one line naming the members found, exit 2
    (and one bad first sample alone, as in the test above, never triggers it)."""
    code = main(["--config", "configs/demo.yaml", f"data.train_shards={faulty.pattern}",
                 f"run.output_dir={tmp_path}", "model.name=vlp-tiny-clip",
                 "objectives.caption.weight=0", "data.workers=0", "data.shuffle_buffer=1",
                 "data.text_key=caption", "run.trackers=[]"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, errors
    assert "members seen" in errors[0] and ".txt" in errors[0] and "data.text_key" in errors[0]
