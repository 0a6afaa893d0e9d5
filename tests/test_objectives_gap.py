"""Uniformity / alignment terms (methods/dreamlip_gap.md §4.3) through the registered objectives."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, load_config
from vlp.model import ModelOutput, VLPModel, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.objectives.contrastive import clip_loss

REPO = Path(__file__).resolve().parents[1]
E = torch.eye(6, dtype=torch.float64)
CUA = ["objectives.uniformity.weight=1", "objectives.alignment.weight=1"]
CUAXU = [*CUA, "objectives.cross_uniformity.weight=1"]


def objective(*overrides: str) -> WeightedObjective:
    return WeightedObjective(load_config(None, ["data.train_shards=x", *overrides]).objectives)


def terms(image: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> dict[str, float]:
    """Every gap term's (unweighted) value on the pairs (image[i], text[i])."""
    out = ModelOutput(image, text, torch.tensor(scale, dtype=image.dtype))
    _, logs = objective(*CUAXU)(out, None)
    return {k.removeprefix("loss/"): v.item() for k, v in logs.items()}


def simplex(n: int) -> torch.Tensor:
    """n unit vectors with pairwise cosine −1/(n−1): the centred standard basis, in 6 dims."""
    points = F.normalize(torch.eye(n, dtype=torch.float64) - 1 / n, dim=1)
    return F.pad(points, (0, 6 - n))


def test_uniformity_hand_values():
    antipodal = torch.stack([E[0], -E[0]])
    assert terms(antipodal, antipodal)["uniformity"] == pytest.approx(-8, abs=1e-5)
    for n in (2, 3, 5, 6):
        assert terms(E[:n], E[:n])["uniformity"] == pytest.approx(-4, abs=1e-5)
    for n, expected in ((2, -8), (3, -6), (4, -5.333333)):
        assert terms(simplex(n), simplex(n))["uniformity"] == pytest.approx(expected, abs=1e-5)
        assert expected == pytest.approx(-4 * n / (n - 1), abs=1e-6)
    assert terms(E[[0, 0, 0]], E[[1, 1, 1]])["uniformity"] == pytest.approx(0, abs=1e-7)


def test_uniformity_is_the_mean_of_the_two_modalities():
    # images orthonormal (−4), texts a 3-point simplex (−6)
    assert terms(E[:3], simplex(3))["uniformity"] == pytest.approx(-5, abs=1e-5)


def test_cross_uniformity_hand_values():
    assert terms(E[:4], E[:4])["cross_uniformity"] == pytest.approx(-4, abs=1e-5)
    assert terms(E[[0, 0, 0]], -E[[0, 0, 0]])["cross_uniformity"] == pytest.approx(-8, abs=1e-5)
    assert terms(E[[0, 0, 0]], E[[0, 0, 0]])["cross_uniformity"] == pytest.approx(0, abs=1e-7)
    # i ≠ j over B(B−1) ordered pairs: images e1, e2; texts e1, −e1 -> pairs (e1, −e1), (e2, e1)
    expected = math.log((math.exp(-8) + math.exp(-4)) / 2)
    text = torch.stack([E[0], -E[0]])
    assert terms(E[:2], text)["cross_uniformity"] == pytest.approx(expected, abs=1e-6)


def test_alignment_hand_values():
    assert terms(E[:1], E[1:2])["alignment"] == pytest.approx(2, abs=1e-6)
    assert terms(E[:3], E[:3])["alignment"] == pytest.approx(0, abs=1e-7)
    assert terms(E[:3], -E[:3])["alignment"] == pytest.approx(4, abs=1e-6)
    torch.manual_seed(0)
    x, y = (F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1) for _ in range(2))
    matched = (x * y).sum(1).mean().item()
    assert terms(x, y)["alignment"] == pytest.approx(2 - 2 * matched, abs=1e-6)


def test_composition_cua_minus_clip_is_uniformity_plus_alignment():
    torch.manual_seed(1)
    x, y = (F.normalize(torch.randn(8, 6, dtype=torch.float64), dim=1) for _ in range(2))
    out = ModelOutput(x, y, torch.tensor(14.3, dtype=torch.float64))
    clip, _ = objective()(out, None)
    cua, _ = objective(*CUA)(out, None)
    cuaxu, _ = objective(*CUAXU)(out, None)
    logs = terms(x, y, 14.3)
    assert (cua - clip).item() == pytest.approx(logs["uniformity"] + logs["alignment"], abs=1e-9)
    assert (cuaxu - cua).item() == pytest.approx(logs["cross_uniformity"], abs=1e-9)
    weighted, _ = objective(*CUA, "objectives.uniformity.weight=0.5")(out, None)
    assert (weighted - clip).item() == pytest.approx(
        0.5 * logs["uniformity"] + logs["alignment"], abs=1e-9
    )


