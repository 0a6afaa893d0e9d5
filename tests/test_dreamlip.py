"""DreamLIP: splitters, sub-caption sampling, multi-text and patch outputs, both objectives.

Hand-computed values and invariants from the method spec (methods/dreamlip_gap.md 4.1-4.2).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from tests.conftest import run_two_processes
from vlp.config import ConfigError, load_config
from vlp.data.pipeline import build_loader
from vlp.data.subcaptions import (
    sample_subcaptions,
    sentence_pool,
    split_dreamlip,
    split_sentences,
)
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.objectives.contrastive import clip_loss
from vlp.objectives.dreamlip import (
    grouped_embeddings,
    grouping_loss,
    grouping_weights,
    multi_positive_loss,
)

EXAMPLE = "A dog runs on the grass. The sky is blue.\nThere are 3.5 clouds</s>Wow! Nice; great?"
MR_SMITH = "Mr. Smith holds a cup, e.g. coffee..."


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


# ---- 4.1 data path


def test_dreamlip_splitter_reproduces_the_reference_rule_quirks_included():
    assert split_dreamlip(EXAMPLE) == [
        "A dog runs on the grass",
        "The sky is blue",
        "There are 3",
        "5 clouds",
        "Wow! Nice; great?",
    ]
    assert split_dreamlip(MR_SMITH) == ["Mr", "Smith holds a cup, e", "g", "coffee"]
    assert split_dreamlip("") == []
    assert split_dreamlip("a\n\nb</s>") == ["a", "b"]


def test_sentence_splitter_keeps_decimals_and_abbreviations():
    assert split_sentences(EXAMPLE) == [
        "A dog runs on the grass.",
        "The sky is blue.",
        "There are 3.5 clouds",
        "Wow!",
        "Nice; great?",
    ]
    assert split_sentences(MR_SMITH + " It is hot.") == [MR_SMITH, "It is hot."]
    assert split_sentences("") == [] and split_sentences("a\n\nb</s>") == ["a", "b"]


def test_pool_prefers_pre_split_sentences_and_splits_long_captions_otherwise():
    meta = {"long": ["A b. C d.", "E f."], "raw": "x"}
    assert sentence_pool(meta, split_dreamlip) == ["A b", "C d", "E f"]
    assert sentence_pool({**meta, "sentences": [["S1.", "S2."], ["S3."]]}, split_dreamlip) == [
        "S1.",
        "S2.",
        "S3.",
    ]
    assert sentence_pool({"long": "One. Two."}, split_dreamlip) == ["One", "Two"]
    assert sentence_pool({}, split_dreamlip) == []


def test_sampling_without_replacement_never_draws_the_last_sentence_in_parity_mode():
    pool = [f"s{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    drawn = set()
    for _ in range(10_000):
        texts, valid = sample_subcaptions("RAW", pool, 6, rng, exclude_last=True)
        assert len(texts) == 7 and texts[0] == "RAW" and all(valid)
        assert len(set(texts[1:])) == 6  # no duplicate indices
        drawn.update(texts[1:])
    assert drawn == set(pool[:-1])  # every other sentence is reachable
    drawn = {t for _ in range(2000) for t in sample_subcaptions("R", pool, 6, rng)[0][1:]}
    assert drawn == set(pool)  # the fixed version reaches the last one


def test_small_pools_draw_with_replacement_and_empty_pools_fall_back_to_the_raw_caption():
    rng = np.random.default_rng(0)
    texts, valid = sample_subcaptions("raw caption", ["a", "b"], 6, rng)
    assert len(texts) == 7 and set(texts[1:]) == {"a", "b"} and all(valid)
    texts, valid = sample_subcaptions("raw caption", ["only"], 3, rng)  # one sentence: no crash
    assert texts == ["raw caption", "only", "only", "only"] and all(valid)
    for pool, exclude_last in (([], False), (["only"], True)):
        texts, valid = sample_subcaptions("raw caption", pool, 3, rng, exclude_last=exclude_last)
        assert texts == ["raw caption"] * 4 and valid == [True, False, False, False]


def test_draws_are_reproducible_per_seed_and_merge_joins_consecutive_sentences():
    pool = [f"s{i}" for i in range(20)]

    def draw(seed):
        return sample_subcaptions("r", pool, 6, np.random.default_rng(seed))[0]

    assert draw(1) == draw(1) and draw(1) != draw(2)
    texts, _ = sample_subcaptions("r", pool, 6, np.random.default_rng(0), merge=3)
    for text in texts[1:]:
        first = int(text.split(". ")[0][1:])
        assert text == ". ".join(f"s{first + i}" for i in range(3))


def _shards(root: Path, per_shard: int = 6, count: int = 2) -> str:
    image = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image, "JPEG")
    long_sentence = " ".join(["word"] * 200)
    for shard in range(count):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"k{shard}_{i}"
                # item i has i sentences; item 5 one 200-word sentence
                sentences = [f"Sentence {j} of {key}." for j in range(i)]
                sentences = [long_sentence] if i == 5 else sentences
                meta = {"raw": f"raw {key}", "long": [" ".join(sentences)]}
                members = {
                    "jpg": image.getvalue(),
                    "txt": f"raw {key}".encode(),
                    "json": json.dumps(meta).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{{0..{count - 1}}}.tar")


def _subcaption_loader(pattern: str, positions=None, consumed=0, **options):
    overrides = [f"data.subcaptions.{k}={v}" for k, v in options.items()]
    cfg = load_config(
        None,
        [
            f"data.train_shards={pattern}",
            "data.caption=subcaptions",
            "data.batch_size=4",
            "data.workers=0",
            "data.shuffle_buffer=6",
            *overrides,
        ],
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = T.Compose([T.RandomResizedCrop(16), T.ToTensor()])
    return build_loader(cfg.data, 0, transform, tokenizer, 0, 1, positions or {}, consumed, False)


def test_batches_carry_k_plus_1_tokenised_texts_a_mask_and_resume_exactly(tmp_path):
    pattern = _shards(tmp_path)
    stream = iter(_subcaption_loader(pattern, num=3, splitter="sentence"))
    batches = [next(stream) for _ in range(3)]
    batch = batches[0]
    assert batch.text.shape == (4, 4, 77) and batch.text.dtype == torch.long
    assert batch.text_mask.shape == (4, 4) and batch.text_mask.dtype == torch.bool
    tokens = batch.text.flatten(0, 1)
    sot, eot = (
        open_clip.tokenizer._tokenizer.sot_token_id,
        open_clip.tokenizer._tokenizer.eot_token_id,
    )
    assert (tokens[:, 0] == sot).all() and ((tokens == eot).sum(1) == 1).all()
    assert (tokens.argmax(1) == (tokens == eot).int().argmax(1)).all()  # EOT is the argmax id
    for batch in batches:
        for key, texts, mask in zip(batch.keys, batch.text, batch.text_mask, strict=True):
            index = int(key.split("_")[1])
            assert mask.tolist() == [True] + [index > 0] * 3  # item 0 has an empty pool
            if index == 5:  # a 200-word sentence is cut, with EOT at 76
                assert (texts[1:, 76] == eot).all()
    # exact resume: the same draws from the saved position
    again = iter(
        _subcaption_loader(pattern, {0: batches[0].position}, 1, num=3, splitter="sentence")
    )
    for expected in batches[1:]:
        assert torch.equal(next(again).text, expected.text)


@pytest.fixture(scope="module")
def models():
    register_model_configs()
    built = {}
    for name in ("vlp-tiny-clip", "vlp-tiny-coca"):
        torch.manual_seed(0)
        clip = new_clip(name).double().eval()
        built[name] = VLPModel(clip, pad_id=getattr(clip, "pad_id", 0), patch_emb=True)
    return built


@pytest.mark.parametrize("name", ["vlp-tiny-clip", "vlp-tiny-coca"])
def test_multi_text_encoding_equals_encoding_each_sentence_alone(models, name):
    model = models[name]
    tokenizer = open_clip.get_tokenizer(name)
    sentences = ["a red circle", "two shapes", "a star in the top left", "hi", "a b c", "blue"]
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(images, tokenizer(sentences).reshape(2, 3, -1))
        assert out.text_emb_all.shape == (2, 3, model.clip.visual.output_dim)
        for row, sentence in enumerate(sentences):
            alone = model(images[row // 3 : row // 3 + 1], tokenizer([sentence])[:, None])
            torch.testing.assert_close(out.text_emb_all[row // 3, row % 3], alone.text_emb[0])


@pytest.mark.parametrize("name", ["vlp-tiny-clip", "vlp-tiny-coca"])
def test_patch_embeddings_are_the_pre_pooler_tokens_through_ln_post_and_proj(models, name):
    visual = models[name].clip.visual
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = open_clip.get_tokenizer(name)(["a", "b"])[:, None]
    with torch.no_grad():
        out = models[name](images, tokens)
        last = visual.forward_intermediates(
            images, indices=1, normalize_intermediates=True, output_fmt="NLC"
        )
        expected = F.normalize(last["image_intermediates"][0] @ visual.proj, dim=-1)
        torch.testing.assert_close(out.patch_emb, expected)
        torch.testing.assert_close(out.image_emb, models[name].clip.encode_image(images, True))
    assert out.patch_emb.shape == (2, 16, visual.output_dim)


# ---- 4.2 losses


def test_multi_positive_loss_is_the_mean_of_per_slot_clip_losses():
    image, text = _unit(5, 8), _unit(5, 3, 8, seed=1)
    scale = torch.tensor(14.0, dtype=torch.float64)
    torch.testing.assert_close(
        multi_positive_loss(image, text[:, :1], scale), clip_loss(image, text[:, 0], scale)
    )
    same = text[:, :1].expand(5, 3, 8)
    torch.testing.assert_close(
        multi_positive_loss(image, same, scale), clip_loss(image, text[:, 0], scale)
    )
    expected = sum(clip_loss(image, text[:, k], scale) for k in range(3)) / 3
    torch.testing.assert_close(multi_positive_loss(image, text, scale), expected)


def test_uniform_logits_give_log_b():
    image = F.normalize(torch.ones(4, 8, dtype=torch.float64), dim=-1)
    text = image[:, None].expand(4, 3, 8)
    loss = multi_positive_loss(image, text, torch.tensor(10.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(1.386294, abs=1e-6)


def test_both_losses_are_invariant_to_the_pair_order_and_the_global_loss_to_the_slot_order():
    image, text, patches = _unit(6, 8), _unit(6, 3, 8, seed=1), _unit(6, 5, 8, seed=2)
    scale = torch.tensor(14.0, dtype=torch.float64)
    order, slots = torch.randperm(6), torch.tensor([2, 0, 1])
    torch.testing.assert_close(
        multi_positive_loss(image[order], text[order], scale),
        multi_positive_loss(image, text, scale),
    )
    torch.testing.assert_close(
        multi_positive_loss(image, text[:, slots], scale), multi_positive_loss(image, text, scale)
    )
    torch.testing.assert_close(
        grouping_loss(text[order], patches[order], scale, 0.0),
        grouping_loss(text, patches, scale, 0.0),
    )


def test_grouping_weights_and_grouped_embedding_of_the_hand_example():
    cosines = torch.tensor([[0.0, 0.2, 0.4, 1.0]], dtype=torch.float64)
    patches = torch.eye(4, dtype=torch.float64)[None]  # one-hot e1..e4
    for sigma, weights, grouped in (
        (0.0, [0, 0.125, 0.25, 0.625], [0, 0.182574, 0.365148, 0.912871]),
        (0.3, [0, 0, 0.285714, 0.714286], [0, 0, 0.371391, 0.928477]),
    ):
        got = grouping_weights(cosines, sigma)[0]
        torch.testing.assert_close(
            got, torch.tensor(weights, dtype=torch.float64), atol=1e-6, rtol=0
        )
        # a text whose cosines with the one-hot patches are exactly the example's
        text = F.normalize(cosines, dim=-1)[:, None]
        g = grouped_embeddings(text, patches, sigma)[0, 0]
        torch.testing.assert_close(g, torch.tensor(grouped, dtype=torch.float64), atol=1e-6, rtol=0)


def test_grouping_weight_invariants_on_random_cosines():
    cosines = torch.rand(50, 12, dtype=torch.float64) * 2 - 1
    for sigma in (0.0, 0.3, 0.9, -1.0):
        weights = grouping_weights(cosines, sigma)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(50, dtype=torch.float64))
        rows = torch.arange(50)
        assert (weights[rows, cosines.argmin(-1)] == 0).all()
        assert (weights[rows, cosines.argmax(-1)] > 0).all()


def test_equal_cosines_give_uniform_weights_and_a_finite_loss_and_gradients():
    text = _unit(2, 2, 8).requires_grad_()
    patches = torch.zeros(2, 4, 8, dtype=torch.float64)
    patches[..., 0] = 1  # every patch the same: all cosines equal
    patches.requires_grad_()
    for sigma in (0.0, 0.3):
        weights = grouping_weights(torch.full((3, 4), 0.25, dtype=torch.float64), sigma)
        torch.testing.assert_close(weights, torch.full((3, 4), 0.25, dtype=torch.float64))
        loss = grouping_loss(text, patches, torch.tensor(14.0, dtype=torch.float64), sigma)
        text.grad = patches.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(text.grad).all()
        assert torch.isfinite(patches.grad).all()


def test_each_sub_caption_pools_its_own_images_patches():
    """B=4, T=2, M=8, D=16: t[b,k] = p[b,k] = a unique one-hot in dims 0-7; patches 2-7 live
    in dims 8-15. Correct pairing gives g[b,k] = t[b,k]; the reference code's `view` of a
    slot-major [T, B, D] stack pairs 6 of the 8 texts with another image's patches."""
    batch, slots, patches_per_image, dim = 4, 2, 8, 16
    eye = torch.eye(dim, dtype=torch.float64)
    text = eye[: batch * slots].reshape(batch, slots, dim)  # u[b,k] = e_{b*T + k}
    noise = F.normalize(
        torch.randn(batch, patches_per_image - slots, 8, dtype=torch.float64), dim=-1
    )
    patches = torch.cat([text, F.pad(noise, (8, 0))], dim=1)
    grouped = grouped_embeddings(text, patches, 0.0)
    torch.testing.assert_close(grouped, text)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * text.flatten(0, 1) @ grouped.flatten(0, 1).T
    torch.testing.assert_close(logits.diagonal(), scale.expand(8))
    # the model side: text rows come back image-major, so this pairing is what the loss sees
    slot_major = text.transpose(0, 1).reshape(-1, dim)  # rows k*B + b
    misread = slot_major.view(batch, slots, dim)
    wrong = (grouped_embeddings(misread, patches, 0.0) * misread).sum(-1)
    assert (wrong < 0.5).sum() == 6


