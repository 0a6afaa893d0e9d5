"""`vlp-eval --task captioning`: scores against clip_benchmark's scoring path (pycocoevalcap)
fed the same captions and references, the CLI, the report, the training evaluator, mistakes."""

from __future__ import annotations

import json
import math
import re
import shutil

import open_clip
import pytest
import torch
from evalkit import demo_eval_sets

from eval.captioning import caption_scores
from eval.cli import main
from vlp.config import GenerationConfig
from vlp.generate import SpecialTokens, generate
from vlp.model import new_clip, register_model_configs

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java"
)
MODEL = "vlp-tiny-coca"


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def special(tokenizer):
    return SpecialTokens(tokenizer.sot_token_id, tokenizer.eot_token_id)


# ---- metrics: clip_benchmark's scoring path, fed the same captions and references


def _demo_references(count: int) -> list[list[str]]:
    from data_tools.sources.demo import RetrievalEvalSource

    source = RetrievalEvalSource(count, image_size=16)
    return [source.read(i).caption for i in range(count)]


class _Generated(torch.nn.Module):
    """A model whose generate() returns given token rows, in the order clip_benchmark asks."""

    def __init__(self, rows: list[list[int]], special: SpecialTokens):
        super().__init__()
        self.rows, self.special = iter(rows), special

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        rows = [[self.special.start, *next(self.rows), self.special.end] for _ in images]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # 0 = open_clip pad
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out


class _NoScore:
    """Stands in for a scorer clip_benchmark always runs but this test leaves out."""

    def __init__(self, name: str):
        self.name = name

    def compute_score(self, gts, res):
        return math.nan, [math.nan] * len(res)

    def method(self) -> str:
        return self.name


def clip_benchmark_scores(monkeypatch, rows, references, special, meteor=False):
    """clip_benchmark's captioning.evaluate on token rows (SPICE, and METEOR unless asked for,
    replaced by stand-ins: SPICE downloads Stanford CoreNLP)."""
    from clip_benchmark.metrics import captioning

    monkeypatch.setattr(captioning, "Spice", lambda: _NoScore("SPICE"))
    if not meteor:
        monkeypatch.setattr(captioning, "Meteor", lambda: _NoScore("METEOR"))
    batches = [
        (torch.zeros(len(references[i : i + 16]), 1), references[i : i + 16])
        for i in range(0, len(references), 16)
    ]
    return captioning.evaluate(_Generated(rows, special), batches, 16, "cpu", None)


def _candidates(references: list[list[str]]) -> list[str]:
    """Captions that match their references in part: one word dropped, or another image's."""
    candidates = []
    for i, refs in enumerate(references):
        words = refs[0].split()
        candidates.append(" ".join(words[:2] + words[3:]) if i % 3 else references[i - 1][0])
    return candidates


@needs_java
def test_scores_agree_with_clip_benchmark(monkeypatch, tokenizer, special):
    references = _demo_references(40)
    rows = [tokenizer.encode(caption) for caption in _candidates(references)]
    theirs = clip_benchmark_scores(monkeypatch, rows, references, special)
    ours = caption_scores([tokenizer.decode(row).strip() for row in rows], references)
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    for name, value in ours.items():
        assert abs(value - theirs[name]) <= 0.001, (name, value, theirs[name])
    assert 0.1 < ours["Bleu_4"] < 0.9 and ours["CIDEr"] > 0.5  # neither degenerate nor perfect


@needs_java
@pytest.mark.slow
def test_meteor_agrees_with_clip_benchmark(monkeypatch, tokenizer, special):
    references = _demo_references(12)
    rows = [tokenizer.encode(caption) for caption in _candidates(references)]
    theirs = clip_benchmark_scores(monkeypatch, rows, references, special, meteor=True)
    ours = caption_scores([tokenizer.decode(r).strip() for r in rows], references, meteor=True)
    assert abs(ours["METEOR"] - theirs["METEOR"]) <= 0.001 and 0 < ours["METEOR"] < 1


