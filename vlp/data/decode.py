"""Raw tar samples -> tensors: the image, the caption slots [T, L], their mask, decoder tokens.

Runs in DataLoader workers. A sample that cannot be used raises BadSample with its reason; the
pipeline counts it and moves on. Text slots: slot 0 is the caption policy's caption; with
sub-captions (DreamLIP) sampled sentences follow, with hard negatives (NegCLIP) the sidecar's
negative captions.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlp.data.format import NEGATIVES_FIELD, Reason
from vlp.data.subcaptions import SPLITTERS, sample_subcaptions, sentence_pool

MAX_PIXELS = 89_478_485


class BadSample(Exception):
    def __init__(self, reason: Reason):
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class SampleDecoder:
    """Raw tar sample -> (image, caption tokens [T, L], slot mask [T], decoder tokens or None)."""

    transform: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]
    image_keys: tuple[str, ...]
    text_key: str
    caption: str
    decoder_caption: str
    subcaptions: Any = None
    """The data.subcaptions slice (used when caption == "subcaptions")."""
    hard_negatives: int = 0
    """Trailing text slots filled from the sidecar's negatives (data.hard_negatives)."""

    def __call__(self, sample: dict[str, Any], seed: int = 0):
        """`seed` drives the sub-caption and negative draws (the pipeline derives it from the
        position)."""
        image = self.transform(self._image(sample))
        if self.caption == "subcaptions":
            texts, valid = self._subcaptions(sample, np.random.default_rng(seed))
        else:
            texts, valid = [self._text(sample, self.caption)], [True]
        if self.hard_negatives:
            negatives = self._negatives(sample, np.random.default_rng(seed))
            empty = self.hard_negatives - len(negatives)
            # an empty slot repeats the caption (masked out): every sample has 1 + K slots
            texts, valid = texts + negatives + texts[:1] * empty, valid + [True] * len(negatives)
            valid += [False] * empty
        tokens = self.tokenizer(texts)  # [T, L]
        decoder = None
        if self.decoder_caption != self.slot0_policy:
            decoder = self.tokenizer([self._text(sample, self.decoder_caption)])[0]
        return image, tokens, torch.tensor(valid), decoder

    @property
    def slot0_policy(self) -> str:
        """The caption policy of text slot 0 (the raw caption when sampling sub-captions)."""
        return "raw" if self.caption == "subcaptions" else self.caption

    def slot0_caption(self, sample: dict[str, Any]) -> str:
        return self._text(sample, self.slot0_policy)

    def _subcaptions(self, sample: dict[str, Any], rng: np.random.Generator):
        cfg = self.subcaptions
        pool = sentence_pool(self._json(sample), SPLITTERS[cfg.splitter])
        raw = self._text(sample, "raw")
        return sample_subcaptions(raw, pool, cfg.num, rng, cfg.merge, cfg.exclude_last)

    def _negatives(self, sample: dict[str, Any], rng: np.random.Generator) -> list[str]:
        """Up to `hard_negatives` of the sidecar's negative captions (a seeded draw when it
        holds more); blank ones are dropped."""
        found = self._json(sample).get(NEGATIVES_FIELD)
        if not isinstance(found, list):
            raise BadSample(Reason.MISSING_NEGATIVES)
        negatives = [str(n).strip() for n in found if isinstance(n, str) and n.strip()]
        if len(negatives) > self.hard_negatives:
            picked = np.sort(rng.choice(len(negatives), self.hard_negatives, replace=False))
            negatives = [negatives[i] for i in picked]
        return negatives

    def _image(self, sample: dict[str, Any]) -> Image.Image:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            raise BadSample(Reason.MISSING_IMAGE)
        data = sample[key]
        if not data:
            raise BadSample(Reason.EMPTY_IMAGE)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.width * image.height > MAX_PIXELS:
                    raise BadSample(Reason.DECOMPRESSION_BOMB)
                image.load()
        except BadSample:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadSample(Reason.DECOMPRESSION_BOMB) from None
        except Exception as err:  # Pillow raises many types; its message says "truncated"
            truncated = "truncated" in str(err).lower()
            raise BadSample(
                Reason.TRUNCATED_IMAGE if truncated else Reason.UNDECODABLE_IMAGE
            ) from None
        return image.convert("RGB")

    def _text(self, sample: dict[str, Any], policy: str) -> str:
        if policy == "raw":
            value = sample.get(self.text_key)
        else:
            meta = self._json(sample)
            value = meta.get("long" if policy == "long" else policy.removeprefix("json:"))
            if isinstance(value, list):
                value = value[0] if value else None
        if value is None:
            raise BadSample(Reason.MISSING_CAPTION)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadSample(Reason.NON_UTF8_CAPTION) from None
        value = str(value).strip()
        if not value:
            raise BadSample(Reason.EMPTY_CAPTION)
        return value

    @staticmethod
    def _json(sample: dict[str, Any]) -> dict[str, Any]:
        try:
            meta = json.loads(sample.get("json") or b"{}")
        except ValueError:
            raise BadSample(Reason.MALFORMED_ROW) from None
        if not isinstance(meta, dict):
            raise BadSample(Reason.MALFORMED_ROW)
        return meta
