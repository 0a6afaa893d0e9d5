"""The training loop: `Trainer(cfg).train()` builds everything from a config and runs it.

The command line around it (`accelerate launch vlp/train.py`, `vlp-train`) is vlp/cli.py.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from eval.during_training import open_evaluators
from eval.models import EvalModel
from vlp import checkpoint, distributed, engine, rundir, runstate
from vlp.config import Config, ConfigError, to_dict, to_yaml
from vlp.data.pipeline import Batch, ShardSubset, build_loader
from vlp.data.transforms import split_for_device
from vlp.gradcache import coupled_terms, grad_cache_step
from vlp.method import Loop, Method, method_class
from vlp.metrics import MetricsLogger, is_time
from vlp.model import OpenClipHub, build_model
from vlp.objectives import WeightedObjective
from vlp.optim import build_optimizer, lr_at
from vlp.runlayout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    CheckpointMeta,
    checkpoint_name,
)
from vlp.steplog import LogWindow, NonFiniteWatch, skipped_samples
from vlp.stopping import Stopped, StopRequests
from vlp.throughput import FlopModel, WorkCounter, peak_tflops

PROG = "vlp-train"


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
        method = method_class(self.objective)
        unused = method.find_unused_parameters
        fsdp = engine.take_fsdp_request()
        self.accelerator = distributed.new_accelerator(
            mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
            log_with=list(cfg.run.trackers),
            project_dir=str(self.run_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if unused
            else None,
        )
        self.engine = engine.new_engine(self.accelerator, fsdp)
        # rank 0 locks the run directory and decides how the run starts (fresh, resumed, ...)
        self.lock, self.start = distributed.decided_on_rank0(
            lambda: rundir.claim(self.run_dir, cfg.resume, overwrite, PROG)
        )
        try:
            self._build(method)
        except BaseException:
            self.close()
            raise

    def _build(self, method: type[Method]) -> None:
        cfg = self.cfg
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(distributed.cpu_threads(cfg.train.threads))
        set_seed(cfg.train.seed)
        torch.use_deterministic_algorithms(cfg.train.deterministic)
        model, train_transform, eval_transform, tokenizer = build_model(
            cfg.model, patch_emb=self.objective.needs_patches
        )
        self.worker_transform, self.to_input = split_for_device(train_transform)
        self.tokenizer = tokenizer
        self.method = method(self._loop())
        self.method.prepare_model(model)
        self.hub = OpenClipHub.of(cfg.model, model.clip)
        self.objective.check_model(model)
        if cfg.train.grad_cache and not coupled_terms(self.objective):
            raise ConfigError(
                "train.grad_cache=true needs a term that couples the batch (the contrastive "
                "loss with a non-zero weight); set it to false"
            )
        self.objective.prepare_model(model)
        peak = peak_tflops(cfg.train.peak_tflops, self.accelerator.device, cfg.train.precision)
        self.work = WorkCounter(FlopModel(model, tokenizer.context_length), peak)
        if cfg.train.compile:  # in place: state-dict keys (checkpoint, export) stay the model's
            model.compile()
        self.model, self.optimizer = self.engine.prepare(
            model, lambda m: build_optimizer(m, cfg.train, self.method.visual_groups), cfg,
            self.method.not_shardable,
        )  # fmt: skip
        self.step, self.positions, self.saved_step = 0, {}, -1
        self.changes: dict[str, list[Any]] = {}
        self.nonfinite = NonFiniteWatch(self.accelerator.device)
        start_meta = self._resume()
        self._start_run(start_meta)
        self.evaluators = open_evaluators(cfg.eval, cfg.train.steps, self._message)
        self.eval_model = self._eval_model(eval_transform, tokenizer)

    def close(self) -> None:
        """Release the run directory (idempotent; train() does it when it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _resume(self) -> Path | None:
        """Restore the checkpoint the run starts from (None: a fresh start); its path."""
        if self.start.checkpoint is None:
            return None
        path = Path(self.start.checkpoint)
        meta = CheckpointMeta.read(path)
        runstate.check_resume(meta, path, self.cfg, self._stream_identity())
        self.changes = rundir.config_changes(meta.config, to_dict(self.cfg))
        checkpoint.load(self.engine, path)
        self.step = meta.step
        if path.parent.resolve() == (self.run_dir / CHECKPOINT_DIR).resolve():
            self.saved_step = self.step
        self.method.load_state(path)
        self.positions = runstate.rank_positions(meta)
        return path

    def _loop(self) -> Loop:
        """What the method may use of the trainer."""
        return Loop(
            cfg=self.cfg,
            global_batch=self.global_batch,
            accelerator=self.accelerator,
            open_loader=self._open_loader,
            model=lambda: self.engine.unwrapped(),
            objective=self.objective,
            worker_transform=self.worker_transform,
            tokenizer=self.tokenizer,
            to_input=self.to_input,
            message=self._message,
        )

    def _open_loader(
        self,
        consumed: int,
        seed: int | None = None,
        subset: ShardSubset | None = None,
        fresh: bool = False,
    ):
        """The training loader from self.positions (`fresh`: from the start of `subset`)."""
        if fresh:
            self.positions = {}
        return build_loader(
            self.cfg.data,
            self.cfg.train.seed if seed is None else seed,
            self.worker_transform,
            self.tokenizer,
            distributed.rank(),
            distributed.world_size(),
            self.positions,
            consumed,
            pin_memory=self.accelerator.device.type == "cuda",
            subset=subset,
        )

    def _start_run(self, resumed: Path | None) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(to_yaml(self.cfg))
        acc.init_trackers(self.run_dir.name)
        self.logger = MetricsLogger(self.run_dir, acc, self.cfg.train.steps, self.step)
        moved = self.start.moved_to
        if moved:
            self._message(f"moved the run that was in {self.run_dir} to {moved} (--overwrite)")
        where = f"resumed from {resumed} at step {self.step}" if resumed else "started"
        self._message(f"{where}; run directory {self.run_dir}{self.engine.describe()}")
        history = self.run_dir / HISTORY_FILE
        if self.changes:
            self._message(
                f"warning: resuming with a changed config: {rundir.describe_changes(self.changes)}"
                f" (recorded in {history})"
            )
        if acc.is_main_process:
            rundir.record(
                self.run_dir, "resume" if resumed else "start", step=self.step,
                checkpoint=resumed and str(resumed), moved_previous_run_to=moved,
                changed=self.changes, processes=distributed.world_size(), argv=sys.argv,
            )  # fmt: skip

    def _eval_model(self, transform, tokenizer) -> EvalModel:
        """The open_clip module evaluations call: the live one (under FSDP rank 0's copy, which
        the engine refreshes before each evaluation)."""
        acc, cfg = self.accelerator, self.cfg
        return EvalModel(self.engine.eval_module(), transform, tokenizer, cfg.model.name,
                         pretrained=f"{self.run_dir} (during training)", device=acc.device,
                         precision=cfg.train.precision)  # fmt: skip

    def _message(self, text: str) -> None:
        self.logger.message(f"{PROG}: {text}")

    def _stream_identity(self) -> dict[str, Any]:
        return runstate.stream_identity(self.cfg, self.method.stream_identity())

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
        cfg, batches = self.cfg, None
        window = LogWindow(self.work)
        while self.step < cfg.train.steps:
            stop = distributed.max_over_ranks(self.stops.signum)  # every rank, the same step
            if stop:
                self._stop(stop)
            batches = self.method.batches(self.step, batches)
            logs, step_wait = self._step_unless_workers_gone(batches)
            self.step += 1
            window.add(step_wait)
            log_now = is_time(self.step, cfg.train.log_every_steps, cfg.train.steps)
            save_now = is_time(self.step, cfg.checkpoint.every_steps, cfg.train.steps)
            if log_now or save_now or self.step == cfg.train.steps:
                self.nonfinite.raise_if_any(self.step, logs)  # never log or save past it
            if log_now:
                skipped = skipped_samples(self.positions)
                self.logger.log(self.step, window.close(logs, skipped, self.global_batch))
            # before the checkpoint, so a run resumed from it never lacks this evaluation
            if self.evaluators.due(self.step):
                self.engine.sync_eval_module()
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
            f"done at step {self.step}; checkpoints in {self.run_dir / CHECKPOINT_DIR}, "
            f"metrics in {self.run_dir / METRICS_FILE}"
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
            path = self.run_dir / CHECKPOINT_DIR / checkpoint_name(self.step)
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
        train_cfg = self.cfg.train
        lr = lr_at(
            self.step, train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr
        )
        rates = self.method.group_lrs(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = rates["visual"] if group.get("visual") else lr
        if train_cfg.grad_cache and train_cfg.grad_accum > 1:
            totals, wait = self._grad_cache_micro_steps(batches)
        else:
            totals, wait = self._micro_steps(batches)
        self.engine.finish_gradients()
        if train_cfg.grad_clip > 0:
            totals["grad_norm"] = self.engine.clip_grad_norm(train_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model = self.engine.unwrapped()
        self.objective.after_optimizer_step(model)
        self.method.after_step(model)
        totals["lr"] = lr
        totals.update({f"lr_{mark}": rate for mark, rate in rates.items()})
        totals.update(model.temperatures())
        return totals, wait

    def _micro_steps(self, batches) -> tuple[dict[str, Any], float]:
        """Backward over grad_accum micro-batches, each its own loss; (mean logs, wait)."""
        accum = self.cfg.train.grad_accum
        totals: dict[str, Any] = {}
        wait = 0.0
        for micro in range(accum):
            batch, seconds = self._next(batches)
            wait += seconds
            sync = micro == accum - 1  # all-reduce gradients on the last only
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                loss, logs = self._loss(batch)
                self.engine.backward(loss / accum)
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
        logs = grad_cache_step(
            self._forward, self.objective, micro_batches, self.engine.backward, self.engine.no_sync
        )
        self.nonfinite.note(logs["loss/total"], self.step + 1)
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
        self.work.add(batch)
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
        self.nonfinite.note(loss, self.step + 1)
        return loss, logs

    def save(self) -> None:
        meta = runstate.checkpoint_meta(
            self.step, self.global_batch, self.cfg, self.positions, self._stream_identity()
        )
        path = checkpoint.save(
            self.engine,
            self.run_dir,
            self.step,
            meta,
            self.cfg.checkpoint.keep,
            extra=self.method.state_writer(self.step),
            hub=self.hub,
        )
        self.saved_step = self.step
        self._message(f"saved {path}")
