"""Other tools read what vlp-shard writes: open_clip's trainer, webdataset, clip_benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torchvision.transforms as T


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("demo")
    code = main(
        [
            "demo",
            str(out),
            "--num-samples",
            "2000",
            "--eval-samples",
            "60",
            "--image-size",
            "32",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    return out


def test_demo_2000_samples_and_open_clip_reads_sizes(demo_dir):
    from open_clip_train.data import get_dataset_size

    sizes = json.loads((demo_dir / "train" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 1000, "00001.tar": 1000}
    assert get_dataset_size(str(demo_dir / "train" / "{00000..00001}.tar")) == (2000, 2)


def test_webdataset_reads_train_shards_with_txt_key(demo_dir):
    import webdataset as wds

    pattern = str(demo_dir / "train" / "{00000..00001}.tar")
    dataset = (
        wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    )
    samples = list(dataset)
    assert len(samples) == 2000
    image, caption, meta = samples[0]
    assert image.size == (32, 32) and caption in [meta["raw"], *meta["long"]]


def test_clip_benchmark_loads_the_shapes_classification_set(demo_dir):
    from clip_benchmark.datasets.builder import build_dataset

    from data_tools.sources.demo import SHAPES

    dataset = build_dataset(
        "wds/shapes",
        root=str(demo_dir / "eval" / "shapes"),
        transform=T.ToTensor(),
        split="test",
        download=False,
    )
    assert dataset.classes == list(SHAPES)
    assert dataset.templates and all("{c}" in t for t in dataset.templates)
    items = list(dataset)
    assert len(items) == 60
    assert all(image.shape == (3, 32, 32) and 0 <= label < len(SHAPES) for image, label in items)


def test_clip_benchmark_loads_the_retrieval_set(demo_dir):
    from clip_benchmark.datasets.builder import build_dataset

    dataset = build_dataset(
        "wds/retrieval",
        root=str(demo_dir / "eval" / "retrieval"),
        transform=T.ToTensor(),
        split="test",
        download=False,
        task="zeroshot_retrieval",
    )
    items = list(dataset)
    assert len(items) == 60
    image, captions = items[0]
    assert len(captions) >= 2 and all(c and "\n" not in c for c in captions)
