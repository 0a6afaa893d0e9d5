"""`vlp-eval report`: report.md with PNG figures for a training run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import is_run_dir, resolve_checkpoint
from eval.datasets import EvalSet, open_eval_set
from eval.errors import UsageError
from eval.models import EvalModel, load_model
from eval.options import EvalOptions
from eval.report.captions import captioning_sections
from eval.report.curves import eval_panels, plot_panels, read_metrics, training_panels
from eval.report.figures import (
    RetrievalExample,
    plot_confusion,
    plot_gap_projection,
    plot_retrieval_examples,
)
from eval.report.headline import headline_section
from eval.results import EvalResult, markdown_tables, write_result
from eval.retrieval import (
    RetrievalOutputs,
    exact_ranks,
    retrieval_result,
    run_zeroshot_retrieval,
    top_matches,
)
from eval.samples import read_images
from eval.selection import overall_results, run_selection, selection_result
from eval.zero_shot import classification_result, run_zeroshot_classification
from vlp.runlayout import METRICS_FILE

REPORT_FILE = "report.md"
TOP_IMAGES = 5


def write_report(
    run_dir: Path,
    datasets: list[Path],
    output_dir: Path,
    checkpoint: Path | None = None,
    model_name: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    options: EvalOptions | None = None,
    num_examples: int = 4,
) -> Path:
    """Write output_dir/report.md (+ PNGs and results/*.json); return its path.

    Curves come from run_dir/metrics.jsonl; each dataset is evaluated with `checkpoint`
    (default: the run's latest complete checkpoint).
    """
    options = options or EvalOptions()
    metrics_file = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    if not metrics_file.is_file() and not datasets:
        raise UsageError(f"{metrics_file}: missing, and no --dataset given: nothing to report")
    eval_sets = [open_eval_set(d) for d in datasets]
    ref = None
    if eval_sets:
        if checkpoint is None and not is_run_dir(run_dir):
            raise UsageError(f"{run_dir}: no checkpoints/ folder; pass --checkpoint PATH")
        ref = resolve_checkpoint(checkpoint or run_dir, model_name)
    output_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# Run report: {run_dir}\n\nWritten {time.strftime('%Y-%m-%d %H:%M')}."]
    if metrics_file.is_file():
        sections.extend(_training_sections(metrics_file, output_dir))
    if ref is not None:
        model = load_model(ref, device, precision)
        evaluated, results = _evaluation_sections(
            model, eval_sets, output_dir, options, num_examples
        )
        headline = headline_section(results)
        sections[1:1] = [headline] if headline else []  # the first screen, before the curves
        sections.extend(evaluated)
    path = output_dir / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def _training_sections(metrics_file: Path, output_dir: Path) -> list[str]:
    records, unreadable = read_metrics(metrics_file)
    skipped = f" ({unreadable} unreadable lines skipped)" if unreadable else ""
    sections = [f"## Training\n\n{len(records)} records in `{metrics_file}`{skipped}."]
    for name, panels, title in (
        ("training.png", training_panels(records), "Training"),
        ("eval_curves.png", eval_panels(records), "Evaluation during training"),
    ):
        if panels:
            plot_panels(records, panels, title, output_dir / name)
            sections.append(f"![{title}]({name})")
    return sections


def _evaluation_sections(
    model: EvalModel,
    eval_sets: list[EvalSet],
    output_dir: Path,
    options: EvalOptions,
    num_examples: int,
) -> tuple[list[str], list[EvalResult]]:
    """The evaluation sections, and every result they report."""
    step = f"step {model.step}" if model.step is not None else "weights"
    figures, results = [], []
    for dataset in eval_sets:
        result, section = _SECTIONS[dataset.kind](model, dataset, output_dir, options, num_examples)
        write_result(
            output_dir / "results" / f"{dataset.root.name}_{result.task}.json",
            result, model.name, model.pretrained,
        )  # fmt: skip
        results.append(result)
        figures.append(section)
        captioned, sections = captioning_sections(model, dataset, output_dir, options, num_examples)
        for result in captioned:  # a CoCa's captions of a retrieval set
            write_result(
                output_dir / "results" / f"{dataset.root.name}_{result.task}.json",
                result, model.name, model.pretrained,
            )  # fmt: skip
        results += captioned
        figures += sections
    for result in overall_results(results):  # the mean of several selection sets of a directory
        write_result(
            output_dir / "results" / f"{result.dataset.removeprefix('wds/')}_{result.task}.json",
            result, model.name, model.pretrained,
        )  # fmt: skip
        results.append(result)
    header = f"## Evaluation of {model.name} ({step}: `{model.pretrained}`)"
    return [header, markdown_tables(results).rstrip(), *figures], results


def _classification_section(
    model: EvalModel, dataset: EvalSet, output_dir: Path, options: EvalOptions, _: int
) -> tuple[EvalResult, str]:
    outputs = run_zeroshot_classification(model, dataset, options)
    result = classification_result(dataset, outputs)
    name = f"confusion_{dataset.root.name}.png"
    title = f"{dataset.name}: zero-shot acc1 = {outputs.scores.acc1:.3f}"
    plot_confusion(outputs.labels, outputs.scores.predictions, dataset.classnames, title,
                   output_dir / name)  # fmt: skip
    return result, f"### {dataset.name}: confusion matrix\n\n![confusion matrix]({name})"


def _retrieval_section(
    model: EvalModel, dataset: EvalSet, output_dir: Path, options: EvalOptions, num_examples: int
) -> tuple[EvalResult, str]:
    outputs = run_zeroshot_retrieval(model, dataset, options)
    result = retrieval_result(dataset, outputs, options)
    stem = dataset.root.name
    plot_gap_projection(*outputs.first_caption_pairs(), result.metrics["gap"],
                        output_dir / f"gap_{stem}.png", options.seed)  # fmt: skip
    lines = [
        f"### {dataset.name}: modality gap",
        f"![modality gap](gap_{stem}.png)",
    ]
    examples = _retrieval_examples(dataset, outputs, num_examples, options.seed)
    if examples:
        plot_retrieval_examples(examples, output_dir / f"retrieval_{stem}.png")
        lines += [
            f"### {dataset.name}: caption → image examples",
            f"Top {TOP_IMAGES} images per caption; its own image is framed green.",
            f"![retrieval examples](retrieval_{stem}.png)",
        ]
    return result, "\n\n".join(lines)


def _retrieval_examples(
    dataset: EvalSet, outputs: RetrievalOutputs, count: int, seed: int
) -> list[RetrievalExample]:
    """`count` captions (seeded choice): each with its top images and its own image's rank."""
    if count <= 0 or not outputs.captions:
        return []
    picked = np.sort(np.random.default_rng(seed).permutation(len(outputs.captions))[:count])
    queries = outputs.text_embeddings[picked]
    owners = outputs.text_to_image[picked]
    top = top_matches(queries, outputs.images.embeddings, TOP_IMAGES)  # (count, 5)
    ranks = exact_ranks(queries, outputs.images.embeddings, (torch.arange(len(picked)), owners))
    keys = outputs.images.keys
    images = read_images(dataset, {keys[i] for i in top.flatten().tolist() + owners.tolist()})
    return [
        RetrievalExample(
            caption=outputs.captions[caption],
            top=[(images[keys[i]], i == owner) for i in row],
            target=images[keys[owner]],
            rank=rank,
        )
        for caption, row, owner, rank in zip(
            picked.tolist(), top.tolist(), owners.tolist(), ranks.tolist(), strict=True
        )
    ]


def _selection_section(
    model: EvalModel, dataset: EvalSet, output_dir: Path, options: EvalOptions, num_examples: int
) -> tuple[EvalResult, str]:
    """The first `num_examples` items: each caption with its score, the true one first."""
    outputs = run_selection(model, dataset, options)
    lines = [
        f"### {dataset.name}: image-caption selection examples",
        "",
        "| image | true caption (score) | negatives (score) | hit |",
        "|---|---|---|---|",
    ]
    for key, captions, scores, hit in list(
        zip(outputs.keys, outputs.captions, outputs.scores, outputs.hits.tolist(), strict=True)
    )[:num_examples]:
        cells = [f"{c} ({s:.3f})" for c, s in zip(captions, scores, strict=True)]
        lines.append(
            f"| {key} | {cells[0]} | {'<br>'.join(cells[1:])} | {'yes' if hit else 'no'} |"
        )
    return selection_result(dataset, outputs), "\n".join(lines)


_SECTIONS: dict[str, Callable[..., tuple[EvalResult, str]]] = {
    "classification": _classification_section,
    "retrieval": _retrieval_section,
    "image_caption_selection": _selection_section,
}
"""Report section per dataset kind (dataset_type.txt)."""
