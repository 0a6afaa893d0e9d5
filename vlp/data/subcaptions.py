"""DreamLIP sub-captions: split long captions into sentences and sample K of them per image.

A sample's `.json` sidecar may hold `long` (a list of long captions, or one string) and/or
`sentences` (pre-split: a list of sentences, or one list per long caption). The pool is the
pre-split sentences when present, else the sentences of every long caption in order. Each load
draws K texts from the pool; the raw caption always takes slot 0, so a sample has T = K + 1
texts and a validity mask (False where a slot holds a copy of the raw caption because the pool
was empty).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

_DREAMLIP_SEPARATORS = re.compile(r"\n|</s>|\.")

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e cf fig no approx inc ltd co dept est".split()
)
"""Words whose trailing period does not end a sentence (lower case, without that period)."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_dreamlip(caption: str) -> list[str]:
    """The reference splitter, quirks included: every '.', newline and '</s>' ends a piece.

    Pieces are stripped and empty ones dropped; decimals and abbreviations are cut too
    ("3.5" -> "3", "5"), and '!', '?' and ';' never split.
    """
    pieces = (piece.strip() for piece in _DREAMLIP_SEPARATORS.split(caption))
    return [piece for piece in pieces if piece]


def split_sentences(caption: str) -> list[str]:
    """Sentences ending in '.', '!' or '?' followed by white space, or at a newline / '</s>'.

    A period does not end a sentence after a known abbreviation ("Mr.", "e.g.") or a single
    letter (initials); decimals ("3.5") have no space after the period and stay whole.
    Sentences keep their punctuation.
    """
    sentences: list[str] = []
    for line in re.split(r"\n|</s>", caption):
        current = ""
        for piece in _SENTENCE_END.split(line.strip()):
            current = f"{current} {piece}" if current else piece
            if not _continues(current, piece):
                sentences.append(current.strip())
                current = ""
        if current.strip():
            sentences.append(current.strip())
    return [sentence for sentence in sentences if sentence]


def _continues(text: str, piece: str) -> bool:
    """Whether the sentence `text`, whose last piece is `piece`, goes on after it."""
    if not piece.endswith("."):
        return False
    last_word = text.rsplit(None, 1)[-1][:-1].lower()
    return last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())


SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "dreamlip": split_dreamlip,
    "sentence": split_sentences,
}


def sentence_pool(meta: dict[str, Any], split: Callable[[str], list[str]]) -> list[str]:
    """The sidecar's pre-split `sentences` if any, else its `long` captions split."""
    sentences = meta.get("sentences")
    if sentences:
        nested = [s if isinstance(s, list) else [s] for s in _as_list(sentences)]
        return [str(s).strip() for group in nested for s in group if str(s).strip()]
    return [piece for caption in _as_list(meta.get("long")) for piece in split(str(caption))]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def sample_subcaptions(
    raw: str,
    pool: list[str],
    k: int,
    rng: np.random.Generator,
    merge: int = 1,
    exclude_last: bool = False,
) -> tuple[list[str], list[bool]]:
    """([raw, K texts], validity of each of the K + 1 slots).

    Each text is `merge` consecutive pool sentences joined by ". ". Start indices are drawn
    uniformly without replacement when there are at least K of them, else with replacement.
    `exclude_last` reproduces the reference code's off-by-one (the last start index is never
    drawn). With no start index at all (an empty or too short pool), the K slots repeat the
    raw caption and are marked invalid.
    """
    starts = len(pool) - merge + 1 - int(exclude_last)
    if starts < 1:
        return [raw] * (k + 1), [True] + [False] * k
    chosen = rng.choice(starts, size=k, replace=starts < k)
    texts = [". ".join(pool[int(i) : int(i) + merge]) for i in chosen]
    return [raw, *texts], [True] * (k + 1)
