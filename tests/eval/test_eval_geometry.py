"""Geometry metrics against the hand values of design/methods/dreamlip_gap.md §4.3."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from eval.geometry import (
    alignment,
    centroid_cosine,
    cross_uniformity,
    effective_rank,
    geometry_metrics,
    linear_separability,
    matched_cosine,
    modality_gap,
    nonmatched_cosine,
    uniformity,
)

E = torch.eye(4, dtype=torch.float64)


def close(value, expected, tol=1e-5):
    return abs(float(value) - expected) <= tol


def simplex(n: int) -> torch.Tensor:
    """n unit vectors with pairwise cosine -1/(n-1): the centred standard basis."""
    points = torch.eye(n, dtype=torch.float64) - 1 / n
    return F.normalize(points, dim=1)


def test_alignment_hand_values():
    x, y = E[:1], E[1:2]
    assert close(alignment(x, y), 2.0)
    assert close(alignment(x, x), 0.0)
    assert close(alignment(x, -x), 4.0)
    pairs_x = F.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    pairs_y = F.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    assert close(alignment(pairs_x, pairs_y), 2 - 2 * matched_cosine(pairs_x, pairs_y).item())


def test_uniformity_hand_values():
    assert close(uniformity(torch.stack([E[0], -E[0]])), -8.0)
    for n in (2, 3, 4):
        assert close(uniformity(E[:n]), -4.0)
        assert close(uniformity(simplex(n)), -4 * n / (n - 1))
    assert close(uniformity(simplex(4)), -5.333333)
    assert close(uniformity(E[[0, 0, 0]]), 0.0)


@pytest.mark.parametrize("dim, expected", [(16, -3.513), (2, -1.5750)])
def test_uniformity_of_uniform_random_points(dim, expected):
    generator = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn(2000, dim, generator=generator, dtype=torch.float64), dim=1)
    assert abs(uniformity(points).item() - expected) < 0.02


def test_uniformity_is_stable_at_any_temperature_and_chunk():
    points = F.normalize(torch.randn(300, 8, dtype=torch.float64), dim=1)
    whole = uniformity(points, t=2.0, chunk_size=1000)
    assert close(uniformity(points, t=2.0, chunk_size=7), whole.item(), 1e-10)
    assert math.isfinite(uniformity(points, t=1e4).item())  # exp underflows, log-sum-exp not
    # reference: the plain formula on all i < j pairs
    d2 = torch.cdist(points, points).pow(2)
    i, j = torch.triu_indices(300, 300, offset=1)
    assert close(whole, torch.exp(-2 * d2[i, j]).mean().log().item(), 1e-9)


def test_uniformity_has_finite_gradients_even_for_coinciding_points():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    total = (
        uniformity(points) + cross_uniformity(points, points.flip(0)) + alignment(points, points)
    )
    total.backward()
    assert torch.isfinite(points.grad).all()


def test_cross_uniformity_hand_values():
    assert close(cross_uniformity(E, E), -4.0)
    images, texts = E[[0, 0, 0]], -E[[0, 0, 0]]
    assert close(cross_uniformity(images, texts), -8.0)
    assert close(cross_uniformity(E[[0, 0]], E[[0, 0]]), 0.0)
    # exactly the 2 ordered non-matching pairs; the matched ones (distances 4 and 2) are left out
    x = torch.stack([E[0], E[1]])
    y = torch.stack([-E[0], E[0]])
    # (0, 1): ‖e0 − e0‖² = 0;  (1, 0): ‖e1 + e0‖² = 2
    assert close(cross_uniformity(x, y), math.log((1 + math.exp(-4.0)) / 2))


def test_gap_hand_values():
    assert close(modality_gap(E[[0, 0]], E[[1, 1]]), math.sqrt(2))
    assert close(modality_gap(torch.stack([E[0], -E[0]]), torch.stack([E[1], -E[1]])), 0.0)
    assert close(centroid_cosine(E[[0, 0]], E[[1, 1]]), 0.0)
    assert close(centroid_cosine(E[[0, 1]], E[[0, 1]]), 1.0)


unit_rows = arrays(
    np.float64,
    st.tuples(st.integers(2, 12), st.integers(2, 6)),
    elements=st.floats(-1, 1, allow_nan=False, width=32),
)


@settings(max_examples=60, deadline=None)
@given(unit_rows, st.randoms(use_true_random=False))
def test_alignment_is_at_least_gap_squared_and_gap_within_0_2(values, rng):
    x = torch.from_numpy(values)
    x = x[x.norm(dim=1) > 1e-3]
    if len(x) < 2:
        return
    x = F.normalize(x, dim=1)
    y = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(rng.randint(0, 99)))]
    y = F.normalize(y + 0.3 * torch.randn_like(y), dim=1)
    gap = modality_gap(x, y).item()
    assert alignment(x, y).item() >= gap**2 - 1e-9
    assert 0.0 <= gap <= 2.0 + 1e-9
    order = torch.randperm(len(x))
    assert close(modality_gap(x[order], y[order]), gap, 1e-9)


def test_alignment_bound_on_reference_numbers():
    # §2.5 default CLIP at D = 128: align = 2 - 2 * 0.567 = 0.866 >= 0.661² = 0.437
    assert 2 - 2 * 0.567 >= 0.661**2


def test_nonmatched_cosine_is_the_mean_over_i_not_j():
    x = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    cosines = x @ y.T
    expected = cosines[~torch.eye(7, dtype=torch.bool)].mean()
    assert close(nonmatched_cosine(x, y), expected.item(), 1e-12)


def test_effective_rank():
    assert close(effective_rank(E), 4.0)
    assert close(effective_rank(E[[2, 2, 2]]), 1.0)
    assert 1.0 < effective_rank(F.normalize(torch.randn(100, 6), dim=1)).item() <= 6.0


def test_linear_separability_hand_values():
    generator = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(200, 16, generator=generator)
    images = F.normalize(torch.eye(16)[0] + noise, dim=1)
    texts = F.normalize(torch.eye(16)[1] + noise.roll(1, 0), dim=1)
    assert linear_separability(images, texts) == 1.0
    # identical image and text of every pair: each test pair gets one right and one wrong
    points = F.normalize(torch.randn(200, 16, generator=generator), dim=1)
    assert linear_separability(points, points.clone()) == 0.5
    assert linear_separability(points, points, seed=3) == 0.5


def test_geometry_metrics_normalises_and_names_every_metric():
    x, y = 3 * E[[0, 0]], 5 * E[[1, 1]]  # not unit norm: normalised first
    metrics = geometry_metrics(x, y)
    assert set(metrics) == {
        "gap", "centroid_cosine", "uniformity_image", "uniformity_text", "uniformity",
        "cross_uniformity", "alignment", "matched_cosine", "nonmatched_cosine",
        "linear_separability", "effective_rank_image", "effective_rank_text",
    }  # fmt: skip
    assert close(metrics["gap"], math.sqrt(2))
    assert close(metrics["alignment"], 2.0)
    assert close(metrics["uniformity"], 0.0)
    assert close(metrics["cross_uniformity"], math.log(math.exp(-4.0)))