# ---- vlp-eval --task captioning on a checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seeded tiny CoCa checkpoint (decoder projection initialised: vlp.model.new_clip)."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("coca") / "checkpoints" / "step_000000001"
    directory.mkdir(parents=True)
    register_model_configs()
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in new_clip(MODEL).state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    meta = {"step": 1, "config": {"model": {"name": MODEL}}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@needs_java
def test_vlp_eval_captioning_agrees_with_clip_benchmark(
    checkpoint, tmp_path_factory, tmp_path, monkeypatch, capsys, special
):
    from clip_benchmark.datasets.builder import build_dataset

    from eval.checkpoints import resolve_checkpoint
    from eval.models import load_model

    retrieval = demo_eval_sets(tmp_path_factory) / "retrieval"
    args = ["--checkpoint", checkpoint, "--dataset", retrieval, "--task", "captioning",
            "--max-caption-tokens", "8", "--output", tmp_path / "out.json"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert "### captioning" in capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["task"] == "captioning" and result["details"]["num_images"] == 40
    example = result["details"]["examples"][0]
    assert example["caption"] and example["references"]
    # clip_benchmark's own loader and scoring, fed the captions vlp generates for its images
    model = load_model(resolve_checkpoint(checkpoint), "cpu")
    dataset = build_dataset("wds/retrieval", root=str(retrieval), transform=model.preprocess,
                            split="test", download=False, task="captioning")  # fmt: skip
    pairs = list(torch.utils.data.DataLoader(dataset.batched(16), batch_size=None))
    config = GenerationConfig(max_tokens=8)
    rows = [row for images, _ in pairs for row in generate(model.module, images, special, config)]
    theirs = clip_benchmark_scores(monkeypatch, rows, [r for _, refs in pairs for r in refs],
                                   special)  # fmt: skip
    for name, value in result["metrics"].items():
        assert abs(value - theirs[name]) <= 0.001, (name, value, theirs[name])


@pytest.fixture
def fails(capsys):
    def run(*args) -> str:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("vlp-eval: error: "), err
        return err

    return run


def test_user_mistakes_are_one_line(checkpoint, tmp_path_factory, fails, monkeypatch):
    from evalkit import tiny_run

    retrieval = demo_eval_sets(tmp_path_factory) / "retrieval"
    base = ["--dataset", retrieval, "--task", "captioning"]
    err = fails("--checkpoint", tiny_run(tmp_path_factory), *base)
    assert "has no caption decoder; captioning needs a CoCa model" in err
    err = fails("--checkpoint", checkpoint, *base, "--max-caption-tokens", 31)
    assert "max caption tokens 31: model 'vlp-tiny-coca' holds at most 30" in err
    assert "--num-beams 0: must be at least 1" in fails("--checkpoint", checkpoint, *base,
                                                        "--num-beams", 0)  # fmt: skip
    err = fails("--checkpoint", checkpoint, *base, "--no-repeat-ngram", 1)
    assert "--no-repeat-ngram 1: must be 0 (off) or at least 2" in err
    shapes = retrieval.parent / "shapes"
    err = fails("--checkpoint", checkpoint, "--dataset", shapes, "--task", "captioning")
    assert "task captioning needs a retrieval set" in err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    err = fails("--checkpoint", checkpoint, *base, "--max-caption-tokens", 2)
    assert "captioning metrics need Java" in err and "default-jre-headless" in err


def test_report_shows_generated_captions(checkpoint, tmp_path_factory, tmp_path, monkeypatch):
    retrieval = demo_eval_sets(tmp_path_factory) / "retrieval"
    run = checkpoint.parent.parent
    args = ["report", run, "--dataset", retrieval, "--output", tmp_path / "report",
            "--max-caption-tokens", "4", "--examples", "2"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "### wds/retrieval: generated captions" in report and "### captioning" in report
    assert (tmp_path / "report" / "captions_retrieval.png").stat().st_size > 0
    result = json.loads((tmp_path / "report" / "results" / "retrieval_captioning.json").read_text())
    for example in result["details"]["examples"][:1]:
        if example["key"] in report:  # the table lists the seeded choice of images
            assert example["caption"] in report
    assert report.count("| image | generated caption | references |") == 1
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no Java: a note, not a failure
    assert main([str(a) for a in args]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "captions not generated: the captioning metrics need a Java runtime" in report


def test_training_evaluator_logs_scores_and_prints_captions(checkpoint, tmp_path_factory):
    from eval.checkpoints import resolve_checkpoint
    from eval.during_training import open_evaluators
    from eval.models import load_model
    from vlp.config import EvalConfig

    retrieval = demo_eval_sets(tmp_path_factory) / "retrieval"
    caption = GenerationConfig(max_tokens=4)
    configs = {"cap": EvalConfig(dataset=str(retrieval), type="captioning", caption=caption)}
    messages: list[str] = []
    evaluators = open_evaluators(configs, 3, messages.append)
    record = evaluators.run(3, load_model(resolve_checkpoint(checkpoint), "cpu"))
    assert {"eval/cap/Bleu_4", "eval/cap/CIDEr", "eval/cap/ROUGE_L"} <= record.keys()
    assert messages[0].startswith("eval cap at step 3: Bleu_4 ")
    assert messages[1].startswith("  000000000: “") and "(references: a " in messages[1]


def test_config_mistakes_in_caption_settings_name_the_key():
    from vlp.config import ConfigError, load_config

    base = ["data.train_shards=x.tar", "eval.c.dataset=sets/c", "eval.c.type=captioning"]
    for override, message in (
        ("eval.c.caption.num_beams=0", "eval.c.caption.num_beams: must be at least 1"),
        ("eval.c.caption.method=sample", "eval.c.caption.method: must be greedy or beam"),
        ("eval.c.probe.val_proportion=0", "eval.c.probe.val_proportion: must be in (0, 1)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [*base, override])
    cfg = load_config(None, [*base, "eval.c.caption.method=beam", "eval.c.caption.num_beams=5"])
    assert cfg.eval["c"].caption == GenerationConfig(method="beam", num_beams=5)
