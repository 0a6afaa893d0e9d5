"""ProtoCLIP episodes on webdataset shards: the plan, the feature pass, the clustering.

An episode is a fixed set of shards. Episode e takes the next `episode_shards` shards of a
seeded permutation of all shards (a new permutation once every shard was used), so every rank
derives the same episode from (seed, e) without communication. An episode that clusters starts
with a feature pass over its shards (no gradient, eval mode, the training transforms, seeded per
sample), which records each sample's `__key__` and both heads' normalised outputs; the rows of all
ranks are gathered, rank 0 runs k-means on each modality (and on the external teacher's caption
embeddings) and back-translates the clusters, and the result is broadcast. The episode's
training steps then read the same shards and look each sample's labels up by its key.

Deviations from the reference (methods/protoclip_baselines.md §1.11): episodes are shard sets
drawn without replacement, not E rows drawn with replacement; the external teacher is computed
per episode (PCA fitted on the episode's captions), not once over the dataset.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp import distributed
from vlp.config import ConfigError
from vlp.data.pipeline import BadSample, SampleDecoder, mix
from vlp.data.shards import DataError, expand_shards, read_shard
from vlp.prototypes import (
    KMeansResult,
    back_translate,
    kmeans,
    lloyd,
    minilm_dir,
    pca,
    teacher_embeddings,
)

STATE_FILE = "episode.safetensors"
KEYS_FILE = "episode_keys.json"


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
    def from_config(cls, cfg: Any, global_batch: int) -> EpisodePlan:
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
                raise ConfigError(_pca_message(external.pca_dim, samples, f"episode {e}'s"))
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


@dataclass
class FeatureBatch:
    images: Tensor
    """[B, 3, H, W] as the worker transform leaves them."""
    text: Tensor
    """[B, L] tokens of text slot 0."""
    keys: list[str]
    captions: list[str]

    def pin_memory(self) -> FeatureBatch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        self.images, self.text = self.images.pin_memory(), self.text.pin_memory()
        return self


class FeatureStream(IterableDataset):
    """One pass over an episode's shards, split by (rank, worker); batches of good samples."""

    def __init__(
        self, urls: list[str], decode: SampleDecoder, batch: int, seed: int, rank: int, world: int
    ):
        self.urls, self.decode, self.batch, self.seed = urls, decode, batch, seed
        self.rank, self.world = rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        items: list[tuple] = []
        for shard in range(slot, len(self.urls), slots):
            samples, _ = read_shard(self.urls[shard])
            for index, sample in enumerate(samples):
                item = self._decode(sample, shard, index, own_rng=info is not None)
                items += [item] if item is not None else []
                if len(items) == self.batch:
                    yield _collate(items)
                    items = []
        if items:
            yield _collate(items)

    def _decode(self, sample: dict[str, Any], shard: int, index: int, own_rng: bool):
        with torch.random.fork_rng(devices=[], enabled=not own_rng):
            torch.default_generator.manual_seed(mix(self.seed, shard, index))
            try:
                image, tokens, _, _ = self.decode(sample, mix(self.seed, shard, index, 2))
                return image, tokens[0], sample["__key__"], self.decode.slot0_caption(sample)
            except BadSample:  # the training pass skips (and counts) the same samples
                return None


def _collate(items: list[tuple]) -> FeatureBatch:
    images, text, keys, captions = zip(*items, strict=True)
    return FeatureBatch(torch.stack(images), torch.stack(text), list(keys), list(captions))


@dataclass
class Bank:
    """This rank's feature pass: keys, normalised head outputs [n, P], captions."""

    keys: list[str]
    image: Tensor
    text: Tensor
    captions: list[str]


