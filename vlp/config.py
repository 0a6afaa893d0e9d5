"""Run configuration: typed dataclasses + YAML files + dotted command-line overrides.

`load_config("configs/demo.yaml", ["train.lr=1e-3"])` merges the YAML and the overrides into the
schema below with OmegaConf (strict: unknown keys and wrong types are errors) and returns a
validated `Config`. Every component receives only its own slice (`cfg.data`, `cfg.train`, ...).
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vlp.runlayout import AUTO_TASK, EVAL_TASKS


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


@dataclass
class SourceConfig:
    shards: str = MISSING
    """Shard pattern of this source."""
    weight: float = 1.0
    """Relative share of the samples drawn from this source."""


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


@dataclass
class TermConfig:
    """The base of an objective term's own config section (`objectives.NAME`), which the term
    declares as its `Config`: a weight (0: the term is not built) and the term's own rules."""

    weight: float = 0.0

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, field, what it must be) for each rule of the section alone."""
        return []


def objectives_schema() -> type:
    """The `objectives` section: one field per registered term (vlp.objectives), typed by the
    term's `Config`, in registration order (the order the total adds them in)."""
    from vlp.objectives import OBJECTIVES  # importing it registers the terms; it imports this

    return _objectives_class(tuple((n, t.Config) for n, t in OBJECTIVES.entries().items()))


@functools.cache
def _objectives_class(sections: tuple[tuple[str, type], ...]) -> type:
    fields_ = [(name, section, field(default_factory=section)) for name, section in sections]
    return make_dataclass("ObjectivesConfig", fields_, namespace={"active": _active})


def _active(objectives: Any) -> dict[str, TermConfig]:
    """Terms with a non-zero weight, by name; a zero weight means the term is not built."""
    return {
        f.name: getattr(objectives, f.name)
        for f in fields(objectives)
        if getattr(objectives, f.name).weight
    }


def __getattr__(name: str) -> Any:
    """`ObjectivesConfig`: the objectives section's class as the registered terms make it."""
    if name == "ObjectivesConfig":
        return objectives_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    """How many of the newest checkpoints to keep (older ones are deleted)."""


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


