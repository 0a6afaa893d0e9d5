"""SigLIP: a naive per-pair loop, the paper's init, GradCache, config errors, and 2 processes
(gloo) against 1 on the concatenated batch, with the ring's exchanges and block sizes."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_two_processes
from tests.siglip_distributed import batch, build, loss_and_grads
from vlp.config import ConfigError, load_config
from vlp.gradcache import grad_cache_step
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.objectives.siglip import siglip_loss


def _naive(image, text, scale, bias):
    """-(1/N) sum_i sum_j log sigmoid(z_ij (scale x_i.y_j + bias)), one pair at a time."""
    n, total = image.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * image[i] @ text[j] + bias)))
    return total / n


def test_hand_computed_value():
    # identity embeddings, scale 1, bias 0: positives log sigmoid(1), negatives log(1/2)
    eye, one, zero = torch.eye(2), torch.tensor(1.0), torch.tensor(0.0)
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5))
    assert siglip_loss(eye, eye, one, zero).item() == pytest.approx(expected, rel=1e-6)


def test_loss_and_gradients_equal_a_naive_per_pair_loop():
    generator = torch.Generator().manual_seed(0)
    leaves = [F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=-1)
              for _ in range(2)]  # fmt: skip
    leaves += [torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)]
    ours_inputs = [x.clone().requires_grad_() for x in leaves]
    naive_inputs = [x.clone().requires_grad_() for x in leaves]
    ours, naive = siglip_loss(*ours_inputs), _naive(*naive_inputs)
    torch.testing.assert_close(ours, naive)
    ours.backward()  # through the recomputed (checkpointed) blocks
    naive.backward()
    for mine, reference in zip(ours_inputs, naive_inputs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad)


def test_the_paper_init_and_a_model_without_bias_is_a_config_error():
    model, objective = build("siglip")
    assert model.clip.logit_scale.item() == pytest.approx(math.log(10))
    assert model.clip.logit_bias.item() == -10
    register_model_configs()
    plain = VLPModel(new_clip("vlp-tiny-clip"))
    with pytest.raises(ConfigError, match="objectives.siglip needs a model with a learnable"):
        objective.check_model(plain)
    cfg = load_config(None, ["data.train_shards=x", "objectives.siglip.weight=1"])
    assert "siglip" in WeightedObjective(cfg.objectives).terms
    with pytest.raises(ConfigError, match="objectives.siglip.max_logit_scale: must be at least"):
        load_config(None, ["data.train_shards=x", "objectives.siglip.max_logit_scale=0.5"])


def test_a_model_without_bias_is_one_line_and_exit_2(tmp_path, capsys):
    from vlp.train import main

    config = tmp_path / "siglip.yaml"
    config.write_text(
        "model: {name: vlp-tiny-clip}\ndata: {train_shards: x}\n"
        "objectives: {contrastive: {weight: 0}, siglip: {weight: 1}}\n"
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "init_logit_bias" in err


def test_grad_cache_equals_the_whole_batch():
    model, objective = build("siglip")
    images, text, _ = batch("siglip")
    objective(model(images, text), None)[0].backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model, objective = build("siglip")
    halves = [(images[:4], text[:4]), (images[4:], text[4:])]
    logs = grad_cache_step(lambda b: model(*b), objective, halves,
                           lambda loss: loss.backward(), contextlib.nullcontext)  # fmt: skip
    cached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert cached.keys() == reference.keys() and "clip.logit_bias" in cached
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-10, rtol=1e-8, msg=name)
    model, objective = build("siglip")
    whole = objective.terms["siglip"](model(images, text), None)
    torch.testing.assert_close(logs["loss/siglip"], whole.detach())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["siglip", "dcl_negatives"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, case):
    out = tmp_path / "two.pt"
    result = run_two_processes("tests.siglip_distributed", case, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out)
    model, objective = build(case)
    loss, grads = loss_and_grads(model, objective, *batch(case))
    torch.testing.assert_close(two["loss"], loss.detach(), atol=1e-6, rtol=0)
    assert two["grads"].keys() == grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=0, msg=name)
    if case == "siglip":
        calls = two["calls"]
        # W - 1 = 1 exchange forward (and its mirror in the backward), never an all_gather
        assert calls["forward"] == {"exchanges": 1, "all_gathers": 0}
        assert calls["total_exchanges"] == 2
        # 2 blocks of 4 x 4 in the forward, recomputed once each in the backward: never 8 wide
        assert sorted(set(calls["blocks"])) == [(4, 4)] and len(calls["blocks"]) == 4


def test_the_demo_config_trains_siglip_alone_on_a_model_with_a_bias():
    from pathlib import Path

    import open_clip

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "siglip_demo.yaml")
    assert list(WeightedObjective(cfg.objectives).terms) == ["siglip"]
    register_model_configs()
    assert open_clip.get_model_config(cfg.model.name)["init_logit_bias"] == -10
