"""Study files: a base run config, variants of it, seeds and eval sets (docs/study.md).

    config: configs/gap_demo.yaml         # the base run config (required)
    overrides: [train.steps=120]          # every run
    groups:                               # optional: every variant runs in every group, and is
      d32: [model.name=...]               # compared within it; a list of such mappings is
      d64: [model.name=...]               # their product (names joined by '-')
    variants: {CLIP: [], CUA: [objectives.uniformity.weight=1, ...]}   (required)
    baseline: CLIP                        (required: a variant)
    seeds: [0, 1, 2]                      (required: train.seed; runs with one seed are paired)
    eval: {shapes: {dataset: DIR, every_steps: 30}}   # replace the base config's evaluators
    score: {probe: ["{python}", script, "{run_dir}", "{output}"]}   # once per finished run
    prepare: [["{python}", "-m", "data_tools", "demo", "data/demo"]]  # before the runs
    headline: [shapes/acc1]               # the summary table's metrics (default: all)
    output_dir: runs/studies/NAME         # default: runs/studies/<file stem>
    results_dir: bench/results/studies/NAME   # optional: copies of study.json, .md, figures

Every mistake is a StudyError: one line naming the file and key, exit code 2. Nothing here
imports torch, so a study file is checked in a moment.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlp.config import Config, ConfigError, config_files, load_config

REQUIRED = ("config", "variants", "baseline", "seeds")
OPTIONAL = ("overrides", "groups", "eval", "score", "prepare", "headline")
LOCATIONS = ("output_dir", "results_dir")
"""Where a study's files go: not part of what the study is, so moving them is no change."""
SET_BY_STUDY = ("train.seed", "train.threads", "run.output_dir", "resume")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+]*")
"""Group, variant, evaluator and score names: they become directory names and table labels."""


class StudyError(ValueError):
    """A mistake in a study file or its study directory: one line for the user, exit 2."""


@dataclass(frozen=True)
class Run:
    """One training run of the study: a variant of the base config in a group, with a seed."""

    group: str
    """"" when the study has no groups."""
    variant: str
    seed: int
    overrides: tuple[str, ...]
    """Everything on top of the base config except train.threads (set per --jobs)."""
    run_dir: Path
    config: Config
    """The run's resolved config (train.threads left at its default)."""

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.group, self.variant, f"seed {self.seed}") if p)

    @property
    def samples_per_step(self) -> int:
        """Samples one optimizer step consumes: a study runs each run as one process."""
        return self.config.data.batch_size * self.config.train.grad_accum


@dataclass(frozen=True)
class Study:
    path: Path
    config: Path
    baseline: str
    variants: dict[str, list[str]]
    groups: dict[str, list[str]]
    """{"": []} when the study file has none."""
    seeds: list[int]
    scores: dict[str, list[str]]
    prepare: list[list[str]]
    headline: list[str]
    output_dir: Path
    results_dir: Path | None
    record: dict[str, Any]
    """What the study is (the file's values less its locations, and a hash of the base config's
    values): a study directory accepts only the record it was started with."""
    runs: list[Run]
    """Seed by seed, and within a seed group by group, variants in file order: a run cut
    short leaves whole seeds behind it, and machine drift favours no variant."""


def load_study(path: Path, output_dir: Path | None = None) -> Study:
    """Read and check a study file; every run's config is resolved (and so checked) here."""
    raw = _read(path)
    where = f"{path}: "
    _check_keys(raw, where)
    config = Path(_string(raw["config"], where + "config"))
    if not config.is_file():
        raise StudyError(f"{where}config: {config}: no such run config file")
    variants = _named_overrides(raw["variants"], where + "variants")
    baseline = _string(raw["baseline"], where + "baseline")
    if baseline not in variants:
        raise StudyError(f"{where}baseline: {baseline!r} is not a variant ({', '.join(variants)})")
    seeds = _seeds(raw["seeds"], where + "seeds")
    groups = _groups(raw.get("groups"), where + "groups")
    common = _overrides(raw.get("overrides", []), where + "overrides")
    try:
        base = load_config(config)
    except ConfigError as err:
        raise StudyError(f"{where}config: {err}") from None
    evals = _eval_overrides(raw.get("eval"), list(base.eval), where + "eval")
    output = output_dir or Path(raw.get("output_dir") or Path("runs/studies") / path.stem)
    record = {k: v for k, v in raw.items() if k not in LOCATIONS}
    record["config_sha256"] = _content_hash(config)
    record = json.loads(json.dumps(record, default=str))  # as the study directory stores it
    runs = [
        _run(config, [*common, *evals, *groups[g], *variants[v]], g, v, seed, output, where)
        for seed in seeds
        for g in groups
        for v in variants
    ]
    results = raw.get("results_dir")
    return Study(
        path=path,
        config=config,
        baseline=baseline,
        variants=variants,
        groups=groups,
        seeds=seeds,
        scores=_commands(raw.get("score", {}), where + "score", named=True),
        prepare=_commands(raw.get("prepare", []), where + "prepare", named=False),
        headline=[_string(h, where + "headline") for h in raw.get("headline", [])],
        output_dir=output,
        results_dir=Path(_string(results, where + "results_dir")) if results else None,
        record=record,
        runs=runs,
    )


