"""ProtoCLIP's episodes on webdataset shards: the plan, and the method that runs them.

An episode is a fixed set of shards. Episode e takes the next `episode_shards` shards of a
seeded permutation of all shards (a new permutation once every shard was used), so every rank
derives the same episode from (seed, e) without communication. An episode that clusters starts
with a feature pass over its shards and k-means of both heads' outputs (vlp/episode_state.py);
its training steps then read the same shards and look each sample's labels up by its key. The
first `warmup_episodes` and the last `lit_episodes` do not cluster; in the LiT phase the image
tower's learning rate has decayed to 0.

`EpisodeRunner` is the `episodes` method (vlp/method.py) that the prototype terms ask for: the
trainer iterates its batch schedule and calls its hooks, and names none of this.

Deviations from the reference (methods/protoclip_baselines.md §1.11): episodes are shard sets
drawn without replacement, not E rows drawn with replacement; the external teacher is computed
per episode (PCA fitted on the episode's captions), not once over the dataset.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlp import distributed
from vlp.checkpoint import CheckpointError
from vlp.config import Config, ConfigError
from vlp.data.pipeline import Batch, ShardSubset, mix, sample_decoder
from vlp.data.shards import expand_shards
from vlp.episode_state import (
    Clustering,
    EpisodeState,
    FeatureStream,
    Teacher,
    build_state,
    feature_pass,
    pca_message,
)
from vlp.method import METHODS, Loop, Method, StateWriter
from vlp.optim import lr_at


@dataclass(frozen=True)
class EpisodePlan:
    urls: list[str]
    shards_per_episode: int
    steps_per_episode: int
    total_steps: int
    warmup_episodes: int
    lit_episodes: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Config, global_batch: int) -> EpisodePlan:
        protos = cfg.prototypes
        urls = expand_shards(cfg.data.train_shards)
        if protos.episode_shards > len(urls):
            raise ConfigError(
                f"prototypes.episode_shards={protos.episode_shards}: data.train_shards has only "
                f"{len(urls)} shards"
            )
        steps = protos.episode_steps or _steps_from_sizes(urls, protos.episode_shards, global_batch)
        plan = cls(
            urls,
            protos.episode_shards,
            steps,
            cfg.train.steps,
            protos.warmup_episodes,
            protos.lit_episodes,
            cfg.train.seed,
        )
        # the teacher's PCA needs pca_dim samples: check every clustering episode by sizes.json
        # now (without sizes.json, build_state checks the episode it clusters)
        external, sizes = cfg.objectives.prototype_external, _sizes(urls)
        checked = plan.num_episodes if sizes and external.weight else 0
        for e in filter(plan.clusters, range(checked)):
            samples = sum(sizes.get(Path(url).name, 0) for url in plan.shards(e))
            if samples < external.pca_dim:
                raise ConfigError(pca_message(external.pca_dim, samples, f"episode {e}'s"))
        return plan

    @property
    def num_episodes(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_episode)

    def episode(self, step: int) -> int:
        """The episode that optimizer step `step` (0-based) belongs to."""
        return step // self.steps_per_episode

    def first_step(self, episode: int) -> int:
        return episode * self.steps_per_episode

    def shards(self, episode: int) -> list[str]:
        per_cycle = len(self.urls) // self.shards_per_episode
        cycle, index = divmod(episode, per_cycle)
        order = np.random.default_rng([self.seed, 0x5EED, cycle]).permutation(len(self.urls))
        start = index * self.shards_per_episode
        return [self.urls[int(i)] for i in order[start : start + self.shards_per_episode]]

    def clusters(self, episode: int) -> bool:
        """Whether the prototype objectives train in this episode (not warm-up, not LiT)."""
        return self.warmup_episodes <= episode < self.num_episodes - self.lit_episodes

    @property
    def lit_start_step(self) -> int | None:
        """First step of the LiT phase (image tower frozen), or None without one."""
        if not self.lit_episodes:
            return None
        return self.first_step(max(0, self.num_episodes - self.lit_episodes))


def _steps_from_sizes(urls: list[str], shards: int, global_batch: int) -> int:
    sizes = _sizes(urls)
    if sizes is None:
        raise ConfigError(
            f"prototypes.episode_steps: 0 needs {_sizes_file(urls)} (shard sizes) to derive the "
            "steps per episode; set prototypes.episode_steps instead"
        )
    per_shard = sum(sizes.values()) / max(1, len(sizes))
    steps = int(per_shard * shards) // global_batch
    if steps < 1:
        raise ConfigError(
            f"prototypes.episode_shards={shards}: about {per_shard * shards:.0f} samples, fewer "
            f"than one global batch of {global_batch}; raise it"
        )
    return steps


def _sizes_file(urls: list[str]) -> Path:
    return Path(urls[0].removeprefix("file://")).parent / "sizes.json"


def _sizes(urls: list[str]) -> dict[str, int] | None:
    """{shard name: samples} from the shards' sizes.json; None without one."""
    path = _sizes_file(urls)
    return json.loads(path.read_text()) if path.is_file() else None


