"""The report's captioning section: a CoCa's captions of a retrieval set, scored, with examples
(the image, the generated caption, the references) as a figure and a table."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from eval.captioning import captioning_result, generate_captions
from eval.datasets import EvalSet
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult
from eval.samples import read_images


@dataclass
class CaptionExample:
    key: str
    image: Image.Image
    caption: str
    references: list[str]


def captioning_sections(
    model: EvalModel, dataset: EvalSet, output_dir: Path, options: EvalOptions, num_examples: int
) -> tuple[list[EvalResult], list[str]]:
    """([its captioning result], [its section]) for a CoCa on a retrieval set; without Java a
    note instead (the rest of the report does not need it); nothing for other models or sets."""
    if dataset.kind != "retrieval" or not hasattr(model.module, "text_decoder"):
        return [], []
    if shutil.which("java") is None:
        note = "captions not generated: the captioning metrics need a Java runtime"
        return [], [
            f"### {dataset.name}: captions\n\n{note} (`apt-get install default-jre-headless`)."
        ]
    outputs = generate_captions(model, dataset, options)
    result = captioning_result(dataset, outputs, options)
    order = np.random.default_rng(options.seed).permutation(len(outputs.keys))
    picked = np.sort(order[: max(num_examples, 0)]).tolist()  # a seeded choice, in set order
    images = read_images(dataset, {outputs.keys[i] for i in picked})
    examples = [
        CaptionExample(outputs.keys[i], images[outputs.keys[i]], outputs.captions[i],
                       outputs.references[i])
        for i in picked
    ]  # fmt: skip
    decoding = ", ".join(f"{k} {v}" for k, v in asdict(options.caption).items())
    lines = [
        f"### {dataset.name}: generated captions",
        f"{len(outputs.keys)} images captioned in {outputs.seconds:.1f} s ({decoding}).",
    ]
    if examples:
        name = f"captions_{dataset.root.name}.png"
        plot_caption_examples(examples, output_dir / name)
        lines += [f"![generated captions]({name})", _table(examples)]
    return [result], ["\n\n".join(lines)]


def _table(examples: list[CaptionExample]) -> str:
    rows = ["| image | generated caption | references |", "|---|---|---|"]
    for example in examples:
        references = "<br>".join(_cell(r) for r in example.references)
        rows.append(f"| {example.key} | {_cell(example.caption)} | {references} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "(empty)"


def plot_caption_examples(examples: list[CaptionExample], path: Path) -> None:
    """One row per image: the image, then its generated caption above its references."""
    figure = Figure(figsize=(9, 1.9 * len(examples)), layout="constrained")
    for row, (image_ax, text_ax) in zip(
        examples, figure.subplots(len(examples), 2, squeeze=False, width_ratios=(1, 4)),
        strict=True,
    ):  # fmt: skip
        image_ax.imshow(row.image)
        image_ax.set_axis_off()
        text_ax.set_axis_off()
        generated = textwrap.fill(f"“{row.caption}”", width=90)
        references = "\n".join(["references:", *(textwrap.fill(r, 100) for r in row.references)])
        text_ax.text(0, 1, generated, va="top", fontsize=10, weight="bold",
                     transform=text_ax.transAxes)  # fmt: skip
        text_ax.text(0, 0.8, references, va="top", fontsize=7, color="0.35",
                     transform=text_ax.transAxes)  # fmt: skip
    figure.savefig(path, dpi=110)
