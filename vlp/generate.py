"""Caption generation for open_clip CoCa models: greedy and beam search.

open_clip 3.3's `CoCa.generate` imports transformers' `BeamSearchScorer`, which transformers
4.56 and later (vlp runs 5.x) no longer have, so it refuses to run. vlp decodes itself, over
open_clip's own modules: the image tower and the cross-attention keys and values once per image,
then per step the causal text tower and decoder on the prefix, and the vocabulary projection at
the last position only. Every image of a batch decodes at once; images whose caption has ended
drop out.

A caption is the tokens between the start token and the first end token. `max_tokens` caps
them (the end token is forced after that many), `min_tokens` forbids the end token before, and
`no_repeat_ngram` n forbids any token that would repeat an n-gram already in the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import GenerationConfig
from vlp.openclip_compat import coca_caption_context, coca_cross_cache, coca_next_logits


@dataclass(frozen=True)
class SpecialTokens:
    start: int
    end: int


def context_limit(model: nn.Module) -> int:
    """The most caption tokens the model's text tower and decoder can hold (start, end excluded)."""
    return coca_caption_context(model) - 2


@torch.no_grad()
def generate(
    model: nn.Module, images: Tensor, special: SpecialTokens, config: GenerationConfig
) -> list[list[int]]:
    """(B, 3, H, W) preprocessed images -> B captions as token ids (start and end left out).

    `model` is an open_clip CoCa in eval mode; run under autocast for reduced precision.
    """
    if config.max_tokens > context_limit(model):
        raise ValueError(
            f"max_tokens {config.max_tokens} exceeds the model's context "
            f"({context_limit(model)} caption tokens)"
        )
    search = _greedy if config.method == "greedy" else _beam
    return search(_Steps(model, images), special, config)


class _Steps:
    """Next-token logits of an open_clip CoCa, for G prefixes (beams) per image.

    The image tower runs once, and so do the keys and values of the decoder's cross-attention
    over the image tokens (the largest per-step cost otherwise: hundreds of image tokens against
    a few text positions); each step then runs the text tower and decoder on the prefixes
    (vlp.openclip_compat: the open_clip internals this reads).
    """

    def __init__(self, model: nn.Module, images: Tensor):
        self.model = model
        self.num_images, self.device = images.shape[0], images.device
        self.cross = coca_cross_cache(model, images)

    def keep(self, images: Tensor) -> None:
        """Drop every image but `images` (indices into the current ones, in this order)."""
        self.cross = [(keys[images], values[images]) for keys, values in self.cross]

    def logits(self, prefixes: Tensor) -> Tensor:
        """(A * G, t) prefixes, G consecutive rows per current image -> (A * G, V) float32
        logits of the token after each prefix."""
        return coca_next_logits(self.model, prefixes, self.cross)


def forbid(logits: Tensor, prefixes: Tensor, special: SpecialTokens, config: GenerationConfig):
    """Set to -inf, in place, the (R, V) logits of tokens the rules forbid after (R, t) prefixes.

    The end token before `min_tokens` caption tokens; with no_repeat_ngram n, every token that
    would end an n-gram whose first n - 1 tokens are the prefix's last n - 1 and that already
    occurs in the prefix.
    """
    if prefixes.shape[1] - 1 < config.min_tokens:
        logits[:, special.end] = -math.inf
    n = config.no_repeat_ngram
    if n and prefixes.shape[1] >= n:
        grams = prefixes.unfold(1, n, 1)  # (R, t - n + 1, n)
        tail = prefixes[:, prefixes.shape[1] - n + 1 :]  # (R, n - 1)
        rows, starts = (grams[:, :, :-1] == tail[:, None, :]).all(dim=2).nonzero(as_tuple=True)
        logits[rows, grams[rows, starts, -1]] = -math.inf
    return logits


