"""Training throughput and loss: `accelerate launch vlp/train.py` (the command the README
documents) vs open_clip's own trainer on the same tiny models.

BENCHMARKS.md section 1. Both tools train the same open_clip model config (configs/models:
vlp-small-clip, vlp-small-coca) on the same demo shards with the same global batch, number of
samples, optimizer (AdamW, same lr, warmup, weight decay, betas, eps, gradient clipping), precision
and seed, on the CPU. Each run is one complete command; the tools alternate, and the order flips
every round (A B, B A, ...) so that a drift in the machine's load favours neither. Every run logs
every step; steady-state samples/s leaves out the first steps (start-up), and the whole command's
wall time is reported as well.

open_clip_train.main runs unpatched from its own virtual environment (bench/.peers/open_clip, with
webdataset 0.2.86, which its data code needs); a wrapper written to bench/.work registers vlp's
model configs before calling it. For CoCa the wrapper also initialises the decoder's vocabulary
projection, which open_clip 3.3 leaves as torch.empty (see vlp/model.py init_decoder_projection),
exactly as vlp does: the "patched peer". A short unpatched CoCa run records what the peer's
caption loss starts from without it.

After the runs, an in-process analysis (vlp's own .venv) times the parts of one training step
(image tower, text tower, decoder, vocabulary projection + cross-entropy, optimizer) for vlp and
for open_clip's full-context forward, padded vs trimmed text, fp32 vs bf16.

    .venv/bin/python bench/train_vs_open_clip.py            # the full benchmark (~20 min)
    .venv/bin/python bench/train_vs_open_clip.py --quick    # smoke check; results in bench/.work
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    RESULTS,
    WORK,
    PeerError,
    RunResult,
    dist_version,
    ensure_venv,
    git_state,
    machine_info,
    run_timed,
    write_results,
)

NAME = "train_vs_open_clip"
MODEL_CONFIGS = REPO / "configs" / "models"
VLP, PEER = "vlp", "open_clip"
CLIP, COCA = "vlp-small-clip", "vlp-small-coca"
GOALS = {CLIP: 2.0, COCA: 5.0}
"""Steady-state samples/s ratio vlp/open_clip the issue asks for."""
HERE = WORK / NAME
SHARD_DIR = WORK / "demo" / "train"
"""The demo shards at the demo's image size, 64 px (--demo-image-size picks another folder)."""
SHARD_SAMPLES = 1000
"""Samples per demo shard (vlp-shard's default)."""
PEER_WEBDATASET = "webdataset==0.2.86"
WARMUP_STEPS_EXCLUDED = 2
"""Steps left out of the steady-state rate: the first builds worker processes, fills shuffle
buffers and allocates the optimizer state, the second still pays for some of it."""
FINAL_STEPS = 5
"""The loss "at the end" is the mean over this many last steps (one step's loss is noisy)."""
NOISY_SHARE = 0.1
PEER_WORKERS_NOTE = (
    "--workers 1: two alternating 16-step CLIP probes per setting (--probe-peer-workers) gave "
    "19.9 and 6.4 samples/s with 1 worker, 9.0 and 7.9 with 2, on a machine where other jobs "
    "held about a core: no measurable gain from a second worker, whose decoding (64 px JPEGs, "
    "data wait under 1% with one) competes with the 2 compute threads for the same 2 cores"
)
PEER_WRAPPER = '''"""open_clip's own trainer with extra model configs (written by bench/{name}.py).

argv: CONFIG_DIR [--init-coca-projection] open_clip_train.main arguments...
"""
import sys

import open_clip

open_clip.add_model_config(sys.argv.pop(1))
if sys.argv[1] == "--init-coca-projection":
    # open_clip 3.3 creates text_decoder.text_projection with torch.empty and never initialises
    # it; initialise it right after the model is built, as vlp does (same RNG position)
    sys.argv.pop(1)
    import torch
    from open_clip_train import main as train_main

    create = train_main.create_model_and_transforms

    def create_and_init(*args, **kwargs):
        model, *rest = create(*args, **kwargs)
        decoder = getattr(model, "text_decoder", None)
        if decoder is not None:
            with torch.no_grad():
                torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
        return (model, *rest)

    train_main.create_model_and_transforms = create_and_init
from open_clip_train.main import main

main(sys.argv[1:])
'''
PEER_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(?P<samples>\d+)/\d+ .*?Data \(t\): (?P<data>[\d.]+) "
    r"Batch \(t\): (?P<batch>[\d.]+),.*?(?P<losses>(?:\w+: [-\d.naninf]+ \([-\d.naninf]+\) ?)+)$"
)
PEER_LOSS = re.compile(r"(\w+): ([-\d.naninf]+) \(")


@dataclass(frozen=True)
class Settings:
    batch_size: int = 128
    clip_samples: int = 2560
    coca_samples: int = 1536
    clip_repeats: int = 3
    coca_repeats: int = 2
    lr: float = 1e-3
    warmup: int = 5
    """Linear warm-up steps (the same formula in both tools), then a constant lr: their cosine
    decays differ (vlp reaches 0 on the last step, open_clip one step later), which in a run
    of a few steps gives open_clip several percent more learning rate."""
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    """Passed to both: open_clip picks beta2 0.999 / eps 1e-8 for model names without "vit"."""
    grad_clip: float = 1.0
    """vlp's default; open_clip's default is no clipping, so it gets --grad-clip-norm."""
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    """CoCa only (open_clip's default weights)."""
    precision: str = "fp32"
    device: str = "cpu"
    """cpu, or cuda (then run with --precision bf16 and more samples and workers)."""
    demo_samples: int = 10_000
    peer_site: str = ""
    """A folder with the peer's packages (webdataset 0.2.86) put first on its PYTHONPATH,
    instead of its own virtual environment: for device machines without a package index."""
    vlp_workers: int = 2
    """vlp's default and recommendation (configs/demo.yaml)."""
    peer_workers: int = 1
    """Faster of 1 and 2 for open_clip on 2 cores (measured: see --probe-peer-workers)."""
    bf16_pair: bool = False
    """Also one CLIP round in bf16 autocast (open_clip: amp_bf16)."""
    analysis_reps: int = 3
    demo_image_size: int = 64
    """Side of the demo images; models at 224 px train faster from 224 px shards than from 64 px
    ones upscaled in the data workers."""


