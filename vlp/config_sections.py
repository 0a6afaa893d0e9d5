"""The run config's sections: one typed dataclass per slice a component receives.

Each section states its own rules in `checks()`: (ok, field, what it must be) for each, about
the section alone, with field names relative to the section. `vlp.config` assembles the root
`Config`, prefixes each section's checks with its key, and adds the rules that span sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from importlib.util import find_spec
from typing import Any

from omegaconf import MISSING

from vlp.runlayout import AUTO_TASK, EVAL_TASKS

Check = tuple[bool, str, str]
"""(ok, key, what the key's value must be): a failed check becomes `key: must be WHAT`."""


class ConfigError(ValueError):
    """A user mistake in a config file or override; reported as one line, exit code 2."""


@dataclass
class ModelConfig:
    name: str = "vlp-tiny-coca"
    """An open_clip model config name; vlp's own live in configs/models/."""
    pretrained: str | None = None
    """An open_clip weights file to start from (safetensors or a weights-only torch file)."""
    hf_text_model: str | None = None
    """A local Hugging Face model folder used as the text tower (open_clip's hf_model_name)."""
    lock_image: bool = False
    """Freeze the image tower (LiT)."""
    lock_text: bool = False
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    config_dirs: list[str] = field(default_factory=list)
    """Extra folders of open_clip model config JSONs to register."""

    def checks(self) -> list[Check]:
        return [(bool(self.name), "name", "an open_clip model config name (configs/models/*.json)")]


@dataclass
class SourceConfig:
    shards: str = MISSING
    """Shard pattern of this source."""
    weight: float = 1.0
    """Relative share of the samples drawn from this source."""

    def checks(self) -> list[Check]:
        return [(math.isfinite(self.weight) and self.weight > 0, "weight", "a positive number")]


@dataclass
class SubcaptionConfig:
    """DreamLIP sub-captions (`data.caption=subcaptions`): T = num + 1 texts per image."""

    num: int = 6
    """Sub-captions sampled per image per load (K); slot 0 is always the raw caption."""
    splitter: str = "dreamlip"
    """dreamlip: split at every '.', newline and '</s>' (the reference rule, quirks included);
    sentence: sentence ends only (keeps decimals and abbreviations whole)."""
    merge: int = 1
    """Consecutive pool sentences joined (by '. ') into one sub-caption."""
    exclude_last: bool = False
    """Never draw the pool's last sentence (the reference code's off-by-one, for parity)."""

    def checks(self) -> list[Check]:
        return [
            (self.num >= 1, "num", "at least 1"),
            (self.splitter in ("dreamlip", "sentence"), "splitter", "dreamlip or sentence"),
            (self.merge >= 1, "merge", "at least 1"),
        ]


@dataclass
class DataConfig:
    train_shards: str = ""
    """Shard pattern: local path, brace pattern, or URL; '::' joins several patterns."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Instead of train_shards: several shard sets mixed by weight (each sample's source is
    drawn at random with these weights)."""
    batch_size: int = 64
    """Samples per process per micro-step (global batch = batch_size x processes)."""
    workers: int = 2
    """DataLoader worker processes per process (0 = read in the training process)."""
    mode: str = "epoch"
    """epoch: each pass visits every shard once in a seeded order; resampled: draw shards with
    replacement (infinite, any number of shards)."""
    shuffle_buffer: int = 2000
    """Samples shuffled together: whole shards are read until this many are pooled, then the pool
    is emitted in a seeded random order (exact resume re-reads at most one pool). A worker whose
    share of the data is smaller than this pools several passes over it."""
    image_key: str = "jpg;png;webp;jpeg"
    """Tar member extensions holding the image, first match wins."""
    text_key: str = "txt"
    caption: str = "raw"
    """raw: the .txt caption; long: the first long caption in the .json; json:FIELD: that field;
    subcaptions: the .txt caption plus sentences sampled from the .json's long captions."""
    subcaptions: SubcaptionConfig = field(default_factory=SubcaptionConfig)
    decoder_caption: str = "raw"
    """Target of the CoCa decoder: raw or long (the first long caption, truncated to context)."""
    hard_negatives: int = 0
    """Negative captions per image (NegCLIP): up to this many from the `.json` sidecar's
    `negatives` list, added as extra columns of objectives.contrastive's image->text side.
    Fewer in a sample: the rest are masked out; no `negatives` field: the sample is skipped
    (missing_negatives). 0: off."""

    def checks(self) -> list[Check]:
        return [
            (bool(self.train_shards) != bool(self.sources), "train_shards",
             "set (or data.sources instead, not both)"),
            *[c for i, s in enumerate(self.sources) for c in prefixed(f"sources.{i}", s.checks())],
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.workers >= 0, "workers", "0 or more"),
            (self.mode in ("epoch", "resampled"), "mode", "epoch or resampled"),
            (self.shuffle_buffer >= 1, "shuffle_buffer", "at least 1"),
            (self.caption in ("raw", "long", "subcaptions") or self.caption.startswith("json:"),
             "caption", "raw, long, subcaptions or json:FIELD"),
            *prefixed("subcaptions", self.subcaptions.checks()),
            (self.decoder_caption in ("raw", "long"), "decoder_caption", "raw or long"),
            (self.hard_negatives >= 0, "hard_negatives", "0 (off) or more"),
        ]  # fmt: skip


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    """AdamW decay for weight matrices; biases, norms, embeddings' scales and logit scales get 0."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_cache: bool = False
    """With grad_accum > 1: the contrastive loss sees all grad_accum micro-batches at once, as
    one large batch (GradCache: one more forward pass per micro-batch; docs/scaling.md)."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast; weights and optimizer state stay fp32)."""
    seed: int = 0
    compile: bool = False
    """torch.compile the model."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise-reproducible runs on CPU; slower on GPU)."""
    threads: int = 0
    """CPU runs: torch's intra-op threads per process; 0 = the cores this process may use ÷
    the processes on this node. OMP_NUM_THREADS is not read on CPU: `accelerate launch` and
    torchrun set it to 1 themselves, which would train on one core. GPU runs ignore it."""
    log_every_steps: int = 10
    peak_tflops: float | None = None
    """The device's peak TFLOP/s at train.precision, for the MFU in the logs; null: the bf16
    peak of a known GPU (vlp/throughput.py), else no MFU (tokens/s and TFLOP/s still logged)."""

    def checks(self) -> list[Check]:
        return [
            *finite_checks(self),
            (self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "positive or null"),
            (self.steps >= 1, "steps", "at least 1"),
            (self.lr > 0, "lr", f"positive, not {self.lr}"),
            (0 <= self.min_lr <= self.lr, "min_lr", f"in [0, train.lr={self.lr}]"),
            (self.warmup_steps >= 0, "warmup_steps", "0 or more"),
            (self.weight_decay >= 0, "weight_decay", "0 or more"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "in [0, 1)"),
            (self.eps > 0, "eps", "positive"),
            (self.grad_clip >= 0, "grad_clip", "0 (off) or more"),
            (self.grad_accum >= 1, "grad_accum", "at least 1"),
            (self.precision in ("fp32", "bf16"), "precision", "fp32 or bf16"),
            (0 <= self.seed < 2**32, "seed", f"in [0, 2**32), not {self.seed}"),
            (self.threads >= 0, "threads", "0 (automatic) or more"),
        ]


