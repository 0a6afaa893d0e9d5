"""ProtoCLIP components (vlp.prototypes) against references: faiss, naive loops, F.cross_entropy.

Numbers in brackets refer to protoclip_baselines.md §4.1. Run: pytest -q tests/test_prototypes.py
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.prototypes import (
    ProjectionHead,
    back_translate,
    crosswise_loss,
    kmeans,
    lloyd,
    minilm_dir,
    pca,
    prototype_loss,
    prototype_targets,
    teacher_embeddings,
)


def blobs(rows: int, dim: int, centers: int, noise: float, seed: int = 0) -> torch.Tensor:
    """[rows, dim] float32: points around `centers` random Gaussian centres."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=gen) * 3
    which = torch.randint(0, centers, (rows,), generator=gen)
    return means[which] + noise * torch.randn(rows, dim, generator=gen)


def faiss_from_init(x: torch.Tensor, init: torch.Tensor, iters: int) -> faiss.Kmeans:
    """faiss-cpu Lloyd from the given centroids, every row used (no subsampling)."""
    model = faiss.Kmeans(
        x.shape[1],
        init.shape[0],
        niter=iters,
        max_points_per_centroid=x.shape[0],
        min_points_per_centroid=1,
    )
    model.train(x.numpy(), init_centroids=init.numpy())
    return model


# [1] heads


@pytest.mark.parametrize(
    "n_layers, widths",
    [(0, [(16, 8)]), (1, [(16, 32), (32, 8)]), (2, [(16, 32), (32, 32), (32, 8)])],
)
def test_head_shapes_and_layers(n_layers, widths):
    head = ProjectionHead(16, hidden_dim=32, out_dim=8, n_layers=n_layers)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == widths
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == n_layers
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == n_layers
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 8)
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))  # the caller normalises


def test_head_defaults_are_the_reference_widths():
    head = ProjectionHead(24)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.layers[0].out_features, head.layers[3].out_features) == (2048, 128)
    assert head(torch.randn(4, 24)).shape == (4, 128)


def test_heads_built_separately_have_independent_parameters():
    image_head, text_head = ProjectionHead(16, 32, 8), ProjectionHead(16, 32, 8)
    image_ptrs = {p.data_ptr() for p in image_head.parameters()}
    assert image_ptrs.isdisjoint(p.data_ptr() for p in text_head.parameters())
    x = torch.randn(4, 16)
    assert not torch.allclose(image_head(x), text_head(x))
    image_head(x).sum().backward()
    assert all(p.grad is None for p in text_head.parameters())


# [5] k-means


def test_kmeans_labels_are_nearest_centroids_and_objective_is_their_distance():
    x = blobs(300, 8, centers=6, noise=1.0)
    result = kmeans(x, 7, iters=10)
    assert result.labels.dtype == torch.int64 and result.labels.shape == (300,)
    assert 0 <= result.labels.min() and result.labels.max() < 7
    assert result.centroids.dtype == torch.float32 and result.centroids.shape == (7, 8)
    distances = torch.cdist(x.double(), result.centroids.double()) ** 2  # [E, K]
    assert torch.equal(result.labels, distances.argmin(1))
    assert result.objective == pytest.approx(distances.min(1).values.sum().item(), rel=1e-5)


def test_kmeans_one_cluster_is_the_mean_of_the_whole_bank():
    x = torch.randn(1000, 4) + 5  # > 256 rows: faiss would subsample by default
    result = kmeans(x, 1)
    torch.testing.assert_close(result.centroids[0], x.mean(0), atol=1e-5, rtol=0)
    assert torch.equal(result.labels, torch.zeros(1000, dtype=torch.int64))
    expected = ((x.double() - x.double().mean(0)) ** 2).sum().item()
    assert result.objective == pytest.approx(expected, rel=1e-5)


def test_kmeans_one_cluster_per_distinct_point_has_zero_objective():
    x = torch.randn(50, 6)
    result = kmeans(x, 50)
    assert result.objective == pytest.approx(0.0, abs=1e-6)
    assert result.labels.unique().numel() == 50
    torch.testing.assert_close(result.centroids[result.labels], x)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k=11 clusters for 10 points"):
        kmeans(torch.randn(10, 3), 11)


def test_lloyd_objective_is_within_one_percent_of_faiss_from_the_same_init():
    x = blobs(3000, 16, centers=40, noise=1.5)
    init = x[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:32]]
    reference = faiss_from_init(x, init, iters=20)
    assert sum(stat["nsplit"] for stat in reference.iteration_stats) == 0  # same algorithm
    faiss_objective = float(reference.assign(x.numpy())[0].sum(dtype=np.float64))
    ours = lloyd(x, 32, 20, init)
    assert abs(ours.objective - faiss_objective) <= 0.01 * faiss_objective
    assert ours.objective < 0.9 * lloyd(x, 32, 0, init).objective  # 20 iterations did work
    chunked = lloyd(x, 32, 20, init, chunk_size=999)  # 4 chunks, the last short
    torch.testing.assert_close(chunked.centroids, ours.centroids)


