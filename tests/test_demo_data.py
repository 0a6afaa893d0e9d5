"""The demo's eval sets are fixed, and its training scenes are held out from them.

The demo's figures (README, report, the demo config's header) are comparable across releases
only while the eval sets stay byte-identical; the training generator may change freely.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.sources import demo
from data_tools.sources.negatives import DemoNegatives
from tests.conftest import REPO
from vlp.data import format as fmt

# sha256sum lines of every file `vlp-shard demo OUT` writes under OUT/eval with the default
# --image-size 64 and --eval-samples 1000 (the `*_stats.json` files hold timings, so they vary)
HASHES_FILE = Path(__file__).parent / "data" / "demo_eval_sets.sha256"
TRAIN_SAMPLES = 2000
LEARN_STEPS = 200
LEARN_MIN_ACC1 = 0.16
LEARN_MIN_R1 = 0.30


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


def test_training_mixes_one_object_scenes_with_busier_ones():
    source = demo.DemoSource(400, image_size=32, seed=0)
    counts = np.array([source.read(i).meta["num_objects"] for i in range(len(source))])
    # one-object scenes: the SINGLE_FRACTION share plus a quarter of the rest (1-4 uniformly)
    expected = demo.SINGLE_FRACTION + (1 - demo.SINGLE_FRACTION) / 4
    assert abs((counts == 1).mean() - expected) < 0.07
    assert set(counts) == {1, 2, 3, 4}
    assert demo.DemoSource(10, single_fraction=0.0).describe()["single_fraction"] == 0.0


def test_a_third_of_training_captions_are_long_and_their_negatives_rewrite_them():
    source = DemoNegatives(demo.DemoSource(600, image_size=32, seed=0))
    samples = [source.read(i) for i in range(len(source))]
    long = [s for s in samples if s.caption != s.meta["raw"]]
    assert all(s.caption in s.meta["long"] for s in long)
    assert abs(len(long) / len(samples) - demo.LONG_CAPTION_FRACTION) < 0.06
    for sample in long[:50]:
        for negative in sample.meta[fmt.NEGATIVES_FIELD]:
            # same sentences and length class, one object phrase changed
            assert negative != sample.caption and negative[0].isupper()
            assert negative.count(".") == sample.caption.count(".")


def test_weak_captions_name_one_object_of_the_same_scenes():
    default, weak = demo.DemoSource(200, 32), demo.DemoSource(200, 32, weak_captions=True)
    for i in range(len(weak)):
        plain, sample = default.read(i), weak.read(i)
        assert sample.image.tobytes() == plain.image.tobytes() and sample.meta == plain.meta
        objects = [demo.SceneObject(**obj) for obj in sample.meta["objects"]]
        named = [
            o for o in objects if any(demo._phrase(o, s) in sample.caption for s in (False, True))
        ]
        assert len(named) == 1 and "." not in sample.caption  # one object, never a long caption
    assert weak.describe()["weak_captions"] and "weak_captions" not in default.describe()
    assert weak.describe()["long_fraction"] == 0.0


def _final_eval(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for r in records for k, v in r.items() if k.startswith("eval/")}


def test_a_cut_down_demo_run_learns_shapes_and_retrieval(demo_dir, tmp_path):
    """The demo config, LEARN_STEPS steps on the 2,000 training scenes: far above chance.

    Chance is 0.125 (acc1, 8 shapes) and 0.001 (R@1, 1,000 images). Over train.seed 0-4 this
    run gave acc1 0.219-0.267 (mean 0.240, sd 0.021), text->image R@1 0.474-0.533 (0.492, sd
    0.024) and image->text 0.512-0.588 (0.538, sd 0.029). The bounds: acc1 0.16, 3.8 sd below
    that mean and 3.4 binomial sd (1,000 images) above chance; R@1 0.30, 8 sd below the means
    and 300x chance. (At 100 steps acc1 was 0.143-0.175: too close to chance to guard.)"""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "vlp/train.py", "--config", "configs/demo.yaml",
        f"data.train_shards={demo_dir}/train/{{00000..00001}}.tar",
        f"eval.shapes.dataset={demo_dir}/eval/shapes",
        f"eval.retrieval.dataset={demo_dir}/eval/retrieval",
        f"train.steps={LEARN_STEPS}", "train.warmup_steps=20", "checkpoint.every_steps=1000",
        "eval.shapes.every_steps=0", "eval.retrieval.every_steps=0", f"run.output_dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = _final_eval(run_dir)
    assert scores["eval/shapes/acc1"] > LEARN_MIN_ACC1, scores
    assert scores["eval/retrieval/image_retrieval_recall@1"] > LEARN_MIN_R1, scores
    assert scores["eval/retrieval/text_retrieval_recall@1"] > LEARN_MIN_R1, scores