def test_terms_are_stable_and_differentiable_at_a_sharp_kernel_and_fixed_temperature():
    """Identical points (the kernel's maximum) and t = 1e4 (exp underflows) stay finite."""
    x = E[[0, 0, 1, 2]].clone().requires_grad_(True)
    y = E[[0, 1, 1, 2]].clone().requires_grad_(True)
    out = ModelOutput(x, y, torch.tensor(100.0, dtype=torch.float64))
    sharp = ["objectives.uniformity.t=1e4", "objectives.cross_uniformity.t=1e4"]
    total, logs = objective(*CUAXU, *sharp)(out, None)
    total.backward()
    assert all(math.isfinite(v.item()) for v in logs.values())
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad.abs().sum() > 0


def test_clip_part_at_temperature_001():
    """Equal logits give log B; a 2×2 identity cosine matrix gives log(1 + e^−100), no overflow."""
    same = E[[0, 0, 0, 0]]
    assert clip_loss(same, same, torch.tensor(100.0)).item() == pytest.approx(math.log(4))
    eye = E[:2].float()
    value = clip_loss(eye, eye, torch.tensor(100.0))
    assert torch.isfinite(value) and value.item() == pytest.approx(math.log1p(math.exp(-100)))


def test_fixed_temperature_sets_and_freezes_the_logit_scale():
    register_model_configs()
    clip = open_clip.create_model("vlp-tiny-clip")
    model = VLPModel(clip)
    objective_fixed = objective("objectives.contrastive.fixed_temperature=0.01")
    objective_fixed.prepare_model(model)
    assert not model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(100, rel=1e-6)
    objective_fixed.after_optimizer_step(model)  # no clamp may move a fixed temperature
    assert model.logit_scale.exp().item() == pytest.approx(100, rel=1e-6)
    learnable = VLPModel(open_clip.create_model("vlp-tiny-clip"))
    objective().prepare_model(learnable)
    assert learnable.logit_scale.requires_grad


@pytest.mark.parametrize(
    "override, message",
    [
        ("objectives.contrastive.fixed_temperature=0", "fixed_temperature: must be positive"),
        ("objectives.uniformity.t=-1", "objectives.uniformity.t: must be positive"),
        ("objectives.cross_uniformity.t=0", "objectives.cross_uniformity.t: must be positive"),
        (
            "objectives.uniformity.weight=1 data.batch_size=1",
            "data.batch_size: must be at least 2 with objectives.uniformity",
        ),
    ],
)
def test_bad_gap_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        objective(*override.split())


@pytest.mark.slow
def test_gap_demo_config_trains_with_the_terms_and_logs_geometry_curves(tmp_path):
    """configs/gap_demo.yaml (CUAXU by override) on tiny demo shards: every term is logged,
    the temperature stays fixed, and the geometry is evaluated during training."""
    demo = tmp_path / "demo"
    subprocess.run(
        [sys.executable, "-m", "data_tools", "demo", str(demo), "--num-samples", "32",
         "--samples-per-shard", "16", "--image-size", "32", "--eval-samples", "8"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "vlp/train.py", "--config", "configs/gap_demo.yaml",
        f"data.train_shards={demo}/train/{{00000..00001}}.tar", "data.batch_size=8",
        "data.workers=0", "data.shuffle_buffer=16", "train.steps=4", "train.warmup_steps=1",
        "train.log_every_steps=2", "checkpoint.every_steps=4",
        "objectives.cross_uniformity.weight=1",
        f"eval.shapes.dataset={demo}/eval/shapes", f"eval.retrieval.dataset={demo}/eval/retrieval",
        "eval.retrieval.every_steps=2", f"run.output_dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r]
    for name in ("contrastive", "caption", "uniformity", "alignment", "cross_uniformity"):
        assert all(math.isfinite(r[f"loss/{name}"]) for r in losses), name
    assert all(r["logit_scale"] == pytest.approx(100, rel=1e-5) for r in losses)
    curves = [r["step"] for r in records if "eval/retrieval/uniformity" in r]
    assert curves == [2, 4]
    assert all(
        0 <= r["eval/retrieval/linear_separability"] <= 1
        for r in records
        if "eval/retrieval/gap" in r
    )
