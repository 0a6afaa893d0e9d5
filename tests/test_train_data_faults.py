"""Corrupt shards train to completion, and every skip is counted under its reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torchvision.transforms as T
from PIL import Image

from tests.conftest import NO_DEMO_EVAL
from vlp.data.pipeline import BadSample as PipelineBadSample
from vlp.data.pipeline import Cursor, Position, SampleDecoder, StreamSpec, pooled_items

REPO = Path(__file__).resolve().parents[1]
INJECTED = {"undecodable_image": 3, "missing_caption": 2, "non_utf8_caption": 2, "truncated_tar": 1}
GOOD = 25 + 32 + 19  # shard 0 minus its 7 bad samples, shard 1, shard 2 before its cut minus 1
POOL = 80  # one pool = the three shards = one pass (a larger pool would span several epochs)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _write(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for extension, data in sorted(sample.items()):
                if extension == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _make_shards(root: Path) -> str:
    shards = []
    for shard in range(3):
        samples = [
            {
                "__key__": f"{shard}_{i:03d}",
                "jpg": _jpeg(shard * 100 + i),
                "txt": f"a picture number {i}".encode(),
            }
            for i in range(32)
        ]
        shards.append(samples)
    for i in (3, 9, 20):
        shards[0][i]["jpg"] = bytes(np.random.default_rng(i).integers(0, 256, 500, dtype=np.uint8))
    for i in (5, 11):
        del shards[0][i]["txt"]
    shards[0][7]["txt"] = b"caf\xe9"
    shards[0][30]["txt"] = b"\xff\xfe\x00bad"
    for i, samples in enumerate(shards):
        _write(root / f"{i}.tar", samples)
    last = root / "2.tar"
    with tarfile.open(last) as tar:
        cut = next(m for m in tar if m.name == "2_020.jpg").offset_data + 100
    last.write_bytes(last.read_bytes()[:cut])  # samples 0..19 readable; 19 dropped as the edge
    return str(root / "{0..2}.tar")


def _decoder() -> SampleDecoder:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return SampleDecoder(T.ToTensor(), tokenizer, ("jpg",), "txt", "raw", "raw")


def _tally(spec: StreamSpec, count: int) -> Counter:
    """Reasons of the first `count` items the worker's stream yields, decoded independently."""
    tally, decode = Counter(), _decoder()
    for position, (sample, _) in enumerate(pooled_items(spec, 0, 0, Cursor())):
        if position == count:
            return tally
        if not isinstance(sample, dict):
            tally[sample.value] += 1
            continue
        try:
            decode(sample)
            tally["good"] += 1
        except PipelineBadSample as bad:
            tally[bad.reason.value] += 1
    return tally


def test_a_full_pass_finds_exactly_the_injected_faults(tmp_path):
    urls = [str(tmp_path / f"{i}.tar") for i in range(3)]
    _make_shards(tmp_path)
    spec = StreamSpec([urls], [1.0], "epoch", 0, POOL, 4, 1, 0, 1)
    tally = _tally(spec, 1 + GOOD + 7)  # one pass: the pool's shard problem, then every sample
    assert tally == Counter({**INJECTED, "good": GOOD})


@pytest.mark.slow
def test_training_on_corrupt_shards_completes_and_counts_every_skip(tmp_path):
    pattern = _make_shards(tmp_path)
    run_dir, steps = tmp_path / "run", GOOD // 4
    result = subprocess.run(
        [
            sys.executable,
            "vlp/train.py",
            "--config",
            "configs/coca_demo.yaml",
            f"data.train_shards={pattern}",
            f"run.output_dir={run_dir}",
            "model.name=vlp-tiny-clip",
            "objectives.caption.weight=0",
            "data.batch_size=4",
            "data.workers=0",
            f"data.shuffle_buffer={POOL}",
            f"train.steps={steps}",
            "train.log_every_steps=5",
            f"checkpoint.every_steps={steps}",
            *NO_DEMO_EVAL,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((run_dir / "checkpoints" / f"step_{steps:09d}" / "meta.json").read_text())
    position = Position.from_dict(meta["data"]["positions"][0]["0"])
    spec = StreamSpec(
        [[str(tmp_path / f"{i}.tar") for i in range(3)]], [1.0], "epoch", 0, POOL, 4, 1, 0, 1
    )
    expected = _tally(spec, position.cursors[0].item)  # items count the shard problem too
    assert expected.pop("good") == steps * 4
    assert meta["skipped"] == dict(expected)
    assert set(expected) <= set(INJECTED) and expected["truncated_tar"] == 1
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["data/skipped/truncated_tar"] == 1