@dataclass
class TermConfig:
    """The base of an objective term's own config section (`objectives.NAME`), which the term
    declares as its `Config`: a weight (0: the term is not built) and the term's own rules."""

    weight: float = 0.0

    def checks(self) -> list[Check]:
        """(ok, field, what it must be) for each rule of the section alone."""
        return []


@dataclass
class PrototypesConfig:
    """Episodic training for objectives.prototype / prototype_external (ProtoCLIP).

    Episode e is a fixed set of `episode_shards` shards (a seeded permutation of all shards,
    without replacement until every shard was used). It starts with a feature pass over those
    shards (no gradient, eval mode, training transforms) and k-means of each modality's head
    outputs; its `episode_steps` training steps then read the same shards again."""

    episode_shards: int = 20
    episode_steps: int = 0
    """Optimizer steps per episode; 0: the samples of `episode_shards` average shards (from the
    shards' sizes.json) divided by the global batch."""
    clusters: int = 20000
    """k-means clusters per modality (and for the external teacher)."""
    kmeans_iters: int = 20
    kmeans_redo: int = 1
    """k-means runs from different seeds per clustering; the lowest objective is kept."""
    kmeans_backend: str = "auto"
    """faiss (CPU) | torch (Lloyd on the training device) | auto: torch on CUDA, else faiss."""
    head_hidden: int = 2048
    head_dim: int = 128
    head_layers: int = 1
    """Hidden [Linear, BatchNorm, ReLU] blocks of each head (0: one Linear)."""
    max_logit_scale: float = 100.0
    """Clamp of the prototype objectives' shared learnable temperature's scale."""
    warmup_episodes: int = 1
    """First episodes train with the other objectives only (no clustering)."""
    lit_episodes: int = 0
    """Last episodes freeze the image tower (its learning rate decays to 0 when they start) and
    train the other objectives only."""
    feature_batch_size: int = 0
    """Batch of the feature pass; 0: data.batch_size."""

    def active(self, objectives: Any) -> bool:
        return bool(objectives.prototype.weight or objectives.prototype_external.weight)

    def checks(self) -> list[Check]:
        """The section's rules; they apply only while a prototype objective is on."""
        return [
            (self.episode_shards >= 1, "episode_shards", "at least 1"),
            (self.episode_steps >= 0, "episode_steps", "0 (from sizes.json) or more"),
            (self.clusters >= 1, "clusters", "at least 1"),
            (self.kmeans_iters >= 1, "kmeans_iters", "at least 1"),
            (self.kmeans_redo >= 1, "kmeans_redo", "at least 1"),
            (self.kmeans_backend in ("auto", "faiss", "torch"), "kmeans_backend",
             "auto, faiss or torch"),
            (self.head_hidden >= 1 and self.head_dim >= 1, "head_dim", "at least 1"),
            (self.head_layers >= 0, "head_layers", "0 or more"),
            (self.warmup_episodes >= 0, "warmup_episodes", "0 or more"),
            (self.lit_episodes >= 0, "lit_episodes", "0 or more"),
            (self.feature_batch_size >= 0, "feature_batch_size", "0 or more"),
            (self.max_logit_scale >= 1, "max_logit_scale", "at least 1"),
        ]  # fmt: skip


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    """How many of the newest checkpoints to keep (older ones are deleted)."""

    def checks(self) -> list[Check]:
        return [
            (self.every_steps >= 1, "every_steps", "at least 1"),
            (self.keep >= 1, "keep", "at least 1"),
        ]