def _greedy(steps: _Steps, special: SpecialTokens, config: GenerationConfig) -> list[list[int]]:
    """The most likely allowed token at each step, until the end token or max_tokens."""
    captions: list[list[int]] = [[] for _ in range(steps.num_images)]
    alive = torch.arange(steps.num_images, device=steps.device)  # images still decoding
    prefixes = torch.full((steps.num_images, 1), special.start, device=steps.device)
    for _ in range(config.max_tokens):
        logits = forbid(steps.logits(prefixes), prefixes, special, config)
        chosen = logits.argmax(dim=1)  # (A,)
        for image, token in zip(alive.tolist(), chosen.tolist(), strict=True):
            if token != special.end:
                captions[image].append(token)
        going = chosen != special.end
        alive, prefixes = alive[going], torch.cat([prefixes, chosen[:, None]], dim=1)[going]
        if not len(alive):
            break
        if not going.all():
            steps.keep(going.nonzero()[:, 0])
    return captions


@dataclass
class _Finished:
    """An image's best finished captions: (normalised score, tokens), at most num_beams."""

    beams: int
    hypotheses: list[tuple[float, list[int]]]

    def add(self, score: float, tokens: list[int]) -> None:
        self.hypotheses.append((score, tokens))
        self.hypotheses.sort(key=lambda item: -item[0])
        del self.hypotheses[self.beams :]

    def settled(self, best_alive: float) -> bool:
        """Full, and no live beam scores better than the worst kept caption."""
        return len(self.hypotheses) == self.beams and self.hypotheses[-1][0] >= best_alive


def _beam(steps: _Steps, special: SpecialTokens, config: GenerationConfig) -> list[list[int]]:
    """Beam search: the `num_beams` best prefixes of each image by summed log-probability.

    Per step each image's beams propose 2K candidates; those ending with the end token among
    the top K become finished captions (ranked by score / length ** length_penalty, length =
    caption tokens + 1), the best K others are the next beams. An image stops when K finished
    captions all rank above its best beam; after max_tokens every beam is ended.
    """
    beams = config.num_beams
    finished = [_Finished(beams, []) for _ in range(steps.num_images)]
    device = steps.device
    alive = torch.arange(steps.num_images, device=device)
    prefixes = torch.full((steps.num_images * beams, 1), special.start, device=device)
    # one live beam per image at first: identical copies would crowd out other candidates
    scores = torch.full((steps.num_images, beams), -math.inf, device=device)
    scores[:, 0] = 0
    for step in range(config.max_tokens + 1):
        logits = forbid(steps.logits(prefixes), prefixes, special, config)  # (A * K, V)
        log_probs = F.log_softmax(logits, dim=1)
        if step == config.max_tokens:  # the last position: the end token, at its probability
            log_probs[:, : special.end] = log_probs[:, special.end + 1 :] = -math.inf
        vocab = logits.shape[1]
        total = scores[:, :, None] + log_probs.view(len(alive), beams, vocab)
        top, index = total.view(len(alive), -1).topk(2 * beams, dim=1)  # (A, 2K)
        source, token = index // vocab, index % vocab
        ends = (token == special.end) & top.isfinite()
        length = (step + 1) ** config.length_penalty
        for a, c in (ends[:, :beams]).nonzero().tolist():  # ends ranked among the top K
            tokens = prefixes[a * beams + source[a, c], 1:].tolist()
            finished[int(alive[a])].add(float(top[a, c]) / length, tokens)
        # the first K candidates that do not end (there are at least K among 2K)
        keep = (token == special.end).int().argsort(dim=1, stable=True)[:, :beams]
        scores, source, token = top.gather(1, keep), source.gather(1, keep), token.gather(1, keep)
        parents = (torch.arange(len(alive), device=device)[:, None] * beams + source).flatten()
        prefixes = torch.cat([prefixes[parents], token.flatten()[:, None]], dim=1)
        best = zip(alive.tolist(), (scores[:, 0] / length).tolist(), strict=True)
        going = torch.tensor([not finished[i].settled(s) for i, s in best], device=device)
        if step == config.max_tokens or not going.any():
            break
        alive, scores = alive[going], scores[going]
        prefixes = prefixes.view(len(going), beams, -1)[going].flatten(0, 1)
        if not going.all():
            steps.keep(going.nonzero()[:, 0])
    return [f.hypotheses[0][1] for f in finished]  # the best, kept sorted
