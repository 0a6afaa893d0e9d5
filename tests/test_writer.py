"""Shard writing: atomic, byte-reproducible, resumable after SIGKILL, splittable across nodes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, shard_bytes
from vlp.data.shards import index_tar

DEMO = ("--image-size", "32", "--eval-samples", "20")


def _demo(cli, out: Path, *extra: str, num: int = 120, per_shard: int = 25):
    code, stdout, stderr = cli(
        "demo", out, "--num-samples", num, "--samples-per-shard", per_shard, *DEMO, *extra
    )
    assert code == 0, stderr
    return stdout


def test_rerun_is_byte_identical_and_workers_do_not_change_bytes(tmp_path, cli):
    _demo(cli, tmp_path / "a")
    _demo(cli, tmp_path / "b", "--workers", "2")
    a, b = shard_bytes(tmp_path / "a" / "train"), shard_bytes(tmp_path / "b" / "train")
    assert len(a) == 5 and a == b
    assert shard_bytes(tmp_path / "a/eval/shapes/test") == shard_bytes(
        tmp_path / "b/eval/shapes/test"
    )
    sizes = json.loads((tmp_path / "a" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 120


def test_rerun_resumes_without_rewriting(tmp_path, cli):
    _demo(cli, tmp_path)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "train").glob("*.tar")}
    out = _demo(cli, tmp_path)
    assert "wrote 0 samples in 0 shards (5 already complete)" in out
    assert {p: p.stat().st_mtime_ns for p in first} == first


def test_changed_options_need_overwrite(tmp_path, cli):
    _demo(cli, tmp_path)
    code, _, err = cli(
        "demo",
        tmp_path,
        "--num-samples",
        120,
        "--samples-per-shard",
        25,
        "--image-size",
        "48",
        "--eval-samples",
        "20",
    )
    assert code == 2 and "different" in err and "--overwrite" in err
    _demo(cli, tmp_path, "--overwrite", num=60)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]


def test_multi_node_partition_equals_single_node(tmp_path, cli):
    _demo(cli, tmp_path / "single")
    out = _demo(cli, tmp_path / "multi", "--num-nodes", "2", "--node-rank", "1")
    assert "sizes.json is written when all 5 shards are" in out
    written = sorted(p.name for p in (tmp_path / "multi" / "train").glob("*.tar"))
    assert written == ["00001.tar", "00003.tar"]
    assert not (tmp_path / "multi" / "train" / "sizes.json").exists()
    _demo(cli, tmp_path / "multi", "--num-nodes", "2", "--node-rank", "0")
    single, multi = tmp_path / "single" / "train", tmp_path / "multi" / "train"
    assert shard_bytes(single) == shard_bytes(multi)
    assert (single / "sizes.json").read_bytes() == (multi / "sizes.json").read_bytes()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_identical_shards(tmp_path, cli):
    args = ["demo", "--num-samples", "4000", "--samples-per-shard", "100", *DEMO]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "data_tools", args[0], str(killed), *args[1:]],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list((killed / "train").glob("*_stats.json"))) < 3:
        assert process.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    visible = sorted((killed / "train").glob("*.tar"))
    assert 3 <= len(visible) < 40
    for shard in visible:  # no partial shard is visible: every one is a complete tar
        index = index_tar(shard)
        assert len(index.samples) == 100 and index.problem is None
    assert not (killed / "train" / "sizes.json").exists()
    assert cli(*args[:1], killed, *args[1:])[0] == 0
    assert not list((killed / "train").glob(".*tmp*"))
    assert cli(*args[:1], tmp_path / "clean", *args[1:])[0] == 0
    assert shard_bytes(killed / "train") == shard_bytes(tmp_path / "clean" / "train")
    assert len(shard_bytes(killed / "train")) == 40


def test_interrupted_overwrite_never_counts_shards_of_the_old_settings(tmp_path, cli):
    """Stats left by other settings do not mark a shard done, so a rerun rebuilds it."""
    _demo(cli, tmp_path / "out", "--seed", "0")
    # an --overwrite with new settings that stopped after its first shard
    _demo(cli, tmp_path / "out", "--seed", "1", "--overwrite", "--num-nodes", "5")
    out = _demo(cli, tmp_path / "out", "--seed", "1")
    assert "wrote 95 samples in 4 shards (1 already complete)" in out
    _demo(cli, tmp_path / "fresh", "--seed", "1")
    assert shard_bytes(tmp_path / "out" / "train") == shard_bytes(tmp_path / "fresh" / "train")
