"""ProtoCLIP episode state: the feature pass over an episode's shards and its clustering.

The feature pass (no gradient, eval mode, the training transforms, seeded per sample) records
each sample's `__key__` and both heads' normalised outputs; the rows of all ranks are gathered,
rank 0 runs k-means on each modality (and on the external teacher's caption embeddings) and
back-translates the clusters, and the result is broadcast as an `EpisodeState`, which the
prototype objectives read by sample key. vlp/episodes.py runs the episodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp import distributed
from vlp.config import ConfigError
from vlp.data.pipeline import BadSample, SampleDecoder, mix
from vlp.data.shards import DataError, read_shard
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
        raise DataError(pca_message(teacher.pca_dim, rows, "the episode's"))
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


def pca_message(pca_dim: int, samples: int, whose: str) -> str:
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
