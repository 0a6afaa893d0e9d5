"""Fashion-MNIST (generated IDX files, and the real package when installed) and `eval-set`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms as T

from data_tools.sources.fashion_mnist import CLASSNAMES, DEFAULT_IDX_DIR
from tests.conftest import make_image, tar_members

REAL_IDX = DEFAULT_IDX_DIR / "train-images-idx3-ubyte.gz"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for stem, count in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return tmp_path


def _clip_benchmark(root: Path, task: str = "zeroshot_classification"):
    from clip_benchmark.datasets.builder import build_dataset

    return build_dataset(
        f"wds/{root.name}",
        root=str(root),
        transform=T.ToTensor(),
        split="test",
        download=False,
        task=task,
    )


def test_single_items_get_class_captions_and_a_zero_shot_eval_set(idx_dir, tmp_path, cli):
    code, out, err = cli("fashion-mnist", tmp_path / "out", "--idx-dir", idx_dir)
    assert code == 0, err
    members = tar_members(tmp_path / "out" / "train" / "00000.tar")
    captions = [v.decode() for k, v in members.items() if k.endswith(".txt")]
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert len(captions) == 40 and len(set(captions)) > 10
    assert all(m["class"] in c for m, c in zip(metas, captions, strict=True))
    dataset = _clip_benchmark(tmp_path / "out" / "eval" / "fashion-mnist")
    items = list(dataset)
    assert dataset.classes == list(CLASSNAMES) and len(items) == 20
    assert [label for _, label in items] == [i % 10 for i in range(20)]
    assert items[0][0].shape == (3, 64, 64)


def test_mosaics_have_one_sentence_per_tile(idx_dir, tmp_path, cli):
    code, _, err = cli(
        "fashion-mnist", tmp_path / "out", "--idx-dir", idx_dir, "--mosaic", "--image-size", "56"
    )
    assert code == 0, err
    members = tar_members(tmp_path / "out" / "train" / "00000.tar")
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert len(metas) == 10  # 40 items, four per mosaic, each item used once
    assert sorted(label for m in metas for label in m["labels"]) == sorted(np.arange(40) % 10)
    for meta in metas:
        sentences = meta["long"][0].split(". ")
        assert len(sentences) == 5  # a count sentence, then one per tile
        for name, position, sentence in zip(
            meta["classes"], meta["positions"], sentences[1:], strict=True
        ):
            assert name in sentence and position in sentence
        assert all(name in meta["raw"] for name in meta["classes"])


@pytest.mark.skipif(not REAL_IDX.exists(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path, cli):
    code, out, err = cli(
        "fashion-mnist", tmp_path, "--num-samples", "300", "--mosaic", "--workers", "2"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"00000.tar": 300}
    sizes = json.loads((tmp_path / "eval" / "fashion-mnist" / "test" / "sizes.json").read_text())
    assert sum(sizes.values()) == 10000
    code, out, _ = cli("verify", str(tmp_path / "train" / "00000.tar"))
    assert code == 0 and "300 good, 0 bad" in out


def test_eval_set_from_class_folders(tmp_path, cli):
    for cls in ("cat", "dog", "eel"):
        for i in range(3):
            make_image(tmp_path / "photos" / cls / f"{i}.jpg", seed=i)
    make_image(tmp_path / "photos" / "stray.jpg")  # not in a class folder: ignored
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\nart of a {c}.\n")
    code, _, err = cli(
        "eval-set",
        "classification",
        tmp_path / "pets",
        "--folder",
        tmp_path / "photos",
        "--templates",
        tmp_path / "templates.txt",
        "--image-size",
        "32",
    )
    assert code == 0, err
    dataset = _clip_benchmark(tmp_path / "pets")
    assert dataset.classes == ["cat", "dog", "eel"]
    assert dataset.templates == ["a photo of a {c}.", "art of a {c}."]
    assert sorted(label for _, label in dataset) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_eval_set_from_table_with_label_names_and_retrieval(tmp_path, cli):
    for i in range(4):
        make_image(tmp_path / f"{i}.jpg", seed=i)
    (tmp_path / "labels.csv").write_text("path,label\n0.jpg,b\n1.jpg,a\n2.jpg,b\n3.jpg,zzz\n")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    code, out, _ = cli(
        "eval-set",
        "classification",
        tmp_path / "cls",
        "--table",
        tmp_path / "labels.csv",
        "--image-col",
        "path",
        "--label-col",
        "label",
        "--classnames",
        tmp_path / "classes.txt",
    )
    assert code == 0 and "bad_label 1" in out
    assert sorted(label for _, label in _clip_benchmark(tmp_path / "cls")) == [0, 1, 1]
    (tmp_path / "caps.jsonl").write_text(
        "".join(
            json.dumps({"img": f"{i}.jpg", "short": f"short {i}", "long": f"long\n{i}"}) + "\n"
            for i in range(4)
        )
    )
    code, _, err = cli(
        "eval-set",
        "retrieval",
        tmp_path / "ret",
        "--table",
        tmp_path / "caps.jsonl",
        "--image-col",
        "img",
        "--caption-col",
        "short",
        "--caption-col",
        "long",
    )
    assert code == 0, err
    items = list(_clip_benchmark(tmp_path / "ret", task="zeroshot_retrieval"))
    assert [captions for _, captions in items][1] == ["short 1", "long 1"]