def test_grouping_loss_limit_for_orthogonal_exact_pairs():
    text = torch.eye(4, 6, dtype=torch.float64)[:, None]  # N = 4 orthogonal texts, T = 1
    patches = torch.cat([text, torch.zeros(4, 2, 6, dtype=torch.float64)], dim=1)
    patches[:, 1:, 5] = 1  # orthogonal to every text: all weight on patch 0, so g = t
    for scale, expected in ((10.0, 1.3619e-4), (1 / 0.07, 1.8746e-6)):
        loss = grouping_loss(text, patches, torch.tensor(scale, dtype=torch.float64), 0.0)
        assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-scale)), rel=1e-9)
        assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_masked_pairs_are_neither_rows_nor_negatives():
    text, patches = _unit(3, 3, 8), _unit(3, 5, 8, seed=1)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    scale = torch.tensor(14.0, dtype=torch.float64)
    grouped = grouped_embeddings(text, patches, 0.0)[mask]
    kept = text[mask]
    logits = scale * kept @ grouped.T
    expected = (
        F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))
    ) / 2
    torch.testing.assert_close(grouping_loss(text, patches, scale, 0.0, mask), expected)


def test_gradients_reach_patches_through_weights_and_sum_and_both_scales_are_clamped(models):
    model = models["vlp-tiny-clip"]
    cfg = load_config(
        None,
        [
            "data.train_shards=x",
            "objectives.contrastive.weight=0",
            "objectives.multi_positive.weight=1",
            "objectives.subcaption_grouping.weight=1",
        ],
    )
    objective = WeightedObjective(cfg.objectives)
    assert objective.needs_patches
    tokens = open_clip.get_tokenizer("vlp-tiny-clip")(["a", "b c", "d", "e f g"]).reshape(2, 2, -1)
    model.zero_grad(set_to_none=True)
    loss, logs = objective(model(torch.randn(2, 3, 32, 32, dtype=torch.float64), tokens), None)
    loss.backward()
    assert set(logs) == {"loss/multi_positive", "loss/subcaption_grouping", "loss/total"}
    assert model.logit_scale_local.grad.abs() > 0 and model.clip.logit_scale.grad.abs() > 0
    assert model.clip.visual.transformer.resblocks[-1].mlp.c_proj.weight.grad.abs().sum() > 0
    # through the weights alone (pooled sum detached) and through the sum alone
    text, patches = _unit(2, 2, 8), _unit(2, 5, 8, seed=1).requires_grad_()
    cosines = torch.einsum("btd,bmd->btm", text, patches)
    weights = grouping_weights(cosines, 0.0)
    probe = torch.randn(8, dtype=torch.float64)
    for pooled in (
        torch.einsum("btm,bmd->btd", weights, patches.detach()),
        torch.einsum("btm,bmd->btd", weights.detach(), patches),
    ):
        (grad,) = torch.autograd.grad((pooled @ probe).sum(), patches, retain_graph=True)
        assert grad.abs().sum() > 0
    with torch.no_grad():
        model.logit_scale_local.fill_(10.0)
        model.clip.logit_scale.fill_(10.0)
    objective.after_optimizer_step(model)
    assert model.logit_scale_local.item() == pytest.approx(math.log(100))
    assert model.clip.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale_local.fill_(math.log(1 / 0.07))
        model.clip.logit_scale.fill_(math.log(1 / 0.07))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.subcaptions.splitter=nltk"],
            "data.subcaptions.splitter: must be dreamlip or sentence",
        ),
        (["data.subcaptions.num=0"], "data.subcaptions.num: must be at least 1"),
        (["objectives.subcaption_grouping.threshold=1.5"], "threshold: must be below 1"),
        (["data.caption=sub"], "raw, long, subcaptions or json:FIELD"),
    ],
)
def test_subcaption_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train_shards=x", *overrides])


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    """multi_positive + subcaption_grouping (with masked slots) + caption on a tiny CoCa."""
    from tests import dreamlip_distributed as reference

    out = tmp_path / "two.pt"
    result = run_two_processes("tests.dreamlip_distributed", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out)
    model, objective = reference.build()
    loss, grads = reference.loss_and_grads(model, objective, *reference.batch())
    torch.testing.assert_close(two["loss"], loss.detach(), atol=1e-6, rtol=0)
    assert two["grads"].keys() == grads.keys() and "logit_scale_local" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=0, msg=name)