EVAL_TYPES = (AUTO_TASK, *EVAL_TASKS)
"""What `eval.NAME.type` may be: eval.tasks' names (vlp.runlayout; a test keeps them equal)."""
CAPTION_METHODS = ("greedy", "beam")


@dataclass
class GenerationConfig:
    """How a CoCa writes captions (vlp.generate): `vlp-eval --task captioning` and evaluators."""

    method: str = "greedy"
    """greedy (the most likely token at each step) | beam (beam search)."""
    num_beams: int = 4
    """Beams per image (beam search)."""
    max_tokens: int = 28
    """Most caption tokens, start and end tokens not counted (open_clip's seq_len of 30)."""
    min_tokens: int = 0
    """Fewest caption tokens before the end token is allowed."""
    no_repeat_ngram: int = 0
    """n >= 2: never repeat an n-gram within a caption; 0 = off."""
    length_penalty: float = 1.0
    """Beam search ranks finished captions by log-probability / (tokens + 1) ** this."""

    def checks(self) -> list[Check]:
        return [
            (self.method in CAPTION_METHODS, "method", " or ".join(CAPTION_METHODS)),
            (self.num_beams >= 1, "num_beams", "at least 1"),
            (self.max_tokens >= 1, "max_tokens", "at least 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "in [0, max_tokens]"),
            (self.no_repeat_ngram == 0 or self.no_repeat_ngram >= 2, "no_repeat_ngram",
             "0 (off) or at least 2"),
            (math.isfinite(self.length_penalty), "length_penalty", "a finite number"),
        ]  # fmt: skip


@dataclass
class ProbeConfig:
    """The linear probe (eval.linear_probe): clip_benchmark's protocol and defaults."""

    val_proportion: float = 0.2
    """Share of the train split held out to choose the weight decay."""
    epochs: int = 10
    lr: float = 0.1
    """AdamW learning rate (cosine schedule, no warm-up)."""
    batch_size: int = 64

    def checks(self) -> list[Check]:
        return [
            (0 < self.val_proportion < 1, "val_proportion", "in (0, 1)"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
        ]


@dataclass
class EvalConfig:
    """One evaluator run during training; its name in `eval.<name>` prefixes its logs."""

    dataset: str = MISSING
    """An eval set directory in clip_benchmark's layout (`vlp-shard eval-set` or `demo` write
    them). If it is missing or malformed at start-up, a warning says so and training runs
    without this evaluator."""
    type: str = "auto"
    """auto (from the set's dataset_type.txt) | zeroshot_classification | zeroshot_retrieval |
    geometry | captioning (CoCa; a retrieval set) | linear_probe (a classification set with a
    train/ split) | image_caption_selection (a set whose task.txt says so; auto picks it)."""
    every_steps: int = 0
    """Evaluate every this many optimizer steps; 0 = only at the end."""
    at_end: bool = True
    """Also evaluate after the last step (every_steps=0 with at_end=false switches it off)."""
    batch_size: int = 256
    """Images per forward pass."""
    workers: int = 0
    """DataLoader processes decoding the eval images (0 = in the training process)."""
    caption: GenerationConfig = field(default_factory=GenerationConfig)
    """captioning: how captions are generated."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """linear_probe: validation share, epochs, learning rate, batch."""

    def checks(self) -> list[Check]:
        types = ", ".join(EVAL_TYPES[:-1]) + f" or {EVAL_TYPES[-1]}, not {self.type!r}"
        return [
            (self.type in EVAL_TYPES, "type", types),
            (self.every_steps >= 0, "every_steps", "0 (at the end only) or more"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.workers >= 0, "workers", "0 or more"),
            *prefixed("caption", self.caption.checks()),
            *prefixed("probe", self.probe.checks()),
        ]


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where accelerate sends the logged metrics besides metrics.jsonl: tensorboard (in the run
    directory) and/or wandb (needs `pip install wandb`; project = the run directory's name)."""

    def checks(self) -> list[Check]:
        return [
            (set(self.trackers) <= {"tensorboard", "wandb"}, "trackers",
             f"a list of tensorboard and/or wandb, not {list(self.trackers)}"),
            ("wandb" not in self.trackers or find_spec("wandb") is not None, "trackers",
             "without wandb: wandb is not installed (`pip install wandb` to use it)"),
        ]  # fmt: skip


def finite_checks(section: Any) -> list[Check]:
    """Every float field finite (nan and inf parse as floats from YAML and overrides)."""
    values = [(f.name, getattr(section, f.name)) for f in fields(section)]
    return [(math.isfinite(v), name, f"a finite number, not {v}")
            for name, v in values if isinstance(v, float)]  # fmt: skip


def prefixed(prefix: str, checks: list[Check]) -> list[Check]:
    """`checks` with their keys under `prefix` (a section's key in the root config)."""
    return [(ok, f"{prefix}.{key}", what) for ok, key, what in checks]
