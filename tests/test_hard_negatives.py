"""DCL and NegCLIP hard negatives: hand-computed losses, a naive loop, data, config errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from vlp.config import ConfigError, load_config
from vlp.data.pipeline import build_loader
from vlp.data.shards import DataError
from vlp.gradcache import grad_cache_step
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.objectives.contrastive import clip_loss

IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TEXTS = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
"""Cosines image i . text j: [[1, 0.6], [0, 0.8]]; text->image is its transpose."""
NEGATIVES = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]], dtype=torch.float64)  # [B=2, K=1, D]
MASK = torch.tensor([[True], [False]])  # image 1's negative slot is empty
ONE = torch.tensor(1.0, dtype=torch.float64)


def _lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_decoupled_loss_equals_the_hand_computed_value():
    # image->text: -1 + log e^0.6 = -0.4, -0.8 + log e^0 = -0.8
    # text->image: -1 + log e^0 = -1,     -0.8 + log e^0.6 = -0.2; mean of the two means: -0.6
    torch.testing.assert_close(clip_loss(IMAGES, TEXTS, ONE, decoupled=True).item(), -0.6)
    plain = ((-1 + _lse(1, 0.6)) + (-0.8 + _lse(0, 0.8))) / 2
    plain += ((-1 + _lse(1, 0)) + (-0.8 + _lse(0.6, 0.8))) / 2
    torch.testing.assert_close(clip_loss(IMAGES, TEXTS, ONE).item(), plain / 2)


@pytest.mark.parametrize("decoupled", [False, True], ids=["infonce", "dcl"])
def test_hard_negatives_are_image_to_text_columns_only(decoupled):
    # image 0 sees texts (1, 0.6), negative 0 (cosine 0), image 1's negative is masked out;
    # image 1 sees texts (0, 0.8) and negative 0 (cosine 1); text->image is unchanged
    first, second = ([], []) if decoupled else ([1], [0.8])  # positives, unless decoupled
    image_rows = [-1 + _lse(*first, 0.6, 0), -0.8 + _lse(0, *second, 1)]
    text_rows = [-1 + _lse(*first, 0), -0.8 + _lse(0.6, *second)]
    expected = (sum(image_rows) / 2 + sum(text_rows) / 2) / 2
    loss = clip_loss(IMAGES, TEXTS, ONE, NEGATIVES, MASK, decoupled)
    torch.testing.assert_close(loss.item(), expected)


def _naive(image, text, negatives, mask, scale, decoupled):
    """Row by row: image i against every caption and every present negative; text i against
    every image; the positive leaves the denominator with DCL."""
    n, total = image.shape[0], 0.0
    columns = [text[j] for j in range(n)]
    columns += [negatives[b, k] for b in range(n) for k in range(negatives.shape[1]) if mask[b, k]]
    for i in range(n):
        for query, keys in ((image[i], columns), (text[i], list(image))):
            logits = torch.stack([scale * query @ key for key in keys])
            others = torch.cat([logits[:i], logits[i + 1 :]])
            denominator = others if decoupled else logits
            total = total - logits[i] + torch.logsumexp(denominator, 0)
    return total / (2 * n)


@pytest.mark.parametrize("decoupled", [False, True], ids=["infonce", "dcl"])
def test_loss_equals_a_naive_loop(decoupled):
    generator = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=-1)
                   for _ in range(2))  # fmt: skip
    negatives = F.normalize(torch.randn(5, 3, 4, generator=generator, dtype=torch.float64), dim=-1)
    mask = torch.rand(5, 3, generator=generator) > 0.3
    scale = torch.tensor(7.5, dtype=torch.float64)
    expected = _naive(image, text, negatives, mask, scale, decoupled)
    torch.testing.assert_close(clip_loss(image, text, scale, negatives, mask, decoupled), expected)
    # the negatives matter, and masked ones are no column at all
    assert not torch.isclose(clip_loss(image, text, scale, decoupled=decoupled), expected)
    unmasked = clip_loss(image, text, scale, negatives, torch.ones_like(mask), decoupled)
    assert not torch.isclose(unmasked, expected)


# ---- the term reads the negatives from the batch's trailing text slots

CAPTIONS = ["a red circle", "a blue star", "a green cross", "a white heart"]
NEGATIVE_CAPTIONS = [["a blue circle", "a red star"], ["a red star", ""], ["a green star", ""],
                     ["a white cross", "a black heart"]]  # fmt: skip
SLOT_MASK = torch.tensor([[True, True, True], [True, True, False], [True, True, False],
                          [True, True, True]])  # fmt: skip


def _model_and_batch(overrides=()):
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-clip").double()
    cfg = load_config(None, ["data.train_shards=x", "data.hard_negatives=2", *overrides])
    model, objective = VLPModel(clip), WeightedObjective(cfg.objectives)
    tokenizer = open_clip.get_tokenizer("vlp-tiny-clip")
    texts = [t for caption, negs in zip(CAPTIONS, NEGATIVE_CAPTIONS, strict=True)
             for t in [caption, *[n or caption for n in negs]]]  # fmt: skip
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    batch = SimpleNamespace(
        images=images,
        text=tokenizer(texts).reshape(4, 3, -1),
        text_mask=SLOT_MASK,
        num_negatives=2,
    )
    return model, objective, batch


def test_the_contrastive_term_takes_the_last_slots_as_negatives():
    model, objective, batch = _model_and_batch(["objectives.contrastive.decoupled=true"])
    out = model(batch.images, batch.text)
    expected = clip_loss(out.image_emb, out.text_emb, out.logit_scale, out.text_emb_all[:, 1:],
                         SLOT_MASK[:, 1:], decoupled=True)  # fmt: skip
    torch.testing.assert_close(objective.terms["contrastive"](out, batch), expected)
    without = objective.terms["contrastive"](out, None)  # no slot layout: no negatives
    assert not torch.isclose(without, expected)


def test_grad_cache_keeps_the_negatives_of_every_micro_batch():
    model, objective, batch = _model_and_batch()
    objective.terms["contrastive"](model(batch.images, batch.text), batch).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model, objective, batch = _model_and_batch()
    halves = [
        SimpleNamespace(images=batch.images[s], text=batch.text[s], text_mask=SLOT_MASK[s],
                        num_negatives=2)
        for s in (slice(0, 2), slice(2, 4))
    ]  # fmt: skip
    grad_cache_step(lambda b: model(b.images, b.text), objective, halves,
                    lambda loss: loss.backward(), contextlib.nullcontext)  # fmt: skip
    cached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert cached.keys() == reference.keys() and len(cached) > 10
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-10, rtol=1e-8, msg=name)


# ---- the data side: negatives from the .json sidecar


def _shards(root: Path, metas: list[dict | None]) -> str:
    """One shard; sample i has caption "caption i" and `metas[i]` as its .json (None: no .json)."""
    root.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image, "JPEG")
    with tarfile.open(root / "0.tar", "w") as tar:
        for i, meta in enumerate(metas):
            members = {"jpg": image.getvalue(), "txt": f"caption {i}".encode()}
            if meta is not None:
                members["json"] = json.dumps(meta).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root / "0.tar")


def _batches(pattern: str, negatives: int, count: int = 1):
    """The first `count` batches of 4; the shuffle pool is one pass over the 5 samples."""
    cfg = load_config(None, [f"data.train_shards={pattern}", "data.batch_size=4",
                             "data.shuffle_buffer=5", "data.workers=0",
                             f"data.hard_negatives={negatives}"])  # fmt: skip
    tokenizer = open_clip.get_tokenizer("vlp-tiny-clip")
    loader = iter(build_loader(cfg.data, 0, T.ToTensor(), tokenizer, 0, 1, {}, 0, False))
    return [next(loader) for _ in range(count)]


def test_batches_carry_the_sidecar_negatives_as_masked_trailing_slots(tmp_path):
    metas = [{"negatives": ["neg a", "neg b", "neg c"]}, {"negatives": ["only one"]},
             {"negatives": []}, None, {"negatives": ["x", "y"]}]  # fmt: skip
    batch, second = _batches(_shards(tmp_path, metas), negatives=2, count=2)
    tokenizer = open_clip.get_tokenizer("vlp-tiny-clip")
    assert batch.text.shape[:2] == (4, 3) and batch.num_negatives == 2
    by_key = dict(zip(batch.keys, range(4), strict=True))
    assert set(by_key) == {"0000", "0001", "0002", "0004"}  # 0003 (no .json) is skipped ...
    assert list(second.position.bad) == ["missing_negatives"]  # ... and counted
    row = by_key["0001"]
    assert batch.text_mask[row].tolist() == [True, True, False]
    torch.testing.assert_close(batch.text[row], tokenizer(["caption 1", "only one", "caption 1"]))
    assert batch.text_mask[by_key["0002"]].tolist() == [True, False, False]
    # three negatives for two slots: a seeded draw of two, in their order
    drawn = batch.text[by_key["0000"], 1:]
    pairs = (("neg a", "neg b"), ("neg a", "neg c"), ("neg b", "neg c"))
    options = {tuple(tokenizer(list(pair)).flatten().tolist()) for pair in pairs}
    assert tuple(drawn.flatten().tolist()) in options
    (again,) = _batches(_shards(tmp_path / "again", metas), negatives=2)
    torch.testing.assert_close(again.text, batch.text)


def test_shards_without_negatives_stop_the_run_with_advice(tmp_path):
    pattern = _shards(tmp_path, [{"raw": "x"}] * 6)
    with pytest.raises(DataError, match="'negatives' list.*data.hard_negatives=0"):
        _batches(pattern, negatives=1)
    assert _batches(pattern, negatives=0)[0].text.shape[1] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.hard_negatives=-1"], "data.hard_negatives: must be 0 .off. or more"),
        (["data.hard_negatives=2", "data.caption=long"], "data.caption: must be raw with"),
        (["data.hard_negatives=2", "objectives.contrastive.weight=0",
          "objectives.alignment.weight=1"], "objectives.contrastive.weight: must be non-zero"),
        (["data.hard_negatives=2", "objectives.multi_positive.weight=1"],
         "data.hard_negatives: must be 0 with objectives.multi_positive"),
        (["objectives.contrastive.decoupled=true", "data.batch_size=1"],
         "data.batch_size: must be at least 2 with objectives.contrastive.decoupled"),
        (["objectives.contrastive.decoupled=maybe"], "objectives.contrastive.decoupled"),
    ],
)  # fmt: skip
def test_config_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train_shards=x", *overrides])


def test_a_bad_new_option_is_one_line_and_exit_2(capsys):
    from vlp.train import main

    assert main(["data.train_shards=x", "data.hard_negatives=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.hard_negatives" in err