@dataclass(frozen=True)
class Job:
    tool: str
    model: str
    precision: str
    seed: int
    samples: int
    patched: bool = True
    """Peer CoCa only: decoder projection initialised by the wrapper."""

    @property
    def label(self) -> str:
        coca = is_coca(self.model)
        patch = "" if self.patched or not coca or self.tool == VLP else "-unpatched"
        return f"{self.tool}-{self.model}-{self.precision}-s{self.seed}-n{self.samples}{patch}"


@dataclass
class Step:
    step: int
    seconds: float
    data_seconds: float
    loss: float
    contrastive: float
    caption: float | None = None
    """Unweighted caption loss (open_clip logs it multiplied by its weight)."""
    ended: float = 0.0
    """Wall-clock time the step's log record was written (open_clip: to the second)."""


@dataclass
class Tools:
    peer_python: Path
    wrapper: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    peer_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.analysis_child:
        write_results(Path(args.analysis_child), analysis(args.batch_size, args.analysis_reps))
        return 0
    settings = settings_from(args)
    git_before = git_state()
    try:
        tools = prepare(settings)
    except PeerError as err:
        print(f"{NAME}: cannot set up open_clip's trainer: {err}", file=sys.stderr)
        return 2
    try:
        probe = probe_peer_workers(tools, settings) if args.probe_peer_workers else None
        if probe:
            settings = Settings(**{**asdict(settings), "peer_workers": probe["chosen"]})
        warm_up(tools, settings)
        unpatched = unpatched_coca_start(tools, settings) if COCA in args.models else None
        runs = measure(tools, settings, args.models)
    except RuntimeError as err:  # a tool failed: its log says why
        print(f"{NAME}: {err}", file=sys.stderr)
        return 1
    summary = summarize(runs, settings)
    analysis_result = None if args.skip_analysis else run_analysis(settings, summary)
    print_report(summary, runs, settings, analysis_result, unpatched, probe)
    suffix = "" if settings.device == "cpu" else f"_{settings.device}"
    path = args.output or (
        HERE / "results-quick.json" if args.quick else RESULTS / f"{NAME}{suffix}.json"
    )
    payload = result_payload(settings, tools, runs, summary, analysis_result, unpatched, probe)
    payload["git_at_end"] = git_state()
    payload["git"] = git_before
    write_results(path, payload)
    print(f"results: {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument(
        "--models",
        nargs="+",
        default=[CLIP, COCA],
        choices=sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")),
        help="vlp model configs (configs/models); CoCa ones get the caption loss too",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--clip-samples", type=int, default=defaults.clip_samples)
    parser.add_argument("--coca-samples", type=int, default=defaults.coca_samples)
    parser.add_argument("--clip-repeats", type=int, default=defaults.clip_repeats)
    parser.add_argument("--coca-repeats", type=int, default=defaults.coca_repeats)
    parser.add_argument("--peer-workers", type=int, default=defaults.peer_workers)
    parser.add_argument(
        "--probe-peer-workers",
        action="store_true",
        help="first time open_clip with 1 and 2 data workers and use the faster",
    )
    parser.add_argument("--bf16-pair", action="store_true", help="one more CLIP round in bf16")
    parser.add_argument("--analysis-reps", type=int, default=defaults.analysis_reps)
    parser.add_argument("--skip-analysis", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="few steps, one round; results in bench/.work/"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision)
    parser.add_argument("--demo-samples", type=int, default=defaults.demo_samples)
    parser.add_argument("--demo-image-size", type=int, default=defaults.demo_image_size)
    parser.add_argument("--vlp-workers", type=int, default=defaults.vlp_workers)
    parser.add_argument(
        "--peer-site",
        default="",
        metavar="DIR",
        help="run open_clip's trainer with this interpreter and DIR (holding webdataset "
        "0.2.86) first on its PYTHONPATH, instead of its own venv (machines without internet)",
    )
    parser.add_argument("--output", type=Path, help="results file (default: bench/results/)")
    parser.add_argument("--analysis-child", metavar="JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    # the fields that have a command-line option (of the same name); the rest keep defaults
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    if args.quick:  # sizes for a smoke check; device, precision and the rest as given
        return Settings(**{
            **given, "batch_size": 32, "clip_samples": 256, "coca_samples": 256,
            "clip_repeats": 1, "coca_repeats": 1, "warmup": 2, "analysis_reps": 1,
        })  # fmt: skip
    settings = Settings(**given)
    for samples in (settings.clip_samples, settings.coca_samples):
        steps = samples // settings.batch_size
        # open_clip rounds its epoch up to whole batches per data worker; a different number of
        # samples than vlp's would not be the same job
        if samples % (settings.batch_size * settings.peer_workers):
            raise SystemExit(f"{NAME}: samples must be a multiple of batch x peer workers")
        if steps < WARMUP_STEPS_EXCLUDED + FINAL_STEPS:
            raise SystemExit(f"{NAME}: at least {WARMUP_STEPS_EXCLUDED + FINAL_STEPS} steps")
    return settings


# --- set-up ------------------------------------------------------------------------------


def prepare(s: Settings) -> Tools:
    """Demo shards, the peer's environment and its wrapper; raises PeerError."""
    ensure_demo_shards(s)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both tools on the CPU even where a GPU exists
    peer_env = dict(env)
    if s.peer_site:  # a machine without a package index: the peer's packages come as a folder
        python = Path(sys.executable)
        peer_env["PYTHONPATH"] = os.pathsep.join([s.peer_site, env.get("PYTHONPATH", "")])
    else:
        python = ensure_venv("open_clip", peer_requirements(), peer_probe(), env)
    HERE.mkdir(parents=True, exist_ok=True)
    wrapper = HERE / "peer_main.py"
    wrapper.write_text(PEER_WRAPPER.format(name=NAME))
    return Tools(python, wrapper, env, peer_env)


def ensure_demo_shards(s: Settings) -> Path:
    """The demo shards of `s` (built if missing), read once; returns their folder."""
    shards, directory = s.demo_samples // SHARD_SAMPLES, shard_dir(s)
    if not all((directory / f"{i:05d}.tar").exists() for i in range(shards)):
        print(f"building the demo shards in {directory.parent} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "data_tools", "demo", str(directory.parent),
             "--num-samples", str(s.demo_samples), "--workers", str(os.cpu_count()),
             "--image-size", str(s.demo_image_size)],
            check=True, cwd=REPO, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    # one read now, so the first timed run does not pay alone for a cold page cache
    for path in directory.glob("*.tar"):
        path.read_bytes()
    return directory


def peer_requirements() -> list[str]:
    """Same torch, torchvision and open_clip versions as vlp's .venv (local tags dropped: PyPI
    serves 2.14.1 for the +cu130 build), plus the webdataset its trainer needs."""
    pins = [
        f"{dist}=={dist_version(sys.executable, dist).split('+')[0]}"
        for dist in ("torch", "torchvision", "open_clip_torch")
    ]
    return [*pins, PEER_WEBDATASET, "pandas", "braceexpand"]


def peer_probe() -> str:
    wanted = {r.split("==")[0]: r.split("==")[1] for r in peer_requirements() if "==" in r}
    return (
        "import importlib.metadata as m, open_clip_train.main; "
        f"assert all(m.version(d).split('+')[0] == v for d, v in {wanted!r}.items())"
    )


# --- the two commands --------------------------------------------------------------------


def shard_dir(s: Settings) -> Path:
    if s.demo_image_size == Settings.demo_image_size:
        return SHARD_DIR
    return WORK / f"demo-{s.demo_image_size}px" / "train"


def shard_pattern(s: Settings) -> str:
    last = s.demo_samples // SHARD_SAMPLES - 1
    return f"{shard_dir(s).relative_to(REPO)}/{{00000..{last:05d}}}.tar"


def is_coca(model: str) -> bool:
    """A model config with a text decoder: trained with the caption loss too."""
    return "multimodal_cfg" in json.loads((MODEL_CONFIGS / f"{model}.json").read_text())


def vlp_command(job: Job, s: Settings, out: Path) -> list[str]:
    steps = job.samples // s.batch_size
    caption = s.caption_weight if is_coca(job.model) else 0.0
    # the command the README documents (its second interpreter and the launcher's
    # OMP_NUM_THREADS=1 included), not a friendlier `python vlp/train.py`
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    precision = "bf16" if job.precision == "bf16" else "no"
    return [
        accelerate, "launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", precision, "--dynamo_backend", "no",
        "vlp/train.py", "--config", str(base_config()),
        f"model.name={job.model}",
        f"data.train_shards={shard_pattern(s)}",
        f"data.batch_size={s.batch_size}", f"data.workers={s.vlp_workers}",
        f"train.steps={steps}", f"train.lr={s.lr}", f"train.warmup_steps={s.warmup}",
        f"train.min_lr={s.lr}",  # constant after warm-up, as open_clip's --lr-scheduler const
        f"train.weight_decay={s.weight_decay}", f"train.beta1={s.beta1}",
        f"train.beta2={s.beta2}", f"train.eps={s.eps}", f"train.grad_clip={s.grad_clip}",
        f"train.precision={job.precision}", f"train.seed={job.seed}",
        "train.log_every_steps=1",
        f"objectives.contrastive.weight={s.contrastive_weight}",
        f"objectives.caption.weight={caption}",
        # only the final checkpoint, as open_clip's one save at the end of its epoch
        f"checkpoint.every_steps={steps}", "checkpoint.keep=1",
        f"run.output_dir={out}", "resume=null",
    ]  # fmt: skip


def base_config() -> Path:
    """configs/demo.yaml without its evaluators: the peer's trainer evaluates nothing either."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config.pop("eval", None)
    path = HERE / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peer_command(job: Job, s: Settings, tools: Tools, out: Path) -> list[str]:
    cmd = [str(tools.peer_python), str(tools.wrapper), str(REPO / "configs" / "models")]
    if is_coca(job.model) and job.patched:
        cmd.append("--init-coca-projection")
    cmd += [
        "--model", job.model,
        "--train-data", shard_pattern(s),
        "--dataset-type", "webdataset", "--train-num-samples", str(job.samples),
        "--batch-size", str(s.batch_size), "--epochs", "1",
        "--workers", str(s.peer_workers), "--device", s.device,
        "--lr", str(s.lr), "--warmup", str(s.warmup), "--lr-scheduler", "const",
        "--wd", str(s.weight_decay),
        "--beta1", str(s.beta1), "--beta2", str(s.beta2), "--eps", str(s.eps),
        "--grad-clip-norm", str(s.grad_clip),
        # bf16 autocast, as vlp's train.precision=bf16
        "--precision", "fp32" if job.precision == "fp32" else "amp_bf16",
        "--seed", str(job.seed), "--log-every-n-steps", "1",
        # its final save at the end of the epoch stays on, as vlp's final checkpoint
        "--save-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "",
        "--logs", str(out.parent), "--name", out.name,
    ]  # fmt: skip
    if is_coca(job.model):
        cmd += [
            "--coca-caption-loss-weight",
            str(s.caption_weight),
            "--coca-contrastive-loss-weight",
            str(s.contrastive_weight),
        ]
    return cmd


@dataclass
class Run:
    result: RunResult
    steps: list[Step]
    log: Path
    launched: float
    """Wall-clock time the command started."""


def run_job(job: Job, s: Settings, tools: Tools) -> Run:
    out = HERE / "runs" / job.label
    shutil.rmtree(out, ignore_errors=True)
    log = HERE / "logs" / f"{job.label}.log"
    launched = time.time()
    if job.tool == VLP:
        result = run_timed(vlp_command(job, s, out), log, tools.env)
        steps = vlp_steps(out / "metrics.jsonl", s.batch_size)
    else:
        result = run_timed(peer_command(job, s, tools, out), log, tools.peer_env)
        steps = peer_steps(log, s.caption_weight if is_coca(job.model) else None)
    if len(steps) != job.samples // s.batch_size:
        raise RuntimeError(f"{job.label}: {len(steps)} steps logged, expected; see {log}")
    return Run(result, steps, log, launched)


def vlp_steps(metrics: Path, batch: int) -> list[Step]:
    """One record per step (train.log_every_steps=1): its time is batch / samples_per_s."""
    steps = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "samples_per_s" not in r:  # not a training-step record
            continue
        seconds = batch / r["samples_per_s"]
        steps.append(
            Step(
                step=r["step"],
                seconds=seconds,
                data_seconds=r["data_wait"] * seconds,
                loss=r["loss/total"],
                contrastive=r["loss/contrastive"],
                caption=r.get("loss/caption"),
                ended=r["time"],
            )
        )
    return steps


def peer_steps(log: Path, caption_weight: float | None) -> list[Step]:
    """open_clip's per-step log lines; with --log-every-n-steps 1 its "Batch (t)" meter holds
    exactly one step (time from the previous step's end, data loading included)."""
    steps = []
    for line in log.read_text(errors="replace").splitlines():
        match = PEER_LINE.search(line)
        if not match:
            continue
        losses = {k.lower(): float(v) for k, v in PEER_LOSS.findall(match["losses"])}
        caption = losses.get("caption_loss")
        steps.append(
            Step(
                step=len(steps) + 1,
                seconds=float(match["batch"]),
                data_seconds=float(match["data"]),
                loss=losses["loss"],
                contrastive=losses["contrastive_loss"],
                caption=None if caption is None or not caption_weight else caption / caption_weight,
                ended=time.mktime(time.strptime(line[:19], "%Y-%m-%d,%H:%M:%S")),
            )
        )
    return steps


# --- runs --------------------------------------------------------------------------------


def warm_up(tools: Tools, s: Settings) -> None:
    """One short untimed run of each tool: bytecode and page caches warm for both, and a broken
    command fails in seconds rather than after the first long run."""
    for tool in (VLP, PEER):
        job = Job(tool, CLIP, "fp32", 0, s.batch_size * max(s.peer_workers, 1) * 4)
        run_job(job, Settings(**{**asdict(s), "warmup": 1}), tools)


def unpatched_coca_start(tools: Tools, s: Settings) -> dict[str, Any]:
    """The peer's CoCa as open_clip builds it (projection left as torch.empty): first losses."""
    job = Job(PEER, COCA, "fp32", 0, s.batch_size * s.peer_workers * 2, patched=False)
    run = run_job(job, s, tools)
    steps, log, first = run.steps, run.log, run.steps[0]
    return {
        "first_step_caption_loss": first.caption,
        "first_step_contrastive_loss": first.contrastive,
        # ln(vocabulary size): what an all-zero projection gives (fresh pages from the OS are
        # zeroed, so torch.empty often, but not always, holds zeros)
        "ln_vocab_size": round(math.log(49408), 4),
        "finite": all(_finite(x.loss) for x in steps),
        "log": str(log.relative_to(REPO)),
    }


def probe_peer_workers(tools: Tools, s: Settings) -> dict[str, Any]:
    """open_clip with 1 and 2 data workers, two alternating short runs each."""
    samples = s.batch_size * 2 * 8
    rates: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(2):
        for workers in (1, 2) if round_ % 2 == 0 else (2, 1):
            probe = Settings(**{**asdict(s), "peer_workers": workers})
            run = run_job(Job(PEER, CLIP, "fp32", 0, samples), probe, tools)
            rates[workers].append(steady_rate(run.steps, s.batch_size))
            print(f"  probe: open_clip --workers {workers}: {rates[workers][-1]:.1f} samples/s")
    medians = {w: statistics.median(r) for w, r in rates.items()}
    return {
        "samples": samples,
        "steady_samples_per_s": {str(w): r for w, r in rates.items()},
        "chosen": max(medians, key=medians.get),
    }


def schedule(s: Settings, models: list[str]) -> list[Job]:
    """Rounds per model; the seed changes per round (the same for both tools within a round)
    so the loss comparison sees seed-to-seed spread, and the order flips every round."""
    jobs = []
    plan = [
        (model, s.precision, s.coca_samples, s.coca_repeats)
        if is_coca(model)
        else (model, s.precision, s.clip_samples, s.clip_repeats)
        for model in models
    ]
    if s.bf16_pair and CLIP in models:
        plan.append((CLIP, "bf16", s.clip_samples, 1))
    for model, precision, samples, repeats in plan:
        for round_ in range(repeats):
            order = (VLP, PEER) if round_ % 2 == 0 else (PEER, VLP)
            jobs += [Job(tool, model, precision, round_, samples) for tool in order]
    return jobs


def measure(tools: Tools, s: Settings, models: list[str]) -> list[dict[str, Any]]:
    records = []
    for job in schedule(s, models):
        record = run_record(job, run_job(job, s, tools), s.batch_size)
        records.append(record)
        # kept as they come, so a failure later does not lose a long session's runs
        write_results(HERE / "runs-partial.json", {"runs": records})
        print(
            f"  {job.tool:<10}{job.model:<16}{job.precision:<5} seed {job.seed}: "
            f"{record['steady_samples_per_s']:6.1f} samples/s steady, "
            f"{record['whole_samples_per_s']:6.1f} whole ({record['seconds']:.0f} s), "
            f"final loss {record['final_loss']:.4f}, others {record['others_cpu_share']:.0%}",
            flush=True,
        )
    return records


def steady_rate(steps: list[Step], batch: int) -> float:
    kept = steps[WARMUP_STEPS_EXCLUDED:]
    return batch * len(kept) / sum(x.seconds for x in kept)


def run_record(job: Job, run: Run, batch: int) -> dict[str, Any]:
    result, steps, log = run.result, run.steps, run.log
    kept = steps[WARMUP_STEPS_EXCLUDED:]
    step_seconds = sum(x.seconds for x in steps)
    quarters = [steps[i * len(steps) // 4 : (i + 1) * len(steps) // 4] for i in range(4)]
    last = steps[-FINAL_STEPS:]
    record: dict[str, Any] = {
        "tool": job.tool,
        "model": job.model,
        "precision": job.precision,
        "seed": job.seed,
        "samples": job.samples,
        "seconds": round(result.seconds, 2),
        "whole_samples_per_s": round(job.samples / result.seconds, 2),
        "steady_samples_per_s": round(steady_rate(steps, batch), 2),
        # start-up, final save and exit: the command's time outside its logged steps
        "outside_steps_seconds": round(result.seconds - step_seconds, 2),
        # launch to the first step's start, and the last step's log record to exit (final
        # checkpoint included); open_clip's log times are whole seconds, so +-1 s there
        "startup_seconds": round(steps[0].ended - steps[0].seconds - run.launched, 2),
        "finish_seconds": round(run.launched + result.seconds - steps[-1].ended, 2),
        "data_wait_fraction": round(
            sum(x.data_seconds for x in kept) / sum(x.seconds for x in kept), 4
        ),
        "first_loss": round(steps[0].loss, 4),
        "final_loss": round(statistics.fmean(x.loss for x in last), 4),
        "final_contrastive": round(statistics.fmean(x.contrastive for x in last), 4),
        "loss_by_quarter": [round(statistics.fmean(x.loss for x in q), 4) for q in quarters],
        "cpu_seconds": round(result.cpu_seconds, 2),
        # CPU time of the whole process tree per sample: squeezed far less than wall time
        # when other jobs hold cores
        "cpu_ms_per_sample": round(1000 * result.cpu_seconds / job.samples, 1),
        "others_cpu_share": round(result.others_cpu_share, 3),
        "peak_pss_mb": round(result.peak_pss_mb, 1),
        "log": str(log.relative_to(REPO)),
        # step, seconds, total loss, contrastive, caption (unweighted; CoCa)
        "steps": [
            [x.step, round(x.seconds, 4), round(x.loss, 4), round(x.contrastive, 4)]
            + ([round(x.caption, 4)] if x.caption is not None else [])
            for x in steps
        ],
    }
    if is_coca(job.model):
        record["first_caption"] = (
            round(steps[0].caption, 4) if steps[0].caption is not None else None
        )
        record["final_caption"] = round(statistics.fmean(x.caption for x in last), 4)
    return record


def _finite(x: float | None) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


# --- summary -----------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for model, precision in sorted({(r["model"], r["precision"]) for r in runs}):
        mine = [r for r in runs if r["model"] == model and r["precision"] == precision]
        per_tool = {tool: _cell([r for r in mine if r["tool"] == tool]) for tool in (VLP, PEER)}
        steady = _ratio(mine, "steady_samples_per_s")
        quiet = _quiet_seeds(mine)
        if quiet:
            steady["paired_median_quiet_rounds"] = _ratio(
                [r for r in mine if r["seed"] in quiet], "steady_samples_per_s"
            )["paired_median"]
            steady["quiet_rounds"] = len(quiet)
        group = {
            "per_tool": per_tool,
            "ratio_vlp_over_open_clip": {
                "steady_samples_per_s": steady,
                "whole_samples_per_s": _ratio(mine, "whole_samples_per_s"),
                "peak_pss": _ratio(mine, "peak_pss_mb"),
                "cpu_ms_per_sample": _ratio(mine, "cpu_ms_per_sample"),
            },
            "final_loss_vlp_minus_open_clip": _paired_differences(mine, "final_loss"),
        }
        if precision == "fp32" and model in GOALS:
            group["goal"] = GOALS[model]
            group["goal_met"] = steady["paired_median"] >= GOALS[model]
        groups[f"{model}/{precision}"] = group
    return groups


def _cell(records: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in records), 4)

    rates = [r["steady_samples_per_s"] for r in records]
    finals = [r["final_loss"] for r in records]
    cell = {
        "runs": len(records),
        "median_steady_samples_per_s": med("steady_samples_per_s"),
        "min_steady_samples_per_s": min(rates),
        "max_steady_samples_per_s": max(rates),
        "median_whole_samples_per_s": med("whole_samples_per_s"),
        "median_seconds": med("seconds"),
        "median_outside_steps_seconds": med("outside_steps_seconds"),
        "median_startup_seconds": med("startup_seconds"),
        "median_finish_seconds": med("finish_seconds"),
        "median_data_wait_fraction": med("data_wait_fraction"),
        "median_first_loss": med("first_loss"),
        "median_final_loss": med("final_loss"),
        "final_loss_spread_over_seeds": round(max(finals) - min(finals), 4),
        "median_final_contrastive": med("final_contrastive"),
        "median_peak_pss_mb": med("peak_pss_mb"),
        "median_others_cpu_share": med("others_cpu_share"),
        "median_cpu_ms_per_sample": med("cpu_ms_per_sample"),
    }
    if "final_caption" in records[0]:
        cell["median_first_caption"] = med("first_caption")
        cell["median_final_caption"] = med("final_caption")
    return cell


def _quiet_seeds(records: list[dict[str, Any]]) -> list[int]:
    """Rounds in which other processes used under NOISY_SHARE of the CPU during both runs."""
    seeds = sorted({r["seed"] for r in records})
    return [
        seed
        for seed in seeds
        if all(r["others_cpu_share"] < NOISY_SHARE for r in records if r["seed"] == seed)
    ]


def _by_seed(records: list[dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    return {tool: {r["seed"]: r[key] for r in records if r["tool"] == tool} for tool in (VLP, PEER)}


def _ratio(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Median of per-round ratios (each pair ran back to back, sharing the machine's state of
    the moment), and the ratio of the medians."""
    value = _by_seed(records, key)
    paired = [value[VLP][seed] / value[PEER][seed] for seed in sorted(value[VLP])]
    medians = statistics.median(value[VLP].values()) / statistics.median(value[PEER].values())
    return {"paired_median": round(statistics.median(paired), 3), "of_medians": round(medians, 3)}


def _paired_differences(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    value = _by_seed(records, key)
    diffs = [round(value[VLP][seed] - value[PEER][seed], 4) for seed in sorted(value[VLP])]
    return {"per_seed": diffs, "median": round(statistics.median(diffs), 4)}


# --- analysis: where the time of one step goes --------------------------------------------


def run_analysis(s: Settings, summary: dict[str, Any]) -> dict[str, Any]:
    """The analysis runs in a child process so this one stays small and torch-free."""
    out = HERE / "analysis.json"
    print("analysis: timing the parts of one training step in-process ...", flush=True)
    cmd = [
        sys.executable, __file__, "--analysis-child", str(out),
        "--batch-size", str(s.batch_size), "--analysis-reps", str(s.analysis_reps),
    ]  # fmt: skip
    result = run_timed(cmd, HERE / "logs" / "analysis.log")
    data = json.loads(out.read_text())
    data["seconds"] = round(result.seconds, 1)
    data["others_cpu_share"] = round(result.others_cpu_share, 3)
    for model in (CLIP, COCA):
        group = summary.get(f"{model}/fp32")
        if group is not None and model in data:
            # the in-process step has no data loading; the runs measured how long vlp waited
            data[model]["vlp_data_wait_fraction_in_runs"] = group["per_tool"][VLP][
                "median_data_wait_fraction"
            ]
    return data


def analysis(batch: int, reps: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    captions = shard_captions(batch)
    return {
        "method": (
            "in-process, vlp's .venv, torch threads = cores; each part is a forward + backward "
            "(optimizer: clip_grad_norm + AdamW.step) on one batch of real demo captions and "
            "random 64 px images; best of `reps` interleaved repetitions after one warm-up "
            "(the least disturbed by other processes), milliseconds"
        ),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch,
        "reps": reps,
        "matmul_gflops": matmul_gflops(),
        CLIP: model_breakdown(CLIP, captions, reps),
        COCA: model_breakdown(COCA, captions, reps),
    }


def shard_captions(count: int) -> list[str]:
    import tarfile

    captions = []
    with tarfile.open(SHARD_DIR / "00000.tar") as tar:  # the analysis uses the 64 px set
        for member in tar:
            if member.name.endswith(".txt"):
                captions.append(tar.extractfile(member).read().decode())
            if len(captions) == count:
                break
    return captions


def matmul_gflops() -> dict[str, dict[str, float]]:
    """Peak-like (2048^3) and training-like (a width-192 MLP matmul on 128 x 64 tokens) GEMMs."""
    import torch

    shapes = {"2048x2048x2048": (2048, 2048, 2048), "8192x192x768": (8192, 192, 768)}
    result: dict[str, dict[str, float]] = {}
    for label, (m, k, n) in shapes.items():
        result[label] = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            best = _best(lambda a=a, b=b: a @ b, reps=7)
            result[label][str(dtype).removeprefix("torch.")] = round(2 * m * k * n / best / 1e9, 1)
    return result


def _best(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_parts(
    parts: dict[str, Callable[[], None]], reps: int, reset: Callable[[], None]
) -> dict[str, dict[str, float]]:
    """Best and median milliseconds per part (`reset` runs untimed before each), repetitions
    interleaved across parts so that a burst of load from other processes hits every part
    alike."""
    for fn in parts.values():
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(reps):
        for name, fn in parts.items():
            reset()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "best_ms": round(1000 * min(t), 1),
            "median_ms": round(1000 * statistics.median(t), 1),
        }
        for name, t in times.items()
    }


def model_breakdown(name: str, captions: list[str], reps: int) -> dict[str, Any]:
    import torch

    fixture = StepFixture(name, captions)
    result: dict[str, Any] = {
        "longest_caption_tokens": fixture.length,
        "mean_caption_tokens": round(float((fixture.text != 0).sum(1).float().mean()), 1),
        "context_length": fixture.text.shape[1],
        "gflop_per_sample": fixture.gflop_per_sample(),
    }
    for precision in ("fp32", "bf16"):
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            fewer = reps if precision == "fp32" else max(1, reps - 1)
            parts = time_parts(fixture.parts(), fewer, fixture.reset)
        result[precision] = {"parts": parts, **fixture.split(parts)}
    fp32, bf16 = result["fp32"]["parts"], result["bf16"]["parts"]
    result["bf16_step_speedup"] = {
        tool: round(fp32[f"{tool}_step"]["best_ms"] / bf16[f"{tool}_step"]["best_ms"], 3)
        for tool in (VLP, PEER)
    }
    result["in_process_step_ratio_fp32"] = round(
        fp32[f"{PEER}_step"]["best_ms"] / fp32[f"{VLP}_step"]["best_ms"], 3
    )
    return result


class StepFixture:
    """One batch, vlp's model and open_clip's (same config, same initial weights), optimizers
    and the callables that time each part of a training step."""

    def __init__(self, name: str, captions: list[str]):
        import open_clip
        import torch

        from vlp.config import ModelConfig, ObjectivesConfig, TrainConfig
        from vlp.model import build_model, longest
        from vlp.objectives import WeightedObjective
        from vlp.optim import build_optimizer

        torch.manual_seed(0)
        self.vlp, _, _, tokenizer = build_model(ModelConfig(name=name))
        self.clip = self.vlp.clip
        self.coca = self.vlp.has_decoder
        self.text = tokenizer(captions)  # [B, L] at the full context, as open_clip feeds it
        self.length = longest(self.text, 0)
        self.images = torch.randn(len(captions), 3, *self.clip.visual.image_size)
        with torch.no_grad():
            self.embed_dim = self.vlp(self.images[:2], self.text[:2, None]).image_emb.shape[-1]
        objectives = ObjectivesConfig()
        objectives.caption.weight = 2.0 if self.coca else 0.0
        self.objective = WeightedObjective(objectives)
        self.vlp_optimizer = build_optimizer(self.vlp, TrainConfig())  # fused
        # AdamW with torch's default for-each kernel, as open_clip's trainer builds it
        self.foreach_optimizer = open_clip_adamw(self.vlp)
        # open_clip's own model as its trainer builds it (output_dict=True), with vlp's weights
        self.peer = open_clip.create_model(name, output_dict=True)
        self.peer.load_state_dict(self.clip.state_dict())
        self.peer_loss = (
            open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
            if self.coca
            else open_clip.ClipLoss()
        )
        self.peer_optimizer = open_clip_adamw(self.peer)

    def parts(self) -> dict[str, Callable[[], None]]:
        """fwd + bwd of each part, vlp's way and (prefixed open_clip_) open_clip's way."""
        import torch
        import torch.nn.functional as F

        from vlp.objectives.contrastive import clip_loss

        clip, text, images = self.clip, self.text, self.images
        batch = text.shape[0]

        def backward(*outputs) -> None:
            sum(o.float().sum() for o in outputs).backward()

        parts: dict[str, Callable[[], None]] = {}
        if self.coca:
            parts["image_tower"] = lambda: backward(*clip._encode_image(images))
            parts["text_tower"] = lambda: backward(*self.vlp._encode_coca_text(text))
            parts["open_clip_text_tower"] = lambda: backward(*clip._encode_text(text))
        else:
            parts["image_tower"] = lambda: backward(clip.encode_image(images, normalize=True))
            parts["text_tower"] = lambda: backward(self.vlp._encode_text(text))
            parts["open_clip_text_tower"] = lambda: backward(clip.encode_text(text, normalize=True))
        emb = F.normalize(torch.randn(batch, 2, self.embed_dim), dim=-1)
        image_emb = emb[:, 0].clone().requires_grad_()
        text_emb = emb[:, 1].clone().requires_grad_()
        parts["contrastive_loss"] = lambda: clip_loss(
            image_emb, text_emb, torch.tensor(14.3)
        ).backward()
        if self.coca:
            parts.update(self._caption_parts(backward))
        grads = self._grads()
        parts["optimizer"] = lambda: self._optimizer_step(self.vlp, self.vlp_optimizer, grads)
        parts["open_clip_optimizer"] = lambda: self._optimizer_step(
            self.vlp, self.foreach_optimizer, grads
        )
        parts[f"{VLP}_step"] = self.vlp_step
        parts[f"{PEER}_step"] = self.peer_step
        return parts

    def _caption_parts(self, backward: Callable[..., None]) -> dict[str, Callable[[], None]]:
        """The decoder and the vocabulary projection + cross-entropy, vlp's and open_clip's way."""
        import torch
        import torch.nn.functional as F

        from vlp.openclip_compat import decoder_states

        clip, text, length = self.clip, self.text, self.length
        decoder = clip.text_decoder
        with torch.no_grad():
            image_tokens = clip._encode_image(self.images)[1]
            token_embs = clip._encode_text(text)[1]
        parts: dict[str, Callable[[], None]] = {}
        for prefix, positions in (("", length - 1), ("open_clip_", text.shape[1] - 1)):
            image_in = image_tokens.detach().requires_grad_()
            text_in = token_embs[:, :positions].detach().requires_grad_()
            parts[f"{prefix}decoder"] = lambda i=image_in, t=text_in: backward(
                decoder_states(decoder, i, t)
            )
        width, projection = token_embs.shape[-1], decoder.text_projection
        states_trim = torch.randn(len(text), length - 1, width, requires_grad=True)
        states_full = torch.randn(len(text), text.shape[1] - 1, width, requires_grad=True)
        targets = text[:, 1:length]
        valid = targets != 0

        def vocab() -> None:  # vlp: only the positions that have a target
            F.cross_entropy(states_trim[valid] @ projection, targets[valid]).backward()

        def vocab_all_decoded() -> None:  # every decoded position, padding ignored
            logits = states_trim @ projection
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0).backward()

        def vocab_open_clip() -> None:  # CoCaLoss: all context - 1 positions, [B, V, L] layout
            logits = states_full @ projection
            F.cross_entropy(logits.permute(0, 2, 1), text[:, 1:], ignore_index=0).backward()

        parts["vocab_projection_ce"] = vocab
        parts["vocab_projection_ce_all_decoded_positions"] = vocab_all_decoded
        parts["open_clip_vocab_projection_ce"] = vocab_open_clip
        return parts

    def _grads(self) -> list[Any]:
        """One step's gradients, kept so the optimizer part can be timed on its own."""
        self.vlp_step(step=False)
        grads = [p.grad for p in self.vlp.parameters()]
        self.reset()
        return grads

    def reset(self) -> None:
        """No gradients before a part, as in a training step (zero_grad(set_to_none=True))."""
        self.vlp.zero_grad(set_to_none=True)
        self.peer.zero_grad(set_to_none=True)

    @staticmethod
    def _optimizer_step(model, optimizer, grads: list[Any] | None = None) -> None:
        import torch

        if grads is not None:
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def vlp_step(self, step: bool = True) -> None:
        """vlp/train.py's train_step without the data loader (and accelerate's thin wrapper)."""
        out = self.vlp(self.images, self.text[:, None], None)
        loss, _ = self.objective(out, None)
        loss.backward()
        if step:
            self._optimizer_step(self.vlp, self.vlp_optimizer)
            self.vlp_optimizer.zero_grad(set_to_none=True)
            self.objective.after_optimizer_step(self.clip)

    def peer_step(self) -> None:
        """open_clip_train's train_one_epoch body (accum_freq 1, no scaler)."""
        import torch

        self.peer_optimizer.zero_grad()
        out = self.peer(self.images, self.text)
        losses = self.peer_loss(**out, output_dict=True)
        sum(losses.values()).backward()
        self._optimizer_step(self.peer, self.peer_optimizer)
        with torch.no_grad():
            self.peer.logit_scale.clamp_(0, math.log(100))

    def gflop_per_sample(self) -> dict[str, float]:
        """Forward + backward FLOPs counted by torch (matmuls and attention)."""
        from torch.utils.flop_counter import FlopCounterMode

        result = {}
        for tool, model, run in ((VLP, self.vlp, lambda: self.vlp_step(step=False)),
                                 (PEER, self.peer, self._peer_forward_backward)):  # fmt: skip
            with FlopCounterMode(display=False) as counter:
                run()
            model.zero_grad(set_to_none=True)
            result[tool] = round(counter.get_total_flops() / len(self.text) / 1e9, 3)
        return result

    def _peer_forward_backward(self) -> None:
        out = self.peer(self.images, self.text)
        sum(self.peer_loss(**out, output_dict=True).values()).backward()

    def split(self, parts: dict[str, dict[str, float]]) -> dict[str, Any]:
        """Shares of vlp's step (best times), and what the step spends outside the parts."""
        names = ["image_tower", "text_tower", "decoder", "vocab_projection_ce",
                 "contrastive_loss", "optimizer"]  # fmt: skip
        step = parts[f"{VLP}_step"]["best_ms"]
        shares = {n: round(parts[n]["best_ms"] / step, 3) for n in names if n in parts}
        shares["rest"] = round(1 - sum(shares.values()), 3)
        return {"vlp_step_share": shares}


def open_clip_adamw(model: Any) -> Any:
    """open_clip_train.main's optimizer: no decay on < 2-D, norm, bias and logit_scale
    parameters; torch's default AdamW kernel (for-each)."""
    import torch

    from vlp.config import TrainConfig

    cfg = TrainConfig()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keys = ("bn", "ln", "bias", "logit_scale")
    exclude = [p for n, p in named if p.ndim < 2 or any(k in n for k in keys)]
    include = [p for n, p in named if not (p.ndim < 2 or any(k in n for k in keys))]
    groups = [
        {"params": exclude, "weight_decay": 0.0},
        {"params": include, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


# --- report ------------------------------------------------------------------------------


def print_report(
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    s: Settings,
    analysis_result: dict[str, Any] | None,
    unpatched: dict[str, Any] | None,
    probe: dict[str, Any] | None,
) -> None:
    print(
        f"\nbatch {s.batch_size}, lr {s.lr}, warm-up {s.warmup}, seeds 0..n per round; data "
        f"workers vlp {s.vlp_workers}, open_clip {s.peer_workers}; steady = without the first "
        f"{WARMUP_STEPS_EXCLUDED} steps; final loss = mean of the last {FINAL_STEPS} steps"
    )
    print(
        f"{'model/precision':<21}{'tool':<10}{'runs':>5}{'steady/s':>10}{'min-max':>12}"
        f"{'whole/s':>9}{'start s':>8}{'end s':>6}{'wait':>6}{'CPU ms':>7}{'loss 1st':>9}"
        f"{'final':>8}{'±seeds':>7}{'PSS MB':>8}{'others':>7}"
    )
    for group_name, group in summary.items():
        for tool, c in group["per_tool"].items():
            print(
                f"{group_name:<21}{tool:<10}{c['runs']:>5}{c['median_steady_samples_per_s']:>10.1f}"
                f"{c['min_steady_samples_per_s']:>7.1f}-{c['max_steady_samples_per_s']:<5.1f}"
                f"{c['median_whole_samples_per_s']:>8.1f}{c['median_startup_seconds']:>8.1f}"
                f"{c['median_finish_seconds']:>6.1f}"
                f"{c['median_data_wait_fraction']:>6.0%}{c['median_cpu_ms_per_sample']:>7.0f}"
                f"{c['median_first_loss']:>9.3f}"
                f"{c['median_final_loss']:>8.3f}{c['final_loss_spread_over_seeds']:>7.3f}"
                f"{c['median_peak_pss_mb']:>8.0f}{c['median_others_cpu_share']:>7.0%}"
            )
    for group_name, group in summary.items():
        r = group["ratio_vlp_over_open_clip"]
        goal = (
            f" (goal >= {group['goal']:.0f}x: {'met' if group['goal_met'] else 'NOT met'})"
            if "goal" in group
            else ""
        )
        steady = r["steady_samples_per_s"]
        quiet = (
            f" [{steady['paired_median_quiet_rounds']:.2f}x over the {steady['quiet_rounds']} "
            "quiet round(s)]"
            if "quiet_rounds" in steady
            else ""
        )
        print(
            f"{group_name}: vlp/open_clip steady {r['steady_samples_per_s']['paired_median']:.2f}x"
            f"{goal if 'goal' in group else ''}{quiet}, whole command "
            f"{r['whole_samples_per_s']['paired_median']:.2f}x, CPU per sample "
            f"{r['cpu_ms_per_sample']['paired_median']:.2f}x, peak PSS "
            f"{r['peak_pss']['paired_median']:.2f}x; final loss vlp - open_clip "
            f"{group['final_loss_vlp_minus_open_clip']['per_seed']}"
        )
    if unpatched:
        print(
            f"unpatched open_clip CoCa (decoder projection left as torch.empty): first caption "
            f"loss {unpatched['first_step_caption_loss']}, finite: {unpatched['finite']}"
        )
    if probe:
        print(f"open_clip data workers probe: {probe['steady_samples_per_s']} -> {probe['chosen']}")
    if analysis_result:
        print_analysis(analysis_result)
    busiest = max(r["others_cpu_share"] for r in runs)
    if busiest > NOISY_SHARE:
        print(
            f"note: other processes used up to {busiest:.0%} of the machine's CPU during these "
            "runs ('others'): absolute rates are squeezed by it; the paired ratios much less"
        )


def print_analysis(a: dict[str, Any]) -> None:
    mm = a["matmul_gflops"]
    print(
        "\nmatmul GFLOP/s fp32 / bf16: "
        + ", ".join(f"{shape} {v['float32']:.0f} / {v['bfloat16']:.0f}" for shape, v in mm.items())
    )
    for model in (CLIP, COCA):
        m = a[model]
        fp32 = m["fp32"]["parts"]
        print(
            f"{model}: captions {m['mean_caption_tokens']} tokens on average, longest "
            f"{m['longest_caption_tokens']} of {m['context_length']}; GFLOP/sample vlp "
            f"{m['gflop_per_sample'][VLP]}, open_clip {m['gflop_per_sample'][PEER]}"
        )
        print(f"  {'part (fwd+bwd), best ms':<42}{'fp32':>9}{'bf16':>9}{'share':>7}")
        shares = m["fp32"]["vlp_step_share"]
        for name, t in fp32.items():
            share = shares.get(name)
            print(
                f"  {name:<42}{t['best_ms']:>9.0f}{m['bf16']['parts'][name]['best_ms']:>9.0f}"
                f"{'' if share is None else f'{share:>7.0%}'}"
            )
        print(
            f"  rest of vlp's step {shares['rest']:.0%}; vlp data wait in the runs "
            f"{m.get('vlp_data_wait_fraction_in_runs', float('nan')):.1%}; in-process step "
            f"ratio open_clip/vlp {m['in_process_step_ratio_fp32']:.2f}x; bf16 step speed-up "
            f"vlp {m['bf16_step_speedup'][VLP]:.2f}x, open_clip {m['bf16_step_speedup'][PEER]:.2f}x"
        )


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    code = "import torch; print(torch.cuda.get_device_name())"
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    return f"{device}: {name.strip()}"


def result_payload(
    s: Settings,
    tools: Tools,
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    analysis_result: dict[str, Any] | None,
    unpatched: dict[str, Any] | None,
    probe: dict[str, Any] | None,
) -> dict[str, Any]:
    example = {
        tool: Job(tool, model, "fp32", 0, s.clip_samples if model == CLIP else s.coca_samples)
        for tool, model in ((VLP, CLIP), (PEER, CLIP))
    }
    out = HERE / "runs" / "RUN"
    commands = {
        VLP: vlp_command(example[VLP], s, out),
        PEER: peer_command(example[PEER], s, tools, out),
    }
    return {
        "benchmark": NAME,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git": None,
        "machine": {
            **machine_info(),
            "torch": dist_version(sys.executable, "torch"),
            "open_clip_torch": dist_version(sys.executable, "open_clip_torch"),
            "peer_torch": dist_version(tools.peer_python, "torch"),
            "peer_open_clip_torch": dist_version(tools.peer_python, "open_clip_torch"),
            "peer_webdataset": dist_version(tools.peer_python, "webdataset"),
            "device": device_name(s.device),
        },
        "settings": {
            **asdict(s),
            "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED,
            "final_loss_steps": FINAL_STEPS,
            "shards": f"{shard_pattern(s)} ({s.demo_samples} demo samples)",
            "peer": "open_clip_train.main, unpatched, via bench/.work wrapper registering "
            "configs/models; CoCa runs are a patched peer: text_decoder.text_projection "
            "initialised like vlp's (normal, std width^-0.5) right after model creation",
            "peer_workers_choice": PEER_WORKERS_NOTE,
            "commands": {
                tool: [a.replace(f"{REPO}/", "") for a in cmd] for tool, cmd in commands.items()
            },
        },
        "peer_workers_probe": probe,
        "unpatched_peer_coca_start": unpatched,
        "runs": runs,
        "summary": summary,
        "analysis": analysis_result,
    }


if __name__ == "__main__":
    sys.exit(main())