# ---- sharder: long-caption columns


def _sidecars(out: Path) -> list[dict]:
    from tests.conftest import tar_members

    metas = []
    for shard in sorted((out / "train").glob("*.tar")):
        members = tar_members(shard)
        metas += [json.loads(members[n]) for n in sorted(members) if n.endswith(".json")]
    return metas


def test_table_long_caption_columns_fill_the_sidecar(tmp_path, cli):
    from tests.conftest import make_image

    rows = [
        {"file": f"{i}.jpg", "text": f"raw {i}", "long_a": f"A{i}. B{i}.", "long_b": [f"C{i}."]}
        for i in range(3)
    ]
    rows[1]["long_a"], rows[2]["long_b"] = "", None
    for i in range(3):
        make_image(tmp_path / f"{i}.jpg", seed=i)
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["table", table, tmp_path / "out", "--image-col", "file", "--caption-col", "text"]
    code, out, _ = cli(*args, "--long-caption-col", "long_a", "--long-caption-col", "long_b")
    assert code == 0, out
    assert [m["long"] for m in _sidecars(tmp_path / "out")] == [
        ["A0. B0.", "C0."],
        ["C1."],
        ["A2. B2."],
    ]
    code, _, err = cli(*args[:2], tmp_path / "o2", *args[3:], "--long-caption-col", "nope")
    assert code == 2 and "no column 'nope'" in err and "long_a" in err