@METHODS.register("episodes")
class EpisodeRunner(Method):
    """Episodes as the batch schedule; the heads, the LiT rate, the head temperature's clamp
    and the episode state in checkpoints as hooks."""

    find_unused_parameters = True  # the heads train only in clustering episodes
    not_shardable = "ProtoCLIP's episodes encode their samples outside the model's forward"

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        self.plan = EpisodePlan.from_config(loop.cfg, loop.global_batch)
        self.visual_groups = self.plan.lit_start_step is not None
        self.state: EpisodeState | None = None

    def prepare_model(self, model: nn.Module) -> None:
        protos = self.loop.cfg.prototypes
        model.add_prototype_heads(protos.head_hidden, protos.head_dim, protos.head_layers)

    def batches(self, step: int, current: Iterator[Batch] | None) -> Iterator[Batch]:
        if current is not None and step % self.plan.steps_per_episode != 0:
            return current
        return self._begin(step)

    def group_lrs(self, step: int) -> dict[str, float]:
        """With a LiT phase, the image tower's rate: a cosine that reaches 0 at the phase's
        first step and stays 0."""
        lit = self.plan.lit_start_step
        if lit is None:
            return {}
        train = self.loop.cfg.train
        return {"visual": lr_at(step, train.lr, train.warmup_steps, lit + 1, 0.0)}

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            scale = math.log(self.loop.cfg.prototypes.max_logit_scale)
            model.logit_scale_proto.clamp_(0, scale)

    def stream_identity(self) -> dict[str, Any]:
        return {"prototypes": asdict(self.loop.cfg.prototypes)}

    def state_writer(self, step: int) -> StateWriter | None:
        """A resume within the episode needs its state; at its end the next one clusters."""
        within = self.state is not None and step % self.plan.steps_per_episode != 0
        return self.state.save if within else None

    def load_state(self, directory: Path) -> None:
        self.state = EpisodeState.load(directory)

    def _begin(self, step: int) -> Iterator[Batch]:
        """The episode of `step`: its state (clustered now, or restored by a resume within it)
        given to the objectives, and an iterator over its shards."""
        plan, loop = self.plan, self.loop
        episode = plan.episode(step)
        first, clusters = plan.first_step(episode), plan.clusters(episode)
        last = min(first + plan.steps_per_episode, loop.cfg.train.steps)
        what = "prototypes" if clusters else "without prototypes (warm-up or LiT)"
        loop.message(f"episode {episode}: steps {first + 1}-{last}, {what}")
        if step == first:
            self.state = self._cluster(episode) if clusters else None
        elif clusters and self.state is None:
            raise CheckpointError("the checkpoint lacks its episode's state")
        device = loop.accelerator.device
        loop.objective.set_state(None if self.state is None else self.state.to(device))
        consumed = (step - first) * loop.cfg.train.grad_accum
        seed = mix(loop.cfg.train.seed, 3, episode)
        # positions restored at an episode's end belong to the last one
        shards = ShardSubset(plan.shards(episode), "prototypes.episode_shards")
        return iter(loop.open_loader(consumed, seed, shards, fresh=step == first))

    def _cluster(self, episode: int) -> EpisodeState:
        """Feature pass over the episode's shards, then k-means (collective)."""
        loop, started = self.loop, time.monotonic()
        cfg, device = loop.cfg, loop.accelerator.device
        stream = FeatureStream(
            self.plan.shards(episode),
            sample_decoder(cfg.data, loop.worker_transform, loop.tokenizer),
            cfg.prototypes.feature_batch_size or cfg.data.batch_size,
            mix(cfg.train.seed, 5, episode),
            distributed.rank(),
            distributed.world_size(),
        )
        cuda = device.type == "cuda"
        loader = DataLoader(stream, None, num_workers=cfg.data.workers, pin_memory=cuda)
        autocast = loop.accelerator.autocast
        bank = feature_pass(loop.model(), loader, loop.to_input, device, autocast, loop.message)
        seconds, share = time.monotonic() - started, distributed.world_size() > 1
        where = " (this process's share)" if share else ""
        loop.message(f"feature pass: {len(bank.keys)} samples{where} in {seconds:.1f} s")
        protos, external = cfg.prototypes, cfg.objectives.prototype_external
        clustering = Clustering(
            protos.clusters,
            protos.kmeans_iters,
            protos.kmeans_redo,
            protos.kmeans_backend,
            mix(cfg.train.seed, 7, episode),
        )
        teacher = Teacher(external.teacher, external.pca_dim) if external.weight else None
        return build_state(bank, clustering, teacher, device, loop.message)
