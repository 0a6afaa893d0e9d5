"""The training stream: exact continuation from saved positions, source mixing, clear errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torchvision.transforms as T
from PIL import Image

from vlp.config import load_config
from vlp.data.pipeline import build_loader
from vlp.data.shards import DataError

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
TRANSFORM = T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.ToTensor()])


def _shards(root: Path, prefix: str, count: int, per_shard: int = 10, exts=("jpg", "txt")) -> str:
    root.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image, "JPEG")
    for shard in range(count):
        with tarfile.open(root / f"{prefix}{shard}.tar", "w") as tar:
            for i in range(per_shard):
                members = {
                    "jpg": image.getvalue(),
                    "txt": f"{prefix} {shard} {i}".encode(),
                    "cls": b"1",
                }
                for ext in exts:
                    info = tarfile.TarInfo(f"{prefix}_{shard}_{i}.{ext}")
                    info.size = len(members[ext])
                    tar.addfile(info, io.BytesIO(members[ext]))
    return str(root / f"{prefix}{{0..{count - 1}}}.tar")


def _loader(overrides: list[str], positions=None, consumed: int = 0, world=(0, 1)):
    cfg = load_config(None, ["data.batch_size=4", "data.shuffle_buffer=15", *overrides])
    return build_loader(cfg.data, 0, TRANSFORM, TOKENIZER, *world, positions or {}, consumed, False)


@pytest.mark.parametrize("workers", [0, 2])
def test_restarting_from_saved_positions_continues_the_same_stream(tmp_path, workers):
    pattern = _shards(tmp_path, "s", 6)
    overrides = [f"data.train_shards={pattern}", f"data.workers={workers}"]
    straight = iter(_loader(overrides))
    first = [next(straight) for _ in range(5)]
    rest = [next(straight) for _ in range(7)]  # crosses pools and epochs
    positions = {batch.worker: batch.position for batch in first}
    resumed = iter(_loader(overrides, positions, consumed=5))
    again = [next(resumed) for _ in range(7)]
    assert [b.keys for b in again] == [b.keys for b in rest]
    for a, b in zip(again, rest, strict=True):  # augmentations repeat too
        assert (a.images == b.images).all()


def test_ranks_and_workers_read_disjoint_shards_within_an_epoch(tmp_path):
    pattern = _shards(tmp_path, "s", 4)
    keys = []
    for rank in range(2):
        overrides = [f"data.train_shards={pattern}", "data.workers=2", "data.shuffle_buffer=10"]
        loader = iter(_loader(overrides, world=(rank, 2)))
        keys.append({k for _ in range(4) for k in next(loader).keys})  # 8 of each worker's 10
    shards = [{k.split("_")[1] for k in rank_keys} for rank_keys in keys]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 2


def test_sources_mix_by_weight(tmp_path):
    a, b = _shards(tmp_path, "a", 4), _shards(tmp_path, "b", 4)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"data:\n  sources:\n    - {{shards: '{a}', weight: 3}}\n"
        f"    - {{shards: '{b}', weight: 1}}\n  batch_size: 4\n  workers: 0\n"
    )
    config = load_config(cfg, [])
    loader = iter(build_loader(config.data, 0, TRANSFORM, TOKENIZER, 0, 1, {}, 0, False))
    keys = [k for _ in range(100) for k in next(loader).keys]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.7 < share < 0.8


def test_wrong_keys_fail_fast_naming_what_was_seen(tmp_path):
    pattern = _shards(tmp_path, "s", 3, exts=("jpg", "cls"))
    with pytest.raises(DataError, match=r"members seen \.cls, \.jpg.*data.text_key"):
        next(iter(_loader([f"data.train_shards={pattern}", "data.workers=0"])))


def test_fewer_shards_than_workers_is_an_error_with_advice(tmp_path):
    pattern = _shards(tmp_path, "s", 3)
    with pytest.raises(DataError, match="3 shards for 2 processes x 2 workers"):
        _loader([f"data.train_shards={pattern}", "data.workers=2"], world=(0, 2))


@pytest.mark.parametrize("cut", ["member_boundary", "sample_boundary", "end_marker"])
def test_tars_cut_at_a_boundary_are_reported_truncated(tmp_path, cut):
    from vlp.data.shards import index_tar, read_shard

    _shards(tmp_path, "s", 1)
    path = tmp_path / "s0.tar"
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isfile()]
    ends = {
        "member_boundary": members[4].offset,  # before sample 2's caption header
        "sample_boundary": members[6].offset,  # before sample 3's image header
        "end_marker": members[-1].offset_data + 512,
    }
    path.write_bytes(path.read_bytes()[: ends[cut]])
    samples, problem = read_shard(str(path))
    assert problem is not None and problem.value == "truncated_tar"
    assert all({"jpg", "txt"} <= set(s) for s in samples)  # no sample with missing members
    assert len(samples) == len(index_tar(path).samples)
