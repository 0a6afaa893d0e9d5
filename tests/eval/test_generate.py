"""Caption generation (vlp.generate) against naive decoding loops over open_clip's own CoCa
forward, and against open_clip's own `generate` where transformers allows it to run.

A freshly initialised CoCa almost never emits the end token, so these tests give the end
token's vocabulary projection a copy of a frequently generated token's, scaled: captions then
end after different numbers of tokens, as a trained model's do.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlp.config import GenerationConfig
from vlp.generate import SpecialTokens, _Steps, generate
from vlp.model import new_clip, register_model_configs

MODEL = "vlp-tiny-coca"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode faster on one thread, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def special(tokenizer):
    return SpecialTokens(tokenizer.sot_token_id, tokenizer.eot_token_id)


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def coca(special, images):
    """A seeded tiny CoCa whose captions end after 0 to 8 tokens (see the module docstring).

    The end token copies a token that greedy decoding picks after the first position, scaled:
    the first (token, scale), most frequent token first, under which captions end after at
    least three different numbers of tokens, one of them the cap.
    """
    torch.manual_seed(0)
    model = new_clip(MODEL).eval()
    config = GenerationConfig(max_tokens=8)
    captions = generate(model, images, special, config)
    later = torch.tensor([t for caption in captions for t in caption[1:]])
    projection = model.text_decoder.text_projection
    original = projection[:, special.end].clone()
    values, counts = later.unique(return_counts=True)
    for token in values[counts.argsort(descending=True, stable=True)][:5].tolist():
        for scale in (1.05, 1.1, 1.2):
            with torch.no_grad():
                projection[:, special.end] = scale * projection[:, token]
            lengths = {len(c) for c in generate(model, images, special, config)}
            if len(lengths) > 2 and config.max_tokens in lengths:
                return model
    with torch.no_grad():
        projection[:, special.end] = original
    pytest.fail("no end-token recipe gives captions of varied length; adjust the fixture")


def _next_logits(model, encoded, sequence: list[int]) -> torch.Tensor:
    """open_clip's own CoCa forward on the whole sequence: logits of the token after it.

    `encoded`: model._encode_image of the image (as open_clip's generate passes it)."""
    out = model(None, torch.tensor([sequence]), *encoded, output_labels=False)
    return out["logits"][0, -1].clone()


def _apply_rules(logits, sequence, special, config) -> torch.Tensor:
    if len(sequence) - 1 < config.min_tokens:
        logits[special.end] = -math.inf
    n = config.no_repeat_ngram
    for start in range(len(sequence) - n + 1 if n else 0):
        if sequence[start : start + n - 1] == sequence[len(sequence) - n + 1 :]:
            logits[sequence[start + n - 1]] = -math.inf
    return logits


def naive_greedy(model, image, special, config) -> list[int]:
    sequence = [special.start]
    with torch.no_grad():
        encoded = model._encode_image(image[None])
        while len(sequence) - 1 < config.max_tokens:
            logits = _apply_rules(_next_logits(model, encoded, sequence), sequence, special, config)
            token = int(logits.argmax())
            if token == special.end:
                break
            sequence.append(token)
    return sequence[1:]


def naive_beam(model, image, special, config) -> list[int]:
    """Beam search on one image, one beam at a time, as vlp.generate documents it."""
    width, beams, finished = config.num_beams, [(0.0, [special.start])], []
    with torch.no_grad():
        encoded = model._encode_image(image[None])
    for step in range(config.max_tokens + 1):
        candidates = []
        for score, sequence in beams:
            with torch.no_grad():
                logits = _next_logits(model, encoded, sequence)
            logits = F.log_softmax(_apply_rules(logits, sequence, special, config), dim=0)
            if step == config.max_tokens:
                logits[torch.arange(len(logits)) != special.end] = -math.inf
            top = logits.topk(2 * width)
            candidates += [(score + float(v), sequence, int(t)) for v, t in zip(*top, strict=True)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * width]
        length, beams = (step + 1) ** config.length_penalty, []
        for rank, (score, sequence, token) in enumerate(candidates):
            if token == special.end and rank < width and math.isfinite(score):
                finished.append((score / length, sequence[1:]))
            elif token != special.end and len(beams) < width:
                beams.append((score, [*sequence, token]))
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        full = len(finished) == width and finished[-1][0] >= beams[0][0] / length
        if step == config.max_tokens or full:
            return finished[0][1]


RULES = [
    GenerationConfig(max_tokens=8),
    GenerationConfig(max_tokens=8, min_tokens=3, no_repeat_ngram=2),
]


@pytest.mark.parametrize("config", RULES, ids=["plain", "min_tokens+no_repeat"])
def test_greedy_equals_a_naive_loop_over_open_clip_forward(coca, images, special, config):
    ours = generate(coca, images, special, config)
    assert ours == [naive_greedy(coca, image, special, config) for image in images]
    if config == RULES[0]:
        lengths = {len(caption) for caption in ours}
        assert len(lengths) > 2 and max(lengths) == 8  # ends at several steps, and at the cap
    else:  # the rules change captions
        assert ours != generate(coca, images, special, RULES[0])


@pytest.mark.parametrize("config", RULES, ids=["plain", "min_tokens+no_repeat"])
def test_beam_search_of_one_beam_equals_greedy(coca, images, special, config):
    beam = GenerationConfig(**{**vars(config), "method": "beam", "num_beams": 1})
    assert generate(coca, images, special, beam) == generate(coca, images, special, config)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_a_naive_beam_search(coca, images, special, length_penalty):
    config = GenerationConfig(
        method="beam", num_beams=3, max_tokens=5, length_penalty=length_penalty
    )
    ours = generate(coca, images, special, config)
    assert ours == [naive_beam(coca, image, special, config) for image in images]
    greedy = generate(coca, images, special, GenerationConfig(max_tokens=5))
    assert ours != greedy  # the beams find other captions than greedy for some images


def test_cached_cross_attention_equals_open_clip_forward(coca, images):
    """Several prefixes per image (beams) through the cached path: open_clip's logits."""
    prefixes = torch.randint(1, 49000, (len(images) * 3, 5), generator=torch.Generator())
    with torch.no_grad():
        ours = _Steps(coca, images).logits(prefixes)
        latent, tokens = coca._encode_image(images.repeat_interleave(3, dim=0))
        out = coca(None, prefixes, image_latent=latent, image_embs=tokens, output_labels=False)
    torch.testing.assert_close(ours, out["logits"][:, -1], rtol=1e-5, atol=1e-5)


def test_max_tokens_beyond_the_context_is_refused(coca, images, special):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(coca, images, special, GenerationConfig(max_tokens=31))


PEER_PYTHON = Path(
    os.environ.get("VLP_TRANSFORMERS4_PYTHON", REPO / "bench/.peers/transformers4/bin/python")
)
"""A Python whose open_clip can run CoCa.generate: transformers < 4.56 (docs/eval.md)."""
OPEN_CLIP_GENERATE = """
import json, sys, torch, open_clip
from safetensors.torch import load_file
open_clip.add_model_config(sys.argv[1])
model = open_clip.create_model("vlp-tiny-coca")
model.load_state_dict(load_file(sys.argv[2]))
images, max_tokens = torch.load(sys.argv[3]), int(sys.argv[4])
outs = [model.eval().generate(images, generation_type="top_k", top_k=1, seq_len=max_tokens + 2,
                              min_seq_len=int(min_tokens) + 1).tolist()
        for min_tokens in sys.argv[5:]]
print(json.dumps(outs))
"""


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no transformers<5 Python at {PEER_PYTHON}")
@pytest.mark.slow
def test_greedy_equals_open_clips_generate(coca, images, special, tmp_path):
    """open_clip's top-k sampling with k = 1 (greedy), run where transformers allows it."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in coca.state_dict().items()}, tmp_path / "w.st")
    torch.save(images, tmp_path / "images.pt")
    args = [REPO / "configs/models", tmp_path / "w.st", tmp_path / "images.pt", 8, 0, 3]
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", OPEN_CLIP_GENERATE, *map(str, args)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for min_tokens, rows in zip((0, 3), json.loads(done.stdout.splitlines()[-1]), strict=True):
        theirs = [row[1 : row.index(special.end)] for row in rows]  # between start and end
        config = GenerationConfig(max_tokens=8, min_tokens=min_tokens)
        assert generate(coca, images, special, config) == theirs, min_tokens