def _content_hash(config: Path) -> str:
    """SHA-256 of the values of the config and its bases (comments and layout may change;
    values may not)."""
    layers = [yaml.safe_load(file.read_text()) for file in config_files(config)]
    # one file hashes as before bases existed, so existing study directories still match
    values = json.dumps(layers[0] if len(layers) == 1 else layers, sort_keys=True, default=str)
    return hashlib.sha256(values.encode()).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise StudyError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: must be a mapping with {', '.join(REQUIRED)}")
    return raw


def _check_keys(raw: dict[str, Any], where: str) -> None:
    known = (*REQUIRED, *OPTIONAL, *LOCATIONS)
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else f"; known: {', '.join(known)}"
            raise StudyError(f"{where}unknown key {key!r}{hint}")
    for key in REQUIRED:
        if key not in raw:
            raise StudyError(f"{where}{key}: required, but not set")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise StudyError(f"{where}: must be a non-empty string, not {value!r}")
    return value


def _overrides(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: must be a list of key=value overrides, not {value!r}")
    for item in value:
        key = item.partition("=")[0].strip()
        if "=" not in item:
            raise StudyError(f"{where}: {item!r} must look like key=value (e.g. train.lr=1e-3)")
        if key in SET_BY_STUDY:
            raise StudyError(f"{where}: {key} is set by vlp-study for every run; remove {item!r}")
    return list(value)


def _named_overrides(value: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise StudyError(f"{where}: must map names to lists of key=value overrides")
    return {_name(name, where): _overrides(v or [], f"{where}.{name}") for name, v in value.items()}


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise StudyError(
            f"{where}: name {name!r} must start with a letter or digit and use only letters, "
            "digits and _ . +"
        )
    return name


def _groups(value: Any, where: str) -> dict[str, list[str]]:
    """One mapping of groups, or a list of mappings whose product is the groups."""
    if value is None:
        return {"": []}
    axes = value if isinstance(value, list) else [value]
    if not axes:
        raise StudyError(f"{where}: must be a mapping of groups or a non-empty list of them")
    named = [_named_overrides(axis, f"{where}.{i}" if len(axes) > 1 else where)
             for i, axis in enumerate(axes)]  # fmt: skip
    groups = {}
    for combination in itertools.product(*(axis.items() for axis in named)):
        name = "-".join(n for n, _ in combination)
        groups[name] = [item for _, overrides in combination for item in overrides]
    return groups


def _seeds(value: Any, where: str) -> list[int]:
    valid = isinstance(value, list) and value and all(type(s) is int for s in value)
    if not valid or len(set(value)) != len(value) or not all(0 <= s < 2**32 for s in value):
        raise StudyError(f"{where}: must be a list of distinct integers in [0, 2**32), not {value}")
    return list(value)


def _eval_overrides(value: Any, base_names: list[str], where: str) -> list[str]:
    """`eval.<name>.<key>=<value>` for the study's evaluators; the base config's others off."""
    if value is None:
        return []
    if not isinstance(value, dict) or not value:
        raise StudyError(f"{where}: must map evaluator names to {{dataset: DIR, ...}}")
    overrides = []
    for name in base_names:
        if name not in value:
            overrides += [f"eval.{name}.every_steps=0", f"eval.{name}.at_end=false"]
    for name, entry in value.items():
        if not isinstance(entry, dict):
            raise StudyError(f"{where}.{_name(name, where)}: must be a mapping, not {entry!r}")
        overrides += [f"eval.{name}.{key}={_yaml_scalar(v)}" for key, v in entry.items()]
    return overrides


def _yaml_scalar(value: Any) -> str:
    """A value as it must appear after `key=` to parse back to itself."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _commands(value: Any, where: str, named: bool) -> Any:
    """`score`: name -> command; `prepare`: a list of commands; a command is a list of strings."""
    if not isinstance(value, dict if named else list):
        raise StudyError(f"{where}: must be a {'mapping of names to' if named else 'list of'} "
                         "commands (lists of strings)")  # fmt: skip
    checked = {}
    for key, command in value.items() if named else enumerate(value):
        label = f"{where}.{_name(key, where) if named else key}"
        if not isinstance(command, list) or not command:
            raise StudyError(f"{label}: must be a command as a list of strings, not {command!r}")
        if not all(isinstance(part, str | int | float) for part in command):
            raise StudyError(f"{label}: every part of the command must be a string")
        checked[key] = [str(part) for part in command]
    if named:
        for name, command in checked.items():
            if not any("{output}" in part for part in command):
                raise StudyError(f"{where}.{name}: the command must write its JSON to {{output}}")
    return checked if named else list(checked.values())


def _run(config, overrides, group, variant, seed, output: Path, where: str) -> Run:
    run_dir = output / "runs" / Path(*(p for p in (group, variant) if p)) / f"seed_{seed}"
    own = [f"train.seed={seed}", f"run.output_dir={run_dir}", "resume=latest"]
    label = " ".join(p for p in (f"group {group}" if group else "", f"variant {variant}") if p)
    try:
        cfg = load_config(config, [*overrides, *own])
    except ConfigError as err:
        raise StudyError(f"{where}{label}: {err}") from None
    return Run(group, variant, seed, (*overrides, *own), run_dir, cfg)


def placeholders(command: list[str], values: dict[str, str]) -> list[str]:
    """The command with {python}, {run_dir}, {seed} and {output} filled in."""
    filled = []
    for part in command:
        for name, value in values.items():
            part = part.replace("{" + name + "}", value)
        filled.append(part)
    return filled
