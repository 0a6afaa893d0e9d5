"""The demo's eval sets are fixed, and its training scenes are held out from them.

The demo's figures (README, report, the demo config's header) are comparable across releases
only while the eval sets stay byte-identical; the training generator may change freely.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.sources import demo

# sha256 of every file `vlp-shard demo OUT` writes under OUT/eval with the default
# --image-size 64 and --eval-samples 1000 (the `*_stats.json` files hold timings, so they vary)
EVAL_HASHES = {
    "retrieval-long/dataset_type.txt": "a66f93706d4ae5ff009588a7fdfef4e9e7304215c2a7e7f9945ca5787ef1e416",
    "retrieval-long/test/0.tar": "a01a2a3ecd1605871a66c08ac13e02d60f5b0d68a83bc8233611e4b7a6234637",
    "retrieval-long/test/manifest.json": "51f33650c617a47a46e7e02cb14078d8853b7f0ac34a443635c19535f16165af",
    "retrieval-long/test/nshards.txt": "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865",
    "retrieval-long/test/sizes.json": "783fb5ee74de79b0794d54cbcddbdcfdd971b14cf63ede0ca2ac43f3040fef06",
    "retrieval-sentences/dataset_type.txt": "a66f93706d4ae5ff009588a7fdfef4e9e7304215c2a7e7f9945ca5787ef1e416",
    "retrieval-sentences/test/0.tar": "e940110c5740eecefec6a896f537532c08c85b0fc7e06cfc3d15d06f1935caca",
    "retrieval-sentences/test/manifest.json": "ed4be46724e01ff4b4f73f6f39f48722793946b543dc3e9e30ac868005b924a4",
    "retrieval-sentences/test/nshards.txt": "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865",
    "retrieval-sentences/test/sizes.json": "783fb5ee74de79b0794d54cbcddbdcfdd971b14cf63ede0ca2ac43f3040fef06",
    "retrieval/dataset_type.txt": "a66f93706d4ae5ff009588a7fdfef4e9e7304215c2a7e7f9945ca5787ef1e416",
    "retrieval/test/0.tar": "8b4aeeac56aed670f5688e6747a4812948d4307d8e6c07e9e9947b15fa6fed1d",
    "retrieval/test/manifest.json": "1899a088b6de10a4aed96ee1a7f66395c0fc737be4f96a08817ae5687a881efd",
    "retrieval/test/nshards.txt": "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865",
    "retrieval/test/sizes.json": "783fb5ee74de79b0794d54cbcddbdcfdd971b14cf63ede0ca2ac43f3040fef06",
    "shapes/classnames.txt": "61157970e562edf35f1802faeae15b96f87c78d472d1f1ac9554f2a595cd6161",
    "shapes/dataset_type.txt": "c5f9c53cd9ca43f5aa05db4840b5b9997bc46922a9ac5569ead646345307f0a2",
    "shapes/test/0.tar": "328e89faf7e6071979b27e6776d0aa000acac5b4456e478110404b4155f91473",
    "shapes/test/manifest.json": "125b54be9bd0eaf6441a4e41e31c4ec9d8c671bb66ee64d99848c87efc1c852a",
    "shapes/test/nshards.txt": "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865",
    "shapes/test/sizes.json": "783fb5ee74de79b0794d54cbcddbdcfdd971b14cf63ede0ca2ac43f3040fef06",
    "shapes/zeroshot_classification_templates.txt": "e512b63eb5472e88b744365fd1acac2385c22d6a15cf8ef0bfb192d8087e5e5c",
}  # fmt: skip
TRAIN_SAMPLES = 2000


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", str(out), "--num-samples", str(TRAIN_SAMPLES), "--workers", "2"]) == 0
    return out


def test_eval_sets_are_byte_identical_to_the_published_ones(demo_dir):
    got = {
        name: hashlib.sha256((demo_dir / "eval" / name).read_bytes()).hexdigest()
        for name in EVAL_HASHES
    }
    assert got == EVAL_HASHES


def _pixels(tars: list[Path]) -> np.ndarray:
    """Every image in the shards as a row of float32 pixels, [N, H*W*3]."""
    rows = []
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    image = Image.open(io.BytesIO(data)).convert("RGB")
                    rows.append(np.asarray(image, dtype=np.float32).ravel())
    return np.stack(rows)


def test_no_training_image_is_an_eval_image_or_a_near_copy(demo_dir):
    train = _pixels(sorted((demo_dir / "train").glob("*.tar")))
    evals = _pixels([demo_dir / "eval" / name / "test" / "0.tar" for name in ("shapes", "retrieval")])
    assert len(train) == TRAIN_SAMPLES and len(evals) == 2000
    # squared distances through the Gram matrix: [T, E]
    sq = (train**2).sum(1)[:, None] + (evals**2).sum(1)[None, :] - 2 * train @ evals.T
    nearest_rms = np.sqrt(np.maximum(sq.min(axis=0), 0) / train.shape[1])
    # a JPEG round trip of one image moves pixels by about 1-2 levels RMS; independent
    # textured backgrounds differ by far more, so 8 levels separates copies from new scenes
    assert nearest_rms.min() > 8, f"eval image {nearest_rms.argmin()} has a training near-copy"


def test_training_mixes_one_object_scenes_with_busier_ones():
    source = demo.DemoSource(400, image_size=32, seed=0)
    counts = np.array([source.read(i).meta["num_objects"] for i in range(len(source))])
    single = (counts == 1).mean()
    # one-object scenes: the SINGLE_FRACTION share plus a quarter of the rest (1-4 uniformly)
    expected = demo.SINGLE_FRACTION + (1 - demo.SINGLE_FRACTION) / 4
    assert abs(single - expected) < 0.07
    assert set(counts) == {1, 2, 3, 4}
    assert demo.DemoSource(10, single_fraction=0.0).describe()["single_fraction"] == 0.0
