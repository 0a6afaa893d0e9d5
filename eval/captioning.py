"""Captioning: a CoCa writes a caption for each image of a retrieval set, scored against the
image's captions (its `.txt` lines) with pycocoevalcap, as clip_benchmark's captioning task does.

Metric names are clip_benchmark's: `Bleu_1` ... `Bleu_4`, `ROUGE_L`, `CIDEr` (CIDEr-D), and
`METEOR` when asked for (its Java scorer takes half a minute to load its paraphrase table).
SPICE is left out: it downloads Stanford CoreNLP on first use. The PTB tokenizer that prepares
every caption runs in Java, so captioning needs a Java runtime.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from eval.datasets import EvalSet
from eval.errors import UsageError
from eval.models import PRECISIONS, EvalModel
from eval.options import EvalOptions
from eval.progress import progress
from eval.results import EvalResult
from eval.samples import read_batches
from vlp.generate import SpecialTokens, context_limit, generate

TASK = "captioning"
NUM_EXAMPLES = 5
"""Generated captions kept in a result's details (the first images of the set)."""


@dataclass
class CaptioningOutputs:
    """Generated captions and references, in set order (shard order, then order in the tar)."""

    keys: list[str]
    captions: list[str]
    references: list[list[str]]
    seconds: float
    """Wall time of decoding and generation."""


def special_tokens(model: EvalModel) -> SpecialTokens:
    """The start and end tokens of a model that can caption; a usage error for any other."""
    if not hasattr(model.module, "text_decoder"):
        raise UsageError(
            f"model {model.name!r} has no caption decoder; captioning needs a CoCa model "
            "(e.g. vlp-tiny-coca, coca_ViT-B-32)"
        )
    tokenizer = model.tokenizer
    start, end = (getattr(tokenizer, name, None) for name in ("sot_token_id", "eot_token_id"))
    if start is None or end is None or not hasattr(tokenizer, "decode"):
        raise UsageError(
            f"model {model.name!r}: captioning needs open_clip's CLIP tokenizer (start and end "
            f"tokens, decode), not {type(tokenizer).__name__}"
        )
    return SpecialTokens(start, end)


def generate_captions(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> CaptioningOutputs:
    """A caption (options.caption's decoding) for every image of a retrieval set."""
    special = special_tokens(model)
    limit = context_limit(model.module)
    if options.caption.max_tokens > limit:
        raise UsageError(
            f"max caption tokens {options.caption.max_tokens}: model {model.name!r} holds at "
            f"most {limit} (its context minus the start and end tokens)"
        )
    dtype = PRECISIONS[model.precision]
    positions, keys, captions, references = [], [], [], []
    started = time.perf_counter()
    batches = read_batches(dataset, model.preprocess, options.batch_size, options.workers)
    for batch in progress(batches, f"{dataset.name} captions", unit="batch"):
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            tokens = generate(model.module, batch.images.to(model.device), special, options.caption)
        captions.extend(model.tokenizer.decode(row).strip() for row in tokens)
        positions.append(batch.positions)
        keys.extend(batch.keys)
        references.extend(batch.targets)
    seconds = time.perf_counter() - started
    # workers interleave batches: restore the set's order so results do not depend on them
    order = torch.cat(positions).argsort().tolist()
    return CaptioningOutputs(
        [keys[i] for i in order],
        [captions[i] for i in order],
        [references[i] for i in order],
        seconds,
    )


def caption_scores(
    captions: list[str], references: list[list[str]], meteor: bool = False
) -> dict[str, float]:
    """pycocoevalcap's corpus scores of `captions` (one per image) against their references.

    Both go through the PTB tokenizer first, exactly as in clip_benchmark's captioning task.
    """
    tokenizer, scorers = _scorers(meteor)
    ground_truth = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    results = {i: [{"caption": caption}] for i, caption in enumerate(captions)}
    # pycocoevalcap prints progress and BLEU's internals on stdout, where vlp-eval's tables go
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth, results = tokenizer.tokenize(ground_truth), tokenizer.tokenize(results)
        metrics: dict[str, float] = {}
        for names, scorer in scorers:
            score = scorer.compute_score(ground_truth, results)[0]
            scores = score if isinstance(score, list) else [score]
            metrics.update(zip(names, map(float, scores), strict=True))
    return metrics


def _scorers(meteor: bool) -> tuple[Any, list[tuple[tuple[str, ...], Any]]]:
    """The PTB tokenizer and [(metric names, scorer)]."""
    bleu, cider, meteor_scorer, rouge, ptb_tokenizer = _scorer_classes()
    scorers = [
        (("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), bleu(4)),
        (("ROUGE_L",), rouge()),
        (("CIDEr",), cider()),
    ]
    if meteor:
        scorers.append((("METEOR",), meteor_scorer()))
    return ptb_tokenizer(), scorers


def _scorer_classes() -> tuple[type, ...]:
    """pycocoevalcap's Bleu, Cider, Meteor, Rouge, PTBTokenizer; usage errors without Java or
    the library."""
    if shutil.which("java") is None:
        raise UsageError(
            "captioning metrics need Java (pycocoevalcap's PTB tokenizer runs in it): install a "
            "Java runtime, e.g. `apt-get install default-jre-headless`"
        )
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise UsageError(f"captioning metrics need pycocoevalcap ({err}): pip install "
                         "pycocoevalcap") from err  # fmt: skip
    return Bleu, Cider, Meteor, Rouge, PTBTokenizer


def captioning_result(
    dataset: EvalSet, outputs: CaptioningOutputs, options: EvalOptions
) -> EvalResult:
    """The metrics of the images that have references; examples and settings in details."""
    scored = [i for i, refs in enumerate(outputs.references) if refs]
    if not scored:
        raise UsageError(f"{dataset.root}: no image has a caption to compare with")
    metrics = caption_scores(
        [outputs.captions[i] for i in scored],
        [outputs.references[i] for i in scored],
        options.meteor,
    )
    examples = [
        {"key": key, "caption": caption, "references": refs}
        for key, caption, refs in zip(
            outputs.keys[:NUM_EXAMPLES], outputs.captions, outputs.references, strict=False
        )
    ]
    details = {
        "num_images": len(outputs.keys),
        "num_scored": len(scored),
        "decoding": asdict(options.caption),
        "generation_seconds": round(outputs.seconds, 3),
        "images_per_second": round(len(outputs.keys) / max(outputs.seconds, 1e-9), 1),
        "examples": examples,
        "dataset_root": str(dataset.root),
    }
    return EvalResult(dataset.name, TASK, metrics, details)


def evaluate_captioning(model: EvalModel, dataset: EvalSet, options: EvalOptions) -> EvalResult:
    _scorer_classes()  # no Java or pycocoevalcap: say so before generating anything
    return captioning_result(dataset, generate_captions(model, dataset, options), options)
