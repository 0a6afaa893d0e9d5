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

# sha256sum lines of every file `vlp-shard demo OUT` writes under OUT/eval with the default
# --image-size 64 and --eval-samples 1000 (the `*_stats.json` files hold timings, so they vary)
HASHES_FILE = Path(__file__).parent / "data" / "demo_eval_sets.sha256"
TRAIN_SAMPLES = 2000


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", str(out), "--num-samples", str(TRAIN_SAMPLES), "--workers", "2"]) == 0
    return out


def test_eval_sets_are_byte_identical_to_the_published_ones(demo_dir):
    published = dict(line.split()[::-1] for line in HASHES_FILE.read_text().splitlines())
    assert len(published) == 22
    got = {
        name: hashlib.sha256((demo_dir / "eval" / name).read_bytes()).hexdigest()
        for name in published
    }
    assert got == published


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
    evals = _pixels(
        [demo_dir / "eval" / name / "test" / "0.tar" for name in ("shapes", "retrieval")]
    )
    assert len(train) == TRAIN_SAMPLES and len(evals) == 2000
    # squared distances through the Gram matrix: [T, E]
    sq = (train**2).sum(1)[:, None] + (evals**2).sum(1)[None, :] - 2 * train @ evals.T
    nearest_rms = np.sqrt(np.maximum(sq.min(axis=0), 0) / train.shape[1])
    # a JPEG round trip of one image moves pixels by about 1-2 levels RMS; independent
    # textured backgrounds differ by far more, so 8 levels separates copies from new scenes
    assert nearest_rms.min() > 8, f"eval image {nearest_rms.argmin()} has a training near-copy"