def caption_checks(caption: GenerationConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, what it must be) for each rule a GenerationConfig must follow."""
    return [
        (caption.method in CAPTION_METHODS, "method", " or ".join(CAPTION_METHODS)),
        (caption.num_beams >= 1, "num_beams", "at least 1"),
        (caption.max_tokens >= 1, "max_tokens", "at least 1"),
        (0 <= caption.min_tokens <= caption.max_tokens, "min_tokens", "in [0, max_tokens]"),
        (caption.no_repeat_ngram == 0 or caption.no_repeat_ngram >= 2, "no_repeat_ngram",
         "0 (off) or at least 2"),
        (math.isfinite(caption.length_penalty), "length_penalty", "a finite number"),
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


def probe_checks(probe: ProbeConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, what it must be) for each rule a ProbeConfig must follow."""
    return [
        (0 < probe.val_proportion < 1, "val_proportion", "in (0, 1)"),
        (probe.epochs >= 1, "epochs", "at least 1"),
        (math.isfinite(probe.lr) and probe.lr > 0, "lr", "a positive number"),
        (probe.batch_size >= 1, "batch_size", "at least 1"),
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


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where accelerate sends the logged metrics besides metrics.jsonl: tensorboard (in the run
    directory) and/or wandb (needs `pip install wandb`; project = the run directory's name)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objectives: Any = field(default_factory=lambda: objectives_schema()())
    """One section per registered objective term (objectives_schema)."""
    prototypes: PrototypesConfig = field(default_factory=PrototypesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: dict[str, EvalConfig] = field(default_factory=dict)
    """Evaluators during training, by name: `eval.shapes: {dataset: DIR, every_steps: 100}`."""
    resume: str | None = None
    """latest (the newest complete checkpoint in run.output_dir, if any) or a checkpoint path."""

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.data.mode in ("epoch", "resampled"), "data.mode", "epoch or resampled"),
        (cfg.train.precision in ("fp32", "bf16"), "train.precision", "fp32 or bf16"),
        (cfg.data.batch_size >= 1, "data.batch_size", "at least 1"),
        (cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "at least 1"),
        (
            cfg.data.batch_size >= 2
            or not (cfg.objectives.uniformity.weight or cfg.objectives.cross_uniformity.weight),
            "data.batch_size",
            "at least 2 with objectives.uniformity or cross_uniformity (they compare pairs)",
        ),
        (cfg.data.workers >= 0, "data.workers", "0 or more"),
        (cfg.train.steps >= 1, "train.steps", "at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "at least 1"),
        (cfg.train.threads >= 0, "train.threads", "0 (automatic) or more"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", "0 or more"),
        (cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "at least 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep", "at least 1"),
        (
            cfg.data.caption in ("raw", "long", "subcaptions")
            or cfg.data.caption.startswith("json:"),
            "data.caption",
            "raw, long, subcaptions or json:FIELD",
        ),
        *_subcaption_checks(cfg),
        (cfg.data.decoder_caption in ("raw", "long"), "data.decoder_caption", "raw or long"),
        (bool(cfg.objectives.active()), "objectives", "at least one term with a non-zero weight"),
        *_number_checks(cfg),
        *_term_checks(cfg.objectives),
        (
            bool(cfg.data.train_shards) != bool(cfg.data.sources),
            "data.train_shards",
            "set (or data.sources instead, not both)",
        ),
        (all(s.weight > 0 for s in cfg.data.sources), "data.sources", "positive weights"),
        (
            set(cfg.run.trackers) <= {"tensorboard", "wandb"},
            "run.trackers",
            f"a list of tensorboard and/or wandb, not {list(cfg.run.trackers)}",
        ),
        *_eval_checks(cfg.eval),
        *_prototype_checks(cfg),
        *_negative_checks(cfg),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}")


def _number_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """Every float finite (nan and inf parse as floats) and the ranges the optimizer needs."""
    terms = {
        f"objectives.{f.name}": getattr(cfg.objectives, f.name) for f in fields(cfg.objectives)
    }
    slices = {"train": cfg.train, **terms}
    floats = [
        (f"{section}.{f.name}", getattr(part, f.name))
        for section, part in slices.items()
        for f in fields(part)
        if isinstance(getattr(part, f.name), float)
    ]
    floats += [(f"data.sources.{i}.weight", s.weight) for i, s in enumerate(cfg.data.sources)]
    train = cfg.train
    return (
        [(math.isfinite(value), key, f"a finite number, not {value}") for key, value in floats]
        + [
            (train.lr > 0, "train.lr", f"positive, not {train.lr}"),
            (0 <= train.min_lr <= train.lr, "train.min_lr", f"in [0, train.lr={train.lr}]"),
            (train.weight_decay >= 0, "train.weight_decay", "0 or more"),
            (0 <= train.beta1 < 1 and 0 <= train.beta2 < 1, "train.beta1/beta2", "in [0, 1)"),
            (train.eps > 0, "train.eps", "positive"),
            (train.grad_clip >= 0, "train.grad_clip", "0 (off) or more"),
            (0 <= train.seed < 2**32, "train.seed", f"in [0, 2**32), not {train.seed}"),
        ]
        + [(term.weight >= 0, f"{key}.weight", "0 or more") for key, term in terms.items()]
    )


def _term_checks(objectives: Any) -> list[tuple[bool, str, str]]:
    """Each objective section's own rules (TermConfig.checks), under its full key."""
    return [
        (ok, f"objectives.{f.name}.{key}", what)
        for f in fields(objectives)
        for ok, key, what in getattr(objectives, f.name).checks()
    ]


def _subcaption_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    sub = cfg.data.subcaptions
    return [
        (sub.num >= 1, "data.subcaptions.num", "at least 1"),
        (
            sub.splitter in ("dreamlip", "sentence"),
            "data.subcaptions.splitter",
            "dreamlip or sentence",
        ),
        (sub.merge >= 1, "data.subcaptions.merge", "at least 1"),
    ]


def _prototype_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    protos, objectives = cfg.prototypes, cfg.objectives
    if not protos.active(objectives):
        return []
    return [
        (protos.episode_shards >= 1, "prototypes.episode_shards", "at least 1"),
        (protos.episode_steps >= 0, "prototypes.episode_steps", "0 (from sizes.json) or more"),
        (protos.clusters >= 1, "prototypes.clusters", "at least 1"),
        (protos.kmeans_iters >= 1, "prototypes.kmeans_iters", "at least 1"),
        (protos.kmeans_redo >= 1, "prototypes.kmeans_redo", "at least 1"),
        (
            protos.kmeans_backend in ("auto", "faiss", "torch"),
            "prototypes.kmeans_backend",
            "auto, faiss or torch",
        ),
        (protos.head_hidden >= 1 and protos.head_dim >= 1, "prototypes.head_dim", "at least 1"),
        (protos.head_layers >= 0, "prototypes.head_layers", "0 or more"),
        (protos.warmup_episodes >= 0, "prototypes.warmup_episodes", "0 or more"),
        (protos.lit_episodes >= 0, "prototypes.lit_episodes", "0 or more"),
        (protos.feature_batch_size >= 0, "prototypes.feature_batch_size", "0 or more"),
        (protos.max_logit_scale >= 1, "prototypes.max_logit_scale", "at least 1"),
        (
            not objectives.prototype_external.weight or objectives.prototype.back_translation,
            "objectives.prototype.back_translation",
            "true when objectives.prototype_external is on (its prototypes are back-translated)",
        ),
        (
            not cfg.data.sources,
            "data.sources",
            "empty with objectives.prototype (episodes read one shard set: use data.train_shards)",
        ),
    ]


def _negative_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """Hard negatives are extra text slots that only the contrastive term reads as negatives."""
    negatives, objectives = cfg.data.hard_negatives, cfg.objectives
    checks = [
        (negatives >= 0, "data.hard_negatives", "0 (off) or more"),
        (
            cfg.data.batch_size >= 2 or negatives > 0 or not objectives.contrastive.decoupled,
            "data.batch_size",
            "at least 2 with objectives.contrastive.decoupled (or use data.hard_negatives)",
        ),
    ]
    if negatives <= 0:
        return checks
    return checks + [
        (
            cfg.data.caption == "raw",
            "data.caption",
            "raw with data.hard_negatives (the sidecar's negatives belong to the .txt caption)",
        ),
        (
            objectives.contrastive.weight > 0,
            "objectives.contrastive.weight",
            "non-zero with data.hard_negatives (only the contrastive term uses them)",
        ),
        (
            not (objectives.multi_positive.weight or objectives.subcaption_grouping.weight),
            "data.hard_negatives",
            "0 with objectives.multi_positive or subcaption_grouping (they would read the "
            "negatives as sub-captions)",
        ),
    ]


def _eval_checks(evaluators: dict[str, EvalConfig]) -> list[tuple[bool, str, str]]:
    checks = []
    for name, entry in evaluators.items():
        types = ", ".join(EVAL_TYPES[:-1]) + f" or {EVAL_TYPES[-1]}, not {entry.type!r}"
        checks += [
            ("/" not in name, f"eval.{name}", "a name without '/' (it prefixes the logs)"),
            (entry.type in EVAL_TYPES, f"eval.{name}.type", types),
            (entry.every_steps >= 0, f"eval.{name}.every_steps", "0 (at the end only) or more"),
            (entry.batch_size >= 1, f"eval.{name}.batch_size", "at least 1"),
            (entry.workers >= 0, f"eval.{name}.workers", "0 or more"),
        ]
        checks += [(ok, f"eval.{name}.caption.{key}", what)
                   for ok, key, what in caption_checks(entry.caption)]  # fmt: skip
        checks += [(ok, f"eval.{name}.probe.{key}", what)
                   for ok, key, what in probe_checks(entry.probe)]  # fmt: skip
    return checks


BASE_KEY = "base"
"""A config file's key naming the config it extends (`base: demo.yaml`)."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema <- YAML file <- `key=value` overrides; raise ConfigError on any mistake."""
    schema = OmegaConf.structured(Config)
    merged = schema
    for file, layer in _file_layers(Path(path)) if path is not None else []:
        _drop_evaluators(merged, layer)
        merged = _merge(merged, layer, "", schema, prefix=f"{file}: ")
    for item in _check_overrides(overrides):  # one at a time: an error names its override
        merged = _merge(merged, _parse_override(item), item.partition("=")[0], schema)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # resolving an interpolation may fail without a key: blame the overrides that have one
        suspects = [item.partition("=")[0] for item in overrides if "${" in item]
        raise ConfigError(_explain(err, schema, ", ".join(suspects) or str(path))) from None


def config_files(path: Path) -> list[Path]:
    """The config file and the bases it names (`base: FILE`), the first base first."""
    return [file for file, _ in _file_layers(path)]


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """(file, YAML without its `base` key) for `path` and its bases, the first base first.

    A file's `base: OTHER.yaml` (relative to the file's folder) is loaded first and the file
    merged onto it: mappings merge key by key, anything else (lists included) is replaced.
    """
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: {BASE_KEY}: the configs name each other in a cycle ({cycle})")
    layer = _read_yaml(path)
    base = layer.pop(BASE_KEY, None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [(path, layer)]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY}: must name a config file, got {base!r}")
    parent = path.parent / base
    if not parent.is_file():
        raise ConfigError(f"{path}: {BASE_KEY}: {parent}: no such config file")
    return [*_file_layers(parent, (*chain, path.resolve())), (path, layer)]


def _drop_evaluators(merged: DictConfig, layer: Any) -> None:
    """`eval.NAME: null` in a file removes the evaluator NAME that its bases define."""
    evaluators = layer.get("eval") if isinstance(layer, DictConfig) else None
    if not isinstance(evaluators, DictConfig):
        return
    for name in [name for name, value in evaluators.items() if value is None]:
        del evaluators[name]
        if name in merged.eval:
            del merged.eval[name]


def _parse_override(item: str):
    try:
        return OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # e.g. a value of '[' or a tab
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"override {item!r}: not a valid key=value ({first})") from None


def _merge(base, layer, where: str, schema, prefix: str = ""):
    """`where`: the override's key; `prefix` names the file a layer came from."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise ConfigError(prefix + _explain(err, schema, where)) from None
    except TypeError as err:  # OmegaConf merging into a list node by index, e.g. x.0.y=1
        raise ConfigError(f"{prefix}{where}: {err} (set the whole list: key=[...])") from None


def _read_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors have many types
        first = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None


def _check_overrides(overrides) -> list[str]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
    return list(overrides)


def _explain(err: OmegaConfBaseException, schema, where: str = "") -> str:
    """One line naming the key; for unknown keys, the nearest valid one."""
    key = getattr(err, "full_key", None) or where
    message = str(err).splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return f"{key}: required, but not set"
    if "not in struct" in message or "Key '" in message and "not" in message:
        valid = _all_keys(OmegaConf.to_container(schema, resolve=False)) + _eval_keys(key)
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"unknown config key {key!r}{hint}"
    return f"{key}: {message}" if key else message


def _eval_keys(key: str) -> list[str]:
    """The keys of the evaluator `key` belongs to (the schema's `eval` dict starts empty)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "eval":
        return []
    entry = OmegaConf.to_container(OmegaConf.structured(EvalConfig), resolve=False)
    return [f"eval.{parts[1]}.{name}" for name in entry]


def _all_keys(tree: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(tree, dict):
        for name, value in tree.items():
            path = f"{prefix}{name}"
            keys.append(path)
            keys.extend(_all_keys(value, path + "."))
    return keys


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