@torch.no_grad()
def feature_pass(
    model: Any,
    loader: DataLoader,
    to_input: Callable[[Tensor], Tensor],
    device: torch.device,
    autocast: Callable[[], Any],
    say: Callable[[str], None],
) -> Bank:
    """Head outputs of every sample of the loader's pass, in eval mode (BatchNorm running
    statistics, as the reference); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    keys, captions, image, text = [], [], [], []
    started = last = time.monotonic()
    for batch in loader:
        with autocast():
            image_z, text_z = model.prototype_features(
                to_input(batch.images.to(device)), batch.text.to(device)
            )
        image.append(image_z.float())
        text.append(text_z.float())
        keys += batch.keys
        captions += batch.captions
        if time.monotonic() - last > 30:
            last = time.monotonic()
            say(f"feature pass: {len(keys)} samples, {len(keys) / (last - started):.0f}/s")
    model.train(was_training)
    if not keys:
        raise DataError("the episode's feature pass found no usable sample on this process")
    return Bank(keys, torch.cat(image), torch.cat(text), captions)


@dataclass
class EpisodeState:
    """What the prototype objectives need for one episode (episode constants, no gradient).

    Rows follow `keys` (the gathered feature banks, rank-major). `x_from_y` are prototypes in
    x's space built from y's clusters (back translation); the teacher fields are None without
    the external teacher.
    """

    keys: list[str]
    image_labels: Tensor
    """[E] int64 k-means labels of the image bank."""
    text_labels: Tensor
    image_centroids: Tensor
    """[K, P] k-means centroids of the image bank (not normalised)."""
    text_centroids: Tensor
    image_from_text: Tensor
    """[K, P] mean image features over each text cluster (PBT)."""
    text_from_image: Tensor
    external_labels: Tensor | None = None
    """[E] int64 clusters of the external teacher's caption embeddings."""
    image_from_external: Tensor | None = None
    text_from_external: Tensor | None = None

    def __post_init__(self) -> None:
        self.index = {key: row for row, key in enumerate(self.keys)}

    def rows(self, keys: list[str], device: torch.device) -> Tensor:
        try:
            return torch.tensor([self.index[key] for key in keys], device=device)
        except KeyError as err:
            raise DataError(f"sample {err} was not in the episode's feature pass") from None

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    def to(self, device: torch.device) -> EpisodeState:
        return EpisodeState(self.keys, **{k: v.to(device) for k, v in self.tensors().items()})

    def save(self, directory: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        save_file(tensors, directory / STATE_FILE)
        (directory / KEYS_FILE).write_text(json.dumps(self.keys))

    @classmethod
    def load(cls, directory: Path) -> EpisodeState | None:
        if not (directory / STATE_FILE).is_file():
            return None
        keys = json.loads((directory / KEYS_FILE).read_text())
        return cls(keys, **load_file(directory / STATE_FILE))


@dataclass(frozen=True)
class Clustering:
    """k-means settings of one episode: K clusters, Lloyd iterations, restarts, backend."""

    clusters: int
    iters: int
    redo: int
    backend: str
    """faiss | torch | auto (torch for CUDA tensors, else faiss)."""
    seed: int

    def __call__(self, x: Tensor, stream: int) -> KMeansResult:
        """k-means of the rows of x [E, d]; `stream` tells the clusterings of an episode apart."""
        torch_lloyd = self.backend == "torch" or (self.backend == "auto" and x.is_cuda)
        if not torch_lloyd:
            seed = mix(self.seed, stream) % 2**31
            return kmeans(x.float().cpu(), self.clusters, self.iters, self.redo, seed)
        best = None
        for run in range(self.redo):  # faiss's nredo: keep the lowest objective
            generator = torch.Generator().manual_seed(mix(self.seed, stream, run))
            init = x[torch.randperm(x.shape[0], generator=generator)[: self.clusters].to(x.device)]
            result = lloyd(x, self.clusters, self.iters, init)
            best = result if best is None or result.objective < best.objective else best
        return best


@dataclass(frozen=True)
class Teacher:
    """The external teacher: a local text model folder (None: MiniLM) and the PCA width."""

    model_dir: str | None
    pca_dim: int


def build_state(
    bank: Bank,
    clustering: Clustering,
    teacher: Teacher | None,
    device: torch.device,
    say: Callable[[str], None],
) -> EpisodeState:
    """Collective: gather every rank's bank, cluster on rank 0, broadcast; the same state on
    every rank (tensors on `device`)."""
    keys = [key for part in distributed.all_gather_objects(bank.keys) for key in part]
    image = distributed.gather_rows(bank.image.to(device))
    text = distributed.gather_rows(bank.text.to(device))
    captions = None
    if teacher is not None:
        captions = [c for part in distributed.all_gather_objects(bank.captions) for c in part]
    rows, k, dim = len(keys), clustering.clusters, image.shape[1]
    duplicates = rows - len(set(keys))
    if duplicates:
        say(
            f"{duplicates} samples of the episode share their key with another one: they train "
            "with the labels of that key's last sample (`vlp-shard verify` lists such keys)"
        )
    if k > rows:  # on every rank, before rank 0 alone would fail
        raise DataError(
            f"prototypes.clusters={k} exceeds the episode's {rows} samples: lower it or raise "
            "prototypes.episode_shards"
        )
    if teacher is not None and teacher.pca_dim > rows:  # faiss's PCA would fail on rank 0
        raise DataError(_pca_message(teacher.pca_dim, rows, "the episode's"))
    if distributed.rank() == 0:
        started = time.monotonic()
        tensors = _cluster(image, text, captions, clustering, teacher, device)
        what = "each modality and the teacher" if teacher is not None else "each modality"
        seconds = time.monotonic() - started
        say(f"clustering: {rows} samples into {k} clusters for {what} in {seconds:.1f} s")
    else:  # filled by the broadcast
        labels, centroids = (rows,), (k, dim)
        shapes = dict(image_labels=labels, text_labels=labels, image_centroids=centroids)
        shapes.update(text_centroids=centroids, image_from_text=centroids)
        shapes.update(text_from_image=centroids)
        if teacher is not None:
            shapes.update(external_labels=labels, image_from_external=centroids)
            shapes.update(text_from_external=centroids)
        tensors = {
            name: torch.zeros(shape, device=device, dtype=torch.long if len(shape) == 1 else None)
            for name, shape in shapes.items()
        }
    return EpisodeState(keys, **distributed.broadcast_tensors(tensors))


def _pca_message(pca_dim: int, samples: int, whose: str) -> str:
    return (f"objectives.prototype_external.pca_dim={pca_dim} exceeds {whose} {samples} samples "
            "(its PCA needs as many samples as dimensions): lower it or raise "
            "prototypes.episode_shards")  # fmt: skip


def _cluster(
    image: Tensor,
    text: Tensor,
    captions: list[str] | None,
    clustering: Clustering,
    teacher: Teacher | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """k-means of both banks [E, P] (and of the teacher's embeddings), back translation."""
    k = clustering.clusters
    by_image, by_text = clustering(image, 0), clustering(text, 1)
    image_labels, text_labels = by_image.labels.to(device), by_text.labels.to(device)
    out = dict(
        image_labels=image_labels,
        text_labels=text_labels,
        image_centroids=by_image.centroids.to(device),
        text_centroids=by_text.centroids.to(device),
        image_from_text=back_translate(image, text_labels, k),
        text_from_image=back_translate(text, image_labels, k),
    )
    if teacher is not None:
        folder = teacher.model_dir or minilm_dir()
        embedded = teacher_embeddings(captions, folder, device=str(device))
        if teacher.pca_dim > embedded.shape[1]:
            raise ConfigError(
                f"objectives.prototype_external.pca_dim={teacher.pca_dim} exceeds the teacher's "
                f"{embedded.shape[1]} dimensions"
            )
        external = clustering(pca(embedded, teacher.pca_dim).to(device), 2).labels.to(device)
        out.update(
            external_labels=external,
            image_from_external=back_translate(image, external, k),
            text_from_external=back_translate(text, external, k),
        )
    return out
