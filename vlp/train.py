"""Train CLIP or CoCa: `accelerate launch vlp/train.py --config configs/X.yaml key=value ...`.

With no arguments it trains configs/demo.yaml (building the demo shards first if they are missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file: import the vlp package, not this file's siblings as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import torch  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DistributedDataParallelKwargs,
    is_wandb_available,
    set_seed,
)
from torch.utils.data import DataLoader  # noqa: E402

from eval.during_training import open_evaluators  # noqa: E402
from eval.models import EvalModel  # noqa: E402
from vlp import checkpoint, distributed, rundir, runlock  # noqa: E402
from vlp.config import Config, ConfigError, load_config, to_dict, to_yaml  # noqa: E402
from vlp.data import format as fmt  # noqa: E402
from vlp.data.pipeline import Batch, Position, build_loader, mix, sample_decoder  # noqa: E402
from vlp.data.shards import DataError, expand_shards  # noqa: E402
from vlp.data.transforms import split_for_device  # noqa: E402
from vlp.episodes import (  # noqa: E402
    Clustering,
    EpisodePlan,
    EpisodeState,
    FeatureStream,
    Teacher,
    build_state,
    feature_pass,
)
from vlp.gradcache import coupled_terms, grad_cache_step  # noqa: E402
from vlp.metrics import MetricsLogger, is_time  # noqa: E402
from vlp.model import build_model  # noqa: E402
from vlp.objectives import WeightedObjective  # noqa: E402
from vlp.optim import build_optimizer, lr_at  # noqa: E402
from vlp.stopping import Stopped, StopRequests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
PROG = "vlp-train"


class NonFiniteLoss(FloatingPointError):
    pass


class _WorkersGone(Exception):
    """After a stop request, the step's batch could not be read: a launcher or scheduler
    terminated the data workers along with this process."""


class Trainer:
    """Builds everything from the config, then `train()` runs the loop to `train.steps`."""

    def __init__(
        self, cfg: Config, overwrite: bool = False, stops: StopRequests | None = None
    ) -> None:
        """`overwrite`: move a run already in run.output_dir aside instead of refusing to start
        (vlp/rundir.py); `stops`: the signal handlers whose requests end the run early."""
        self.cfg = cfg
        self.stops = stops if stops is not None else StopRequests()
        self.run_dir = Path(cfg.run.output_dir)
        self.objective = WeightedObjective(cfg.objectives)
        episodic = self.objective.needs_episodes
        self.accelerator = distributed.new_accelerator(
            mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
            log_with=trackers(cfg.run.trackers),
            project_dir=str(self.run_dir),
            # the prototype heads train only in clustering episodes
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if episodic
            else None,
        )
        self.lock, self.start = self._claim(overwrite)
        try:
            self._build(episodic)
        except BaseException:
            self.close()
            raise

    def _build(self, episodic: bool) -> None:
        cfg = self.cfg
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(distributed.cpu_threads(cfg.train.threads))
        set_seed(cfg.train.seed)
        torch.use_deterministic_algorithms(cfg.train.deterministic)
        model, train_transform, eval_transform, tokenizer = build_model(
            cfg.model, patch_emb=self.objective.needs_patches
        )
        self.episodes = EpisodePlan.from_config(cfg, self.global_batch) if episodic else None
        if episodic:
            protos = cfg.prototypes
            model.add_prototype_heads(protos.head_hidden, protos.head_dim, protos.head_layers)
        if "caption" in self.objective.terms and not model.has_decoder:
            raise ConfigError(
                f"objectives.caption.weight={cfg.objectives.caption.weight} but model "
                f"{cfg.model.name} has no text decoder: set it to 0 or use a CoCa model"
            )
        if cfg.train.grad_cache and not coupled_terms(self.objective):
            raise ConfigError(
                "train.grad_cache=true needs a term that couples the batch (the contrastive "
                "loss with a non-zero weight); set it to false"
            )
        self.objective.prepare_model(model)
        if cfg.train.compile:
            model = torch.compile(model)
        lit = self.episodes is not None and self.episodes.lit_start_step is not None
        optimizer = build_optimizer(model, cfg.train, visual_groups=lit)
        distributed.configure_engine(
            self.accelerator, cfg.data.batch_size, cfg.train.grad_accum, cfg.train.grad_clip
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step, self.positions, self.saved_step = 0, {}, -1
        self.changes: dict[str, list[Any]] = {}
        # first step whose loss was not finite (-1: none); read only where the loop syncs anyway
        self.first_nonfinite = torch.tensor(-1, device=self.accelerator.device)
        self.episode_state: EpisodeState | None = None
        start_meta = self._resume()
        self.worker_transform, self.to_input = split_for_device(train_transform)
        self.tokenizer = tokenizer
        if self.episodes is None:
            self.loader = self._open_loader(self.step * cfg.train.grad_accum)
        self._start_run(start_meta)
        self.evaluators = open_evaluators(cfg.eval, cfg.train.steps, self._message)
        self.eval_model = self._eval_model(eval_transform, tokenizer)

    def _claim(self, overwrite: bool) -> tuple[runlock.RunLock | None, rundir.Start]:
        """Rank 0 locks the run directory and decides how the run starts; every rank gets the
        decision, or the refusal, by a broadcast, so a refused start never leaves one waiting."""
        lock, outcome = None, None
        if distributed.rank() == 0:
            try:
                lock, outcome = rundir.claim(self.run_dir, self.cfg.resume, overwrite, PROG)
            except Exception as err:  # raised on every rank, below
                outcome = err
        outcome = distributed.broadcast_object(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return lock, outcome

    def close(self) -> None:
        """Release the run directory (idempotent; train() does it when it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _resume(self) -> dict[str, Any] | None:
        if self.start.checkpoint is None:
            return None
        path = Path(self.start.checkpoint)
        meta = json.loads((path / checkpoint.META_FILE).read_text())
        saved_model = meta["config"]["model"]["name"]
        if saved_model != self.cfg.model.name:
            raise ConfigError(f"resume: {path} holds a {saved_model}, not {self.cfg.model.name}")
        changed = [k for k, v in self._stream_identity().items() if meta["data"]["stream"][k] != v]
        if changed:
            raise ConfigError(
                f"resume: {path} was trained on a different data stream ({', '.join(changed)} "
                "changed), so it cannot continue exactly; restore them or use a new run.output_dir"
            )
        self.changes = rundir.config_changes(meta["config"], to_dict(self.cfg))
        checkpoint.load(self.accelerator, path)
        self.step = meta["step"]
        if path.parent.resolve() == (self.run_dir / checkpoint.CHECKPOINT_DIR).resolve():
            self.saved_step = self.step
        self.episode_state = EpisodeState.load(path)
        saved = meta["data"]["positions"][distributed.rank()]
        self.positions = {int(w): Position.from_dict(p) for w, p in saved.items()}
        meta["path"] = str(path)
        return meta

    def _open_loader(self, consumed: int, episode: int | None = None):
        """The training loader from self.positions; `episode`: that episode's shards only."""
        seed, shards = self.cfg.train.seed, None
        if episode is not None:
            seed, shards = mix(seed, 3, episode), self.episodes.shards(episode)
        return build_loader(
            self.cfg.data,
            seed,
            self.worker_transform,
            self.tokenizer,
            distributed.rank(),
            distributed.world_size(),
            self.positions,
            consumed,
            pin_memory=self.accelerator.device.type == "cuda",
            episode_shards=shards,
        )

    def _begin_episode(self):
        """The episode of self.step: its state (clustered now, or restored by a resume within
        it) given to the objectives, and an iterator over its shards."""
        plan, step = self.episodes, self.step
        episode = plan.episode(step)
        first, fresh = plan.first_step(episode), step == plan.first_step(episode)
        clusters = plan.clusters(episode)
        last = min(first + plan.steps_per_episode, self.cfg.train.steps)
        what = "prototypes" if clusters else "without prototypes (warm-up or LiT)"
        self._message(f"episode {episode}: steps {first + 1}-{last}, {what}")
        if fresh:
            self.positions = {}  # positions restored at an episode's end belong to the last one
            self.episode_state = self._cluster(episode) if clusters else None
        elif clusters and self.episode_state is None:
            raise checkpoint.CheckpointError("the checkpoint lacks its episode's state")
        state = self.episode_state
        self.objective.set_episode(None if state is None else state.to(self.accelerator.device))
        return iter(self._open_loader((step - first) * self.cfg.train.grad_accum, episode))

    def _cluster(self, episode: int) -> EpisodeState:
        """Feature pass over the episode's shards, then k-means (collective)."""
        cfg, device, started = self.cfg, self.accelerator.device, time.monotonic()
        stream = FeatureStream(
            self.episodes.shards(episode),
            sample_decoder(cfg.data, self.worker_transform, self.tokenizer),
            cfg.prototypes.feature_batch_size or cfg.data.batch_size,
            mix(cfg.train.seed, 5, episode),
            distributed.rank(),
            distributed.world_size(),
        )
        cuda = device.type == "cuda"
        loader = DataLoader(stream, None, num_workers=cfg.data.workers, pin_memory=cuda)
        model = self.accelerator.unwrap_model(self.model)
        autocast = self.accelerator.autocast
        bank = feature_pass(model, loader, self.to_input, device, autocast, self._message)
        seconds, share = time.monotonic() - started, distributed.world_size() > 1
        where = " (this process's share)" if share else ""
        self._message(f"feature pass: {len(bank.keys)} samples{where} in {seconds:.1f} s")
        protos, external = cfg.prototypes, cfg.objectives.prototype_external
        clustering = Clustering(
            protos.clusters,
            protos.kmeans_iters,
            protos.kmeans_redo,
            protos.kmeans_backend,
            mix(cfg.train.seed, 7, episode),
        )
        teacher = Teacher(external.teacher, external.pca_dim) if external.weight else None
        return build_state(bank, clustering, teacher, device, self._message)

    def _start_run(self, resumed: dict[str, Any] | None) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        acc.init_trackers(self.run_dir.name)
        self.logger = MetricsLogger(self.run_dir, acc, self.cfg.train.steps, self.step)
        moved = self.start.moved_to
        if moved:
            self._message(f"moved the run that was in {self.run_dir} to {moved} (--overwrite)")
        where = f"resumed from {resumed['path']} at step {self.step}" if resumed else "started"
        threads = f"; {torch.get_num_threads()} CPU threads" if acc.device.type == "cpu" else ""
        self._message(f"{where}; run directory {self.run_dir}{threads}")
        history = self.run_dir / rundir.HISTORY_FILE
        if self.changes:
            self._message(
                f"warning: resuming with a changed config: {rundir.describe_changes(self.changes)}"
                f" (recorded in {history})"
            )
        if acc.is_main_process:
            rundir.record(
                self.run_dir, "resume" if resumed else "start", step=self.step,
                checkpoint=resumed and resumed["path"], moved_previous_run_to=moved,
                changed=self.changes, processes=distributed.world_size(), argv=sys.argv,
            )  # fmt: skip

    def _eval_model(self, transform, tokenizer) -> EvalModel:
        """The live open_clip module (not a copy), so evaluations see the current weights."""
        return EvalModel(
            self.accelerator.unwrap_model(self.model).clip,
            transform,
            tokenizer,
            self.cfg.model.name,
            pretrained=f"{self.run_dir} (during training)",
            device=self.accelerator.device,
            precision=self.cfg.train.precision,
        )

    def _message(self, text: str) -> None:
        self.logger.message(f"{PROG}: {text}")

    def _stream_identity(self) -> dict[str, Any]:
        """Everything the batch stream depends on; a resume must find it unchanged."""
        data = self.cfg.data
        return {
            "train_shards": data.train_shards,
            "sources": [asdict(source) for source in data.sources],
            "mode": data.mode,
            "seed": self.cfg.train.seed,
            "shuffle_buffer": data.shuffle_buffer,
            "batch_size": data.batch_size,
            "grad_accum": self.cfg.train.grad_accum,
            "workers": max(1, data.workers),
            "processes": distributed.world_size(),
            "keys": [data.image_key, data.text_key, data.caption, data.decoder_caption]
            + ([asdict(data.subcaptions)] if data.caption == "subcaptions" else []),
            "prototypes": asdict(self.cfg.prototypes) if self.episodes is not None else None,
        }

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * distributed.world_size()

    def train(self) -> None:
        """Run to train.steps, or until a stop request (raises Stopped); releases the run
        directory either way."""
        try:
            self._train()
        finally:
            self.close()

    def _train(self) -> None:
        cfg, plan = self.cfg, self.episodes
        batches = iter(self.loader) if plan is None else None
        window_start, window_steps, wait = time.perf_counter(), 0, 0.0
        while self.step < cfg.train.steps:
            stop = distributed.max_over_ranks(self.stops.signum)  # every rank, the same step
            if stop:
                self._stop(stop)
            if plan is not None and (batches is None or self.step % plan.steps_per_episode == 0):
                batches = self._begin_episode()
            logs, step_wait = self._step_unless_workers_gone(batches)
            self.step += 1
            window_steps, wait = window_steps + 1, wait + step_wait
            log_now = is_time(self.step, cfg.train.log_every_steps, cfg.train.steps)
            save_now = is_time(self.step, cfg.checkpoint.every_steps, cfg.train.steps)
            if log_now or save_now or self.step == cfg.train.steps:
                self._stop_if_nonfinite(logs)  # never log or save past a non-finite loss
            if log_now:
                elapsed = time.perf_counter() - window_start
                self.logger.log(self.step, self._log_record(logs, window_steps, elapsed, wait))
                window_start, window_steps, wait = time.perf_counter(), 0, 0.0
            # before the checkpoint, so a run resumed from it never lacks this evaluation
            evaluation = self.evaluators.run(self.step, self.eval_model)
            if evaluation:
                self.logger.log(self.step, evaluation)
            if save_now:
                self.save()
        self.logger.close()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            rundir.record(self.run_dir, "finish", step=self.step)
        self._message(
            f"done at step {self.step}; checkpoints in {self.run_dir / 'checkpoints'}, "
            f"metrics in {self.run_dir / 'metrics.jsonl'}"
        )

    def _step_unless_workers_gone(self, batches) -> tuple[dict[str, Any], float]:
        """train_step; but if a launcher terminated the data workers with this process after a
        stop request (accelerate launch and SLURM signal every descendant) and the step lacks
        a batch, stop at the last complete step."""
        positions = dict(self.positions)
        try:
            return self.train_step(batches)
        except _WorkersGone:
            pass
        self.positions = positions  # the failed step's batches were never trained
        self.optimizer.zero_grad(set_to_none=True)
        self._stop(self.stops.signum)

    def _stop(self, signum: int) -> NoReturn:
        """A stop request reached every rank by this step boundary: checkpoint the steps not yet
        saved, say how to continue, raise Stopped."""
        name = signal.Signals(signum).name
        if self.step > 0 and self.saved_step != self.step:
            self.save()
        path = None
        if self.step > 0:
            path = self.run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.checkpoint_name(self.step)
        self.logger.close()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            found = str(path) if path else None
            rundir.record(self.run_dir, "stop", signal=name, step=self.step, checkpoint=found)
        kept = f"{path} holds it; resume=latest continues from there" if path else "nothing saved"
        self._message(f"stopped by {name} at step {self.step}: {kept}")
        raise Stopped(signum)

    def train_step(self, batches) -> tuple[dict[str, Any], float]:
        """One optimizer step over `grad_accum` micro-batches; returns (logs, seconds waiting).

        Logged values stay tensors (no device sync) until a log step reads them.
        """
        train_cfg, acc = self.cfg.train, self.accelerator
        lr = lr_at(
            self.step, train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr
        )
        visual_lr = self._visual_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = visual_lr if group.get("visual") else lr
        if train_cfg.grad_cache and train_cfg.grad_accum > 1:
            totals, wait = self._grad_cache_micro_steps(batches)
        else:
            totals, wait = self._micro_steps(batches)
        if train_cfg.grad_clip > 0:
            totals["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), train_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model = acc.unwrap_model(self.model)
        self.objective.after_optimizer_step(model)
        totals["lr"] = lr
        if visual_lr is not None:
            totals["lr_visual"] = visual_lr
        totals["logit_scale"] = model.logit_scale.detach().exp()
        bias = getattr(model.clip, "logit_bias", None)  # SigLIP models only
        if bias is not None:
            totals["logit_bias"] = bias.detach()
        if model.patch_emb:
            totals["logit_scale_local"] = model.logit_scale_local.detach().exp()
        if model.has_heads:
            with torch.no_grad():
                model.logit_scale_proto.clamp_(0, math.log(self.cfg.prototypes.max_logit_scale))
            totals["logit_scale_proto"] = model.logit_scale_proto.detach().exp()
        return totals, wait

    def _visual_lr(self) -> float | None:
        """With a LiT phase, the image tower's own rate (its parameter groups are marked
        `visual`): a cosine that reaches 0 at the phase's first step and stays 0."""
        lit = self.episodes.lit_start_step if self.episodes is not None else None
        if lit is None:
            return None
        train_cfg = self.cfg.train
        return lr_at(self.step, train_cfg.lr, train_cfg.warmup_steps, lit + 1, 0.0)

    def _micro_steps(self, batches) -> tuple[dict[str, Any], float]:
        """Backward over grad_accum micro-batches, each its own loss; (mean logs, wait)."""
        acc, accum = self.accelerator, self.cfg.train.grad_accum
        totals: dict[str, Any] = {}
        wait = 0.0
        for micro in range(accum):
            batch, seconds = self._next(batches)
            wait += seconds
            sync = micro == accum - 1  # all-reduce gradients on the last only
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss, logs = self._loss(batch)
                acc.backward(loss / accum)
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + value / accum
        return totals, wait

    def _grad_cache_micro_steps(self, batches) -> tuple[dict[str, Any], float]:
        """train.grad_cache: the coupled terms see all micro-batches at once (vlp/gradcache.py)."""
        micro_batches, wait = [], 0.0
        for _ in range(self.cfg.train.grad_accum):
            batch, seconds = self._next(batches)
            micro_batches.append(batch)
            wait += seconds
        acc = self.accelerator
        logs = grad_cache_step(
            self._forward,
            self.objective,
            micro_batches,
            acc.backward,
            lambda: acc.no_sync(self.model),
        )
        self._note_nonfinite(logs["loss/total"])
        return logs, wait

    def _next(self, batches) -> tuple[Batch, float]:
        """The next batch, the seconds spent waiting for it; records its data position."""
        started = time.perf_counter()
        try:
            batch: Batch = next(batches)
        except (RuntimeError, EOFError, ConnectionError):
            # a dead worker: "exited unexpectedly", or its prefetched batch's shared memory gone
            if not self.stops.signum or distributed.world_size() > 1:  # ranks would disagree
                raise
            raise _WorkersGone from None
        self.positions[batch.worker] = batch.position
        return batch, time.perf_counter() - started

    def _forward(self, batch: Batch):
        device = self.accelerator.device
        decoder = batch.decoder_text
        return self.model(
            self.to_input(batch.images.to(device, non_blocking=True)),
            batch.text.to(device, non_blocking=True),
            None if decoder is None else decoder.to(device, non_blocking=True),
        )

    def _loss(self, batch: Batch):
        loss, logs = self.objective(self._forward(batch), batch)
        self._note_nonfinite(loss)
        return loss, logs

    def _note_nonfinite(self, loss) -> None:
        """Record the step of a non-finite loss on the device: checking it here would make the
        host wait for every forward pass (a GPU idles meanwhile)."""
        first = self.first_nonfinite
        bad = ~torch.isfinite(loss.detach()) & (first < 0)
        self.first_nonfinite = first.masked_fill(bad, self.step + 1)

    def _stop_if_nonfinite(self, logs: dict[str, Any]) -> None:
        """Every process stops together (collective), naming the first bad step of any."""
        steps = [int(s) for s in distributed.gather(self.first_nonfinite.view(1)) if s >= 0]
        if steps:
            first = min(steps)
            terms = ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
            raise NonFiniteLoss(f"non-finite loss at step {first} (at step {self.step}: {terms})")

    def _skipped(self) -> Counter:
        """Skipped samples by reason across this process's workers."""
        total: Counter = Counter()
        for position in self.positions.values():
            total.update(position.bad)
        return total

    def _log_record(self, logs: dict[str, Any], steps: int, elapsed: float, wait: float):
        """Values averaged over processes and skipped samples summed (collective; log steps)."""
        local = {name: float(value) for name, value in logs.items()}
        local["data_wait"] = wait / elapsed
        everyone = distributed.all_gather_objects((local, dict(self._skipped())))
        record = {name: sum(v[name] for v, _ in everyone) / len(everyone) for name in local}
        record["samples_per_s"] = steps * self.global_batch / elapsed
        skipped: Counter = Counter()
        for _, counts in everyone:
            skipped.update(counts)
        record.update({f"data/skipped/{reason}": n for reason, n in sorted(skipped.items())})
        return record

    def save(self) -> None:
        all_positions = distributed.all_gather_objects(
            {w: asdict(p) for w, p in self.positions.items()}
        )
        skipped: Counter = Counter()
        for rank_positions in all_positions:
            for position in rank_positions.values():
                skipped.update(position["bad"])
        meta = {
            "step": self.step,
            "samples_seen": self.step * self.global_batch,
            "config": to_dict(self.cfg),
            "data": {"positions": all_positions, "stream": self._stream_identity()},
            "skipped": dict(skipped),
        }
        state, plan = self.episode_state, self.episodes
        within = state is not None and self.step % plan.steps_per_episode != 0
        path = checkpoint.save(
            self.accelerator,
            self.model,
            self.run_dir,
            self.step,
            meta,
            self.cfg.checkpoint.keep,
            extra=state.save if within else None,  # a resume within the episode needs it
        )
        self.saved_step = self.step
        self._message(f"saved {path}")


def trackers(names: list[str]) -> list[str]:
    """accelerate's trackers for `run.trackers`; a missing optional package is a config error."""
    if "wandb" in names and not is_wandb_available():
        raise ConfigError("run.trackers: wandb is not installed; `pip install wandb` or drop it")
    return list(names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML run config (default: {DEFAULT_CONFIG.relative_to(REPO)})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if run.output_dir already holds a run, move it aside to OUTPUT_DIR.old-N and "
        "start afresh (default: refuse; resume=latest continues it)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.lr=1e-3 data.batch_size=32",
    )
    return parser.parse_args(argv)


def ensure_demo_shards(cfg: Config, wait_seconds: float = 3600) -> None:
    """The default run trains on the demo shards: the first process builds them if missing.

    The demo eval sets the config evaluates are checked too (the builder writes them after the
    training shards, and resumes where it stopped). Runs before the process group exists, so
    ranks come from the launcher's environment; the other processes wait for the builder's
    sizes.json (written last, when every shard is done).
    """
    urls = expand_shards(cfg.data.train_shards)
    train_dir = Path(urls[0]).parent
    eval_dirs = [Path(e.dataset) for e in cfg.eval.values()]
    demo_eval = [d for d in eval_dirs if d.parent == train_dir.parent / "eval"]
    if (
        (train_dir / "sizes.json").exists()
        and all(Path(u).exists() for u in urls)
        and all((d / fmt.DATASET_TYPE_FILE).exists() for d in demo_eval)
    ):
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: building the demo shards in {train_dir.parent}", file=sys.stderr)
        command = [sys.executable, "-m", "data_tools", "demo", str(train_dir.parent)]
        if subprocess.run(command).returncode != 0:
            raise DataError(f"building the demo shards failed: {' '.join(command)}")
        return
    deadline = time.monotonic() + wait_seconds
    while not (train_dir / "sizes.json").exists():
        if time.monotonic() > deadline:
            raise DataError(f"gave up waiting for the demo shards in {train_dir}")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with StopRequests(PROG) as stops:
        return _run(args, stops)


def _run(args: argparse.Namespace, stops: StopRequests) -> int:
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.config is None:
            ensure_demo_shards(cfg)
        Trainer(cfg, args.overwrite, stops).train()
    except Stopped as stop:  # its checkpoint and message are out
        return stop.exit_code
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted: stopped at once, nothing saved since the newest checkpoint "
            "(resume=latest continues from it)",
            file=sys.stderr,
        )
        return 130
    except (ConfigError, DataError, runlock.Busy) as err:
        print(f"{PROG}: error: {_last_line(err)}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, checkpoint.CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in checkpoint.OUTPUT_ERRNOS:
            raise
        # disk full or read-only output: what failed and where, not a traceback
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"{PROG}: error: {_last_line(err)}{where}", file=sys.stderr)
        return 1
    return 0


def _last_line(err: Exception) -> str:
    # errors raised in DataLoader workers arrive wrapped with the worker's traceback
    return str(err).strip().splitlines()[-1].removeprefix(f"{type(err).__name__}: ")


if __name__ == "__main__":
    raise SystemExit(main())