def test_hf_long_caption_column_fills_the_sidecar(tmp_path, cli):
    import datasets

    from tests.conftest import make_image

    images = [make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(2)]
    data = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "caption": ["c0", "c1"],
            "long": [["L0. M0.", "N0."], ["L1."]],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.Value("string"),
                "long": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    data.save_to_disk(str(tmp_path / "ds"))
    code, _, err = cli(
        "hf", tmp_path / "ds", tmp_path / "out", "--image-col", "image", "--caption-col",
        "caption", "--long-caption-col", "long", "--image-size", "32",
    )  # fmt: skip
    assert code == 0, err
    assert [m["long"] for m in _sidecars(tmp_path / "out")] == [["L0. M0.", "N0."], ["L1."]]


# ---- configs and the training loop


@pytest.mark.parametrize("name", ["dreamlip_demo.yaml", "dreamlip_fashion_mosaic.yaml"])
def test_dreamlip_configs_load_with_both_terms_on(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.data.caption == "subcaptions"
    assert set(cfg.objectives.active()) == {"multi_positive", "subcaption_grouping", "caption"}


def test_training_steps_log_both_terms_and_the_grouping_temperature(tmp_path):
    from vlp.trainer import Trainer

    pattern = _shards(tmp_path)
    cfg = load_config(
        None,
        [
            f"data.train_shards={pattern}",
            "data.caption=subcaptions",
            "data.subcaptions.num=2",
            "data.batch_size=4",
            "data.workers=0",
            "data.shuffle_buffer=6",
            "model.name=vlp-tiny-clip",
            "objectives.contrastive.weight=0",
            "objectives.multi_positive.weight=1",
            "objectives.subcaption_grouping.weight=1",
            "train.steps=2",
            "train.log_every_steps=1",
            "checkpoint.every_steps=2",
            f"run.output_dir={tmp_path / 'run'}",
            "run.trackers=[]",
        ],
    )
    Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = records[-1]
    assert math.isfinite(last["loss/subcaption_grouping"]) and last["logit_scale_local"] > 1
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert {"num": 2, "splitter": "dreamlip", "merge": 1, "exclude_last": False} in meta["data"][
        "stream"
    ]["keys"]