def test_lloyd_objective_never_increases():
    x = blobs(2000, 8, centers=30, noise=2.0, seed=3)
    init = x[:25].clone()
    objectives, centroids = [lloyd(x, 25, 0, init).objective], init
    for _ in range(10):
        step = lloyd(x, 25, 1, centroids)
        objectives.append(step.objective)
        centroids = step.centroids
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:], strict=False))
    assert objectives[-1] < objectives[0]
    torch.testing.assert_close(lloyd(x, 25, 10, init).centroids, centroids)


def test_lloyd_keeps_an_empty_clusters_centroid_where_faiss_splits_a_large_cluster():
    x = torch.randn(100, 2)
    init = torch.cat([x[:2], torch.tensor([[100.0, 100.0]])])
    ours = lloyd(x, 3, 5, init)
    assert torch.equal(ours.centroids[2], init[2])
    assert (ours.labels == 2).sum() == 0
    reference = faiss_from_init(x, init, iters=5)
    assert reference.iteration_stats[0]["nsplit"] == 1
    assert np.bincount(reference.assign(x.numpy())[1], minlength=3).min() > 0


# [6] prototypical back translation


def test_back_translate_is_the_mean_of_each_labels_rows_and_zero_when_empty():
    features = torch.randn(40, 5)
    labels = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(0))
    labels[labels == 4] = 5  # label 4 empty; 6 and 7 beyond the labels in use
    protos = back_translate(features, labels, 8)
    assert protos.shape == (8, 5)
    for k in range(8):
        members = features[labels == k]
        expected = members.mean(0) if len(members) else torch.zeros(5)
        torch.testing.assert_close(protos[k], expected)
    assert protos[[4, 6, 7]].abs().sum() == 0


@pytest.mark.parametrize("method", ["faiss", "lloyd"])
def test_back_translate_of_a_converged_kmeans_gives_its_centroids(method):
    x = F.normalize(blobs(600, 16, centers=8, noise=0.3, seed=5), dim=1)
    if method == "faiss":
        result = kmeans(x, 8, iters=50)
    else:
        result = lloyd(x, 8, 50, x[:8])
    torch.testing.assert_close(
        back_translate(x, result.labels, 8), result.centroids, atol=1e-5, rtol=0
    )


# [7] prototype loss and targets


