"""Run configuration: typed dataclasses + YAML files + dotted command-line overrides.

`load_config("configs/demo.yaml", ["train.lr=1e-3"])` merges the YAML and the overrides into the
schema below with OmegaConf (strict: unknown keys and wrong types are errors) and returns a
validated `Config`. Every component receives only its own slice (`cfg.data`, `cfg.train`, ...);
the slices and their own rules are in vlp.config_sections, the rules spanning slices here.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vlp.config_sections import (
    CAPTION_METHODS,
    EVAL_TYPES,
    Check,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    ProbeConfig,
    PrototypesConfig,
    RunConfig,
    SourceConfig,
    SubcaptionConfig,
    TermConfig,
    TrainConfig,
    finite_checks,
    prefixed,
)

__all__ = [
    "CAPTION_METHODS",
    "EVAL_TYPES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GenerationConfig",
    "ModelConfig",
    "ProbeConfig",
    "PrototypesConfig",
    "RunConfig",
    "SourceConfig",
    "SubcaptionConfig",
    "TermConfig",
    "TrainConfig",
    "PACKAGED_CONFIGS",
    "config_files",
    "load_config",
    "objectives_schema",
    "to_dict",
    "to_yaml",
]


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
    """Each section's own rules under its key, then the rules that span sections."""
    sections = {"model": cfg.model, "data": cfg.data, "train": cfg.train,
                "checkpoint": cfg.checkpoint, "run": cfg.run}  # fmt: skip
    if cfg.prototypes.active(cfg.objectives):
        sections["prototypes"] = cfg.prototypes
    checks = [check for key, part in sections.items()
              for check in prefixed(key, part.checks())]  # fmt: skip
    checks += _objective_checks(cfg.objectives)
    checks += [check for name, entry in cfg.eval.items()
               for check in [("/" not in name, f"eval.{name}",
                              "a name without '/' (it prefixes the logs)"),
                             *prefixed(f"eval.{name}", entry.checks())]]  # fmt: skip
    checks += _cross_checks(cfg) + _prototype_checks(cfg) + _negative_checks(cfg)
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}")


def _objective_checks(objectives: Any) -> list[Check]:
    """Each term's section: a finite weight of 0 or more, and the term's own rules."""
    checks = [(bool(objectives.active()), "objectives", "at least one term with a non-zero weight")]
    for f in fields(objectives):
        term = getattr(objectives, f.name)
        own = [*finite_checks(term), (term.weight >= 0, "weight", "0 or more"), *term.checks()]
        checks += prefixed(f"objectives.{f.name}", own)
    return checks


def _cross_checks(cfg: Config) -> list[Check]:
    pairwise = cfg.objectives.uniformity.weight or cfg.objectives.cross_uniformity.weight
    return [
        (cfg.data.batch_size >= 2 or not pairwise, "data.batch_size",
         "at least 2 with objectives.uniformity or cross_uniformity (they compare pairs)"),
    ]  # fmt: skip


def _prototype_checks(cfg: Config) -> list[Check]:
    objectives = cfg.objectives
    if not cfg.prototypes.active(objectives):
        return []
    return [
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


def _negative_checks(cfg: Config) -> list[Check]:
    """Hard negatives are extra text slots that only the contrastive term reads as negatives."""
    negatives, objectives = cfg.data.hard_negatives, cfg.objectives
    checks = [
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


BASE_KEY = "base"
"""A config file's key naming the config it extends (`base: demo.yaml`)."""
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The configs installed with vlp: the demo's, the method demos', models/ and accelerate/. A
checkout shows them as configs/ too; a `base:` not found beside its file is looked up here."""


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

    A file's `base: OTHER.yaml` (relative to the file's folder, else among PACKAGED_CONFIGS) is
    loaded first and the file merged onto it: mappings merge key by key, anything else (lists
    included) is replaced.
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
    if not parent.is_file() and (PACKAGED_CONFIGS / base).is_file():
        parent = PACKAGED_CONFIGS / base
    if not parent.is_file():
        raise ConfigError(
            f"{path}: {BASE_KEY}: {parent}: no such config file (nor among vlp's own configs)"
        )
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
