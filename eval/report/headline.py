"""The report's first screen: each eval set's headline figures next to what chance scores."""

from __future__ import annotations

from eval.results import EvalResult
from eval.retrieval import TASK as RETRIEVAL
from eval.selection import TASK as SELECTION
from eval.zero_shot import TASK as CLASSIFICATION

Row = tuple[str, str, float, float]
"""(eval set, metric, achieved, chance)."""


def headline_section(results: list[EvalResult]) -> str | None:
    """A markdown table of the headline metric of every result that has a chance level."""
    rows = [row for result in results for row in _rows(result)]
    if not rows:
        return None
    table = ["| eval set | metric | achieved | chance |", "|---|---|---:|---:|"]
    table += [f"| {s} | {m} | {v:.3f} | {c:.3f} |" for s, m, v, c in rows]
    heading = "## Results at a glance\n\nA model that learned nothing scores the chance column."
    return f"{heading}\n\n" + "\n".join(table)


def _rows(result: EvalResult) -> list[Row]:
    metrics, details, name = result.metrics, result.details, result.dataset
    if result.task == CLASSIFICATION:
        return [(name, "zero-shot acc1", metrics["acc1"], 1 / details["num_classes"])]
    if result.task == RETRIEVAL:
        # A random ranking puts an image's own caption first with probability
        # captions-of-the-image / all captions = 1 / images, and the caption's image likewise.
        chance = 1 / details["num_images"]
        return [
            (name, label, metrics[key], chance)
            for label, key in (
                ("text→image R@1", "image_retrieval_recall@1"),
                ("image→text R@1", "text_retrieval_recall@1"),
            )
            if key in metrics
        ]
    if result.task == SELECTION and "num_negatives" in details:  # one set, not a mean of sets
        # Picking at random among an image's caption and its k negatives: 1 / (k + 1), with
        # the same k for every image (vlp-shard's binding sets have one negative each).
        images = details["num_images"]
        chance = images / (images + details["num_negatives"])
        return [(name, "caption selection acc", metrics["acc"], chance)]
    return []