def student_batch(rows: int = 6, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    prototypes = 0.8 * torch.randn(10, dim, generator=gen)
    labels = torch.randint(0, 10, (rows,), generator=gen)
    return z, prototypes, labels


def test_hard_loss_is_cross_entropy_of_scaled_logits():
    z, prototypes, labels = student_batch()
    scale = torch.tensor(14.3)
    targets = prototype_targets(torch.randn(10, 4), labels, temperature=-1.0, normalize=False)
    assert torch.equal(targets, labels)
    loss = prototype_loss(z, prototypes, targets, scale)
    torch.testing.assert_close(loss, F.cross_entropy(scale * z @ prototypes.T, labels))


def test_soft_targets_at_high_temperature_are_uniform():
    z, prototypes, labels = student_batch()
    targets = prototype_targets(torch.randn(10, 4), labels, temperature=1e6, normalize=False)
    torch.testing.assert_close(targets, torch.full((6, 10), 0.1))
    logits = 10.0 * z @ prototypes.T
    expected = -F.log_softmax(logits, dim=1).mean(1).mean()
    torch.testing.assert_close(prototype_loss(z, prototypes, targets, torch.tensor(10.0)), expected)


def test_soft_targets_at_low_temperature_are_one_hot_at_the_most_similar_centroid():
    gen = torch.Generator().manual_seed(2)
    centroids = torch.randn(10, 4, generator=gen) * torch.rand(10, 1, generator=gen)
    labels = torch.arange(10)
    targets = prototype_targets(centroids, labels, temperature=1e-6, normalize=False)
    most_similar = (centroids[labels] @ centroids.T).argmax(1)
    torch.testing.assert_close(targets, F.one_hot(most_similar, 10).float())
    assert (most_similar != labels).any()  # un-normalised: not always the sample's own cluster


def test_unnormalised_centroids_move_the_target_mass_off_the_own_cluster():
    """§1.11 item 5: ||c0|| = 0.6, ||c1|| = 0.95 at 26 degrees, tau = 0.01."""
    angle = math.radians(26)
    centroids = torch.tensor([[0.6, 0.0], [0.95 * math.cos(angle), 0.95 * math.sin(angle)]])
    labels = torch.tensor([0])
    raw = prototype_targets(centroids, labels, temperature=0.01, normalize=False)
    assert raw[0, 0] < 1e-6 and raw[0, 1] > 0.999
    normalised = prototype_targets(centroids, labels, temperature=0.01, normalize=True)
    assert normalised[0, 0] > 0.99


def test_normalised_targets_at_low_temperature_reproduce_the_hard_loss():
    z, prototypes, labels = student_batch(rows=8, seed=4)
    gen = torch.Generator().manual_seed(4)
    centroids = torch.randn(10, 16, generator=gen) * torch.rand(10, 1, generator=gen)
    centroids[9] = 0  # an empty teacher cluster stays a zero row
    labels = labels.clamp(max=8)
    soft = prototype_targets(centroids, labels, temperature=1e-4, normalize=True)
    torch.testing.assert_close(soft, F.one_hot(labels, 10).float())
    scale = torch.tensor(20.0)
    hard = prototype_loss(z, prototypes, labels, scale)
    torch.testing.assert_close(prototype_loss(z, prototypes, soft, scale), hard)


# [8] gradients


def test_gradient_reaches_students_and_scale_but_not_prototypes_or_targets():
    raw_z = torch.randn(6, 8, requires_grad=True)
    prototypes = torch.randn(10, 8, requires_grad=True)
    target_logits = torch.randn(6, 10, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    targets = F.softmax(target_logits, dim=1)
    loss = prototype_loss(F.normalize(raw_z, dim=1), prototypes, targets, log_scale.exp())
    loss.backward()
    assert raw_z.grad is not None and raw_z.grad.abs().sum() > 0
    assert log_scale.grad is not None and log_scale.grad != 0
    assert prototypes.grad is None and target_logits.grad is None


def test_soft_targets_carry_no_graph_from_the_teacher_centroids():
    centroids = torch.randn(10, 4, requires_grad=True)
    targets = prototype_targets(centroids, torch.arange(6), temperature=0.1, normalize=True)
    assert not targets.requires_grad


# [9] crosswise symmetry


def test_crosswise_loss_pairs_each_modality_with_the_other_ones_clusters_and_is_symmetric():
    gen = torch.Generator().manual_seed(7)
    image_z = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    text_z = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    image_protos, text_protos = torch.randn(10, 8, generator=gen), torch.randn(10, 8, generator=gen)
    text_labels = torch.randint(0, 10, (6,), generator=gen)
    image_targets = prototype_targets(torch.randn(10, 4, generator=gen), text_labels, 0.5, False)
    text_targets = torch.randint(0, 10, (6,), generator=gen)
    scale = torch.tensor(12.0)
    forward = crosswise_loss(
        image_z,
        text_z,
        image_protos_from_text=image_protos,
        text_protos_from_image=text_protos,
        image_targets_from_text=image_targets,
        text_targets_from_image=text_targets,
        scale=scale,
    )
    swapped = crosswise_loss(
        text_z,
        image_z,
        image_protos_from_text=text_protos,
        text_protos_from_image=image_protos,
        image_targets_from_text=text_targets,
        text_targets_from_image=image_targets,
        scale=scale,
    )
    image_to_text = prototype_loss(image_z, image_protos, image_targets, scale)
    text_to_image = prototype_loss(text_z, text_protos, text_targets, scale)
    torch.testing.assert_close(forward.image_to_text, image_to_text)
    torch.testing.assert_close(forward.text_to_image, text_to_image)
    torch.testing.assert_close(forward.loss, (image_to_text + text_to_image) / 2)
    assert not torch.isclose(image_to_text, text_to_image)
    torch.testing.assert_close(swapped.image_to_text, forward.text_to_image)
    torch.testing.assert_close(swapped.text_to_image, forward.image_to_text)
    torch.testing.assert_close(swapped.loss, forward.loss)


# [11] external teacher


@pytest.fixture(scope="module")
def teacher_dir() -> str:
    return minilm_dir()


def test_teacher_embeddings_are_unit_norm_sentence_embeddings(teacher_dir):
    captions = [
        "a dog runs on the beach",
        "a puppy playing on the sand",
        "quarterly earnings of the stock market fell sharply",
    ]
    emb = teacher_embeddings(captions, teacher_dir)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cosines = emb @ emb.T
    assert cosines[0, 1] > 0.4 > cosines[0, 2] + 0.3  # a real model, not noise


def test_teacher_mean_pooling_ignores_padding(teacher_dir):
    short = "a dog"
    long = " ".join(["a very long caption about many different things in a big city"] * 8)
    alone = teacher_embeddings([short], teacher_dir)
    padded = teacher_embeddings([short, long], teacher_dir, batch_size=2)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_teacher_batches_by_length_but_returns_input_order(teacher_dir):
    captions = ["a cat", "three red apples lying on a wooden kitchen table", "snow", "a blue car"]
    calls = []
    batched = teacher_embeddings(
        captions,
        teacher_dir,
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    one_by_one = torch.cat([teacher_embeddings([c], teacher_dir) for c in captions])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    assert calls == [(3, 4), (4, 4)]


def test_teacher_needs_an_existing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        teacher_embeddings(["a cat"], str(tmp_path / "missing"))


def test_pca_is_mean_centred_projection_on_the_top_axes():
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(1, -2, 128)  # decaying axis scales, not whitened
    mixing = torch.linalg.qr(torch.randn(128, 128, generator=gen))[0]
    x = (torch.randn(400, 128, generator=gen) * spectrum) @ mixing.T + 3.0
    out = pca(x)
    assert out.shape == (400, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    centred = x.double() - x.double().mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / 400).flip(0)[:64]
    torch.testing.assert_close(out.double().var(0, correction=0), eigenvalues, rtol=1e-3, atol=1e-6)
