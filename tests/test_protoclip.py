"""ProtoCLIP in training: heads, episodes, the feature pass, the objectives, 2 processes, a run.

The pure components (k-means, back translation, targets, losses, teacher) are tested in
test_prototypes.py; this file covers what methods/protoclip_baselines.md §4.1 asks of their use
(items 1-4, 8, 10, 12, 13).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tests import protoclip_distributed as reference
from tests.conftest import NO_DEMO_EVAL, run_two_processes
from vlp.checkpoint import open_clip_weights
from vlp.config import ConfigError, TrainConfig, load_config
from vlp.data.pipeline import SampleDecoder
from vlp.episode_state import Bank, Clustering, FeatureStream, build_state, feature_pass
from vlp.episodes import EpisodePlan
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective
from vlp.objectives.contrastive import clip_loss
from vlp.optim import build_optimizer, no_decay
from vlp.prototypes import crosswise_loss, prototype_targets

REPO = Path(__file__).resolve().parents[1]


def _model(layers: int = 1) -> VLPModel:
    register_model_configs()
    torch.manual_seed(0)
    model = VLPModel(new_clip("vlp-tiny-clip"))
    model.add_prototype_heads(hidden=32, dim=8, layers=layers)
    return model


def _tokens(count: int) -> torch.Tensor:
    import open_clip

    captions = [f"a caption number {i}" for i in range(count)]
    return open_clip.get_tokenizer("vlp-tiny-clip")(captions)[:, None]


# ---- heads (§4.1 items 1, 2, 13)


def test_heads_are_training_only_and_outside_the_contrastive_gradient():
    model = _model()
    out = model(torch.randn(4, 3, 32, 32), _tokens(4))
    norms = torch.cat([out.image_proto, out.text_proto]).norm(dim=1)
    assert out.image_proto.shape == (4, 8) and torch.allclose(norms, torch.ones(8), atol=1e-5)
    assert model.logit_scale_proto.item() == pytest.approx(math.log(1 / 0.07))
    clip_loss(out.image_emb, out.text_emb, out.logit_scale).backward()
    heads = {n: p for n, p in model.named_parameters() if "_head." in n}
    assert heads and all(p.grad is None for p in heads.values())
    assert not set(model.image_head.parameters()) & set(model.text_head.parameters())
    # no weight decay on the heads; the export (what evaluation loads) has neither head
    optimizer = build_optimizer(model, TrainConfig())
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert not decayed & {id(p) for p in heads.values()}
    assert all(no_decay(n, p) for n, p in heads.items())
    exported = open_clip_weights(model.state_dict())
    assert exported.keys() == model.clip.state_dict().keys()


# ---- episodes (§4.1 item 3)


def _plan(**overrides) -> EpisodePlan:
    settings = dict(
        urls=[f"s{i}.tar" for i in range(10)],
        shards_per_episode=3,
        steps_per_episode=5,
        total_steps=40,
        warmup_episodes=1,
        lit_episodes=2,
        seed=7,
    )
    return EpisodePlan(**{**settings, **overrides})


def test_episodes_are_seeded_shard_sets_without_replacement_within_a_cycle():
    plan = _plan()
    cycle = [plan.shards(e) for e in range(3)]  # 10 // 3 = 3 episodes per cycle
    flat = [shard for shards in cycle for shard in shards]
    assert all(len(s) == 3 for s in cycle) and len(set(flat)) == 9
    assert plan.shards(1) == _plan().shards(1) and plan.shards(1) != _plan(seed=8).shards(1)
    assert plan.shards(3) != plan.shards(0)  # the next cycle draws a new permutation
    assert (plan.num_episodes, plan.episode(14), plan.first_step(3)) == (8, 2, 15)
    assert [plan.clusters(e) for e in range(8)] == [False] + [True] * 5 + [False] * 2
    assert plan.lit_start_step == 30 and _plan(lit_episodes=0).lit_start_step is None


def _plan_config(tmp_path: Path, *overrides: str):
    (tmp_path / "sizes.json").write_text(json.dumps({f"{i}.tar": 60 for i in range(8)}))
    shards = f"{tmp_path}/{{0..7}}.tar"
    return load_config(
        None, [f"data.train_shards={shards}", "objectives.prototype.weight=1", *overrides]
    )


def test_episode_steps_come_from_sizes_json_or_the_config(tmp_path):
    cfg = _plan_config(tmp_path, "prototypes.episode_shards=2")
    assert EpisodePlan.from_config(cfg, global_batch=8).steps_per_episode == 15
    cfg = _plan_config(tmp_path, "prototypes.episode_shards=2", "prototypes.episode_steps=4")
    assert EpisodePlan.from_config(cfg, global_batch=8).steps_per_episode == 4
    with pytest.raises(ConfigError, match="data.train_shards has only 8 shards"):
        EpisodePlan.from_config(_plan_config(tmp_path, "prototypes.episode_shards=9"), 8)
    with pytest.raises(ConfigError, match="fewer than one global batch of 512"):
        EpisodePlan.from_config(_plan_config(tmp_path, "prototypes.episode_shards=1"), 512)


def test_the_external_teacher_needs_back_translation():
    with pytest.raises(ConfigError, match="objectives.prototype.back_translation"):
        load_config(
            None,
            [
                "data.train_shards=x",
                "objectives.prototype_external.weight=1",
                "objectives.prototype.back_translation=false",
            ],
        )


# ---- the feature pass (§4.1 item 4)


def _coded_shards(directory: Path, shards: int, per_shard: int) -> list[str]:
    """Shards whose image i is a flat grey of value i (its key's number); sample 3 is corrupt."""
    urls = []
    for s in range(shards):
        path = directory / f"{s}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                index = s * per_shard + j
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(buffer, "PNG")
                image = b"not an image" if index == 3 else buffer.getvalue()
                for name, data in ((f"{index:04d}.png", image), (f"{index:04d}.txt", b"a cap")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


class _CodingModel(torch.nn.Module):
    """prototype_features writes each image's grey value into both features."""

    def prototype_features(self, images, text):
        value = images.float().mean(dim=(1, 2, 3))[:, None]
        return value.expand(-1, 4), -value.expand(-1, 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_bank_rows_belong_to_their_keys_and_bad_samples_are_skipped(tmp_path, workers):
    urls = _coded_shards(tmp_path, shards=3, per_shard=7)
    decode = SampleDecoder(
        lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1),
        lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        ("png",),
        "txt",
        "raw",
        "raw",
    )
    loader = DataLoader(
        FeatureStream(urls, decode, 4, 0, 0, 1), batch_size=None, num_workers=workers
    )
    bank = feature_pass(
        _CodingModel(), loader, lambda x: x, torch.device("cpu"), torch.no_grad, print
    )
    assert sorted(bank.keys) == [f"{i:04d}" for i in range(21) if i != 3]
    assert bank.image.shape == (20, 4) and bank.captions == ["a cap"] * 20
    coded = torch.tensor([float(k) for k in bank.keys])
    assert torch.equal(bank.image[:, 0], coded) and torch.equal(bank.text[:, 1], -coded)


# ---- the objectives (§4.1 items 8, 10)


def _state():
    generator = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(12, 8, generator=generator), dim=1)
    text = F.normalize(torch.randn(12, 8, generator=generator), dim=1)
    keys = [f"k{i}" for i in range(12)]
    bank = Bank(keys, image, text, [""] * 12)
    return build_state(bank, Clustering(4, 10, 1, "faiss", 0), None, torch.device("cpu"), print)


def _objective(*overrides: str) -> WeightedObjective:
    cfg = load_config(None, ["data.train_shards=x", "objectives.prototype.weight=1", *overrides])
    return WeightedObjective(cfg.objectives)


def test_the_prototype_term_scores_each_row_by_its_keys_labels():
    state, model = _state(), _model()
    out = model(torch.randn(5, 3, 32, 32), _tokens(5))
    keys = ["k7", "k0", "k11", "k3", "k7"]  # any order, repeats allowed
    objective = _objective("objectives.contrastive.weight=0")
    objective.set_state(state)
    loss, logs = objective(out, SimpleNamespace(keys=keys))
    rows = torch.tensor([7, 0, 11, 3, 7])
    expected = crosswise_loss(
        out.image_proto,
        out.text_proto,
        image_protos_from_text=state.image_from_text,
        text_protos_from_image=state.text_from_image,
        image_targets_from_text=prototype_targets(
            state.text_centroids, state.text_labels[rows], 0.01, False
        ),
        text_targets_from_image=prototype_targets(
            state.image_centroids, state.image_labels[rows], 0.01, False
        ),
        scale=out.logit_scale_proto,
    ).loss
    assert torch.equal(loss, expected) and torch.equal(logs["loss/prototype"], expected)
    loss.backward()  # gradient reaches the heads and the temperature, never the episode state
    assert model.logit_scale_proto.grad is not None and model.image_head.layers[0].weight.grad.any()
    assert all(not t.requires_grad for t in state.tensors().values())
    with pytest.raises(Exception, match="was not in the episode's feature pass"):
        objective(out, SimpleNamespace(keys=["nope"] * 5))


def test_outside_clustering_episodes_the_total_is_the_contrastive_loss_bit_exactly():
    model = _model()
    out = model(torch.randn(6, 3, 32, 32), _tokens(6))
    batch = SimpleNamespace(keys=[f"k{i}" for i in range(6)])
    plain = WeightedObjective(load_config(None, ["data.train_shards=x"]).objectives)
    episodic = _objective("objectives.prototype_external.weight=1")
    episodic.set_state(None)
    (total, logs), (reference_total, _) = episodic(out, batch), plain(out, batch)
    assert torch.equal(total, reference_total) and "loss/prototype" not in logs
    with_prototypes = _objective()
    with_prototypes.set_state(_state())
    assert not torch.equal(with_prototypes(out, SimpleNamespace(keys=["k1"] * 6))[0], total)


# ---- two processes (§4.1 item 12)


@pytest.mark.slow
def test_two_processes_build_the_same_episode_and_the_same_gradients(tmp_path):
    out = tmp_path / "two.pt"
    result = run_two_processes("tests.protoclip_distributed", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out)
    state = reference.state_of(reference.bank())
    assert two["keys"] == state.keys  # rank-major: rank 0's rows, then rank 1's
    for name, tensor in state.tensors().items():
        assert torch.equal(two["state"][name], tensor), name
    model, objective = reference.build(state)
    loss, grads = reference.loss_and_grads(model, objective, *reference.batch())
    torch.testing.assert_close(two["loss"], loss.detach(), atol=1e-6, rtol=0)
    assert two["grads"].keys() == grads.keys() and "logit_scale_proto" in grads
    assert any(name.startswith("image_head.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=0, msg=name)


# ---- a whole run: warm-up, clustering episodes, LiT, resume within an episode (§4.1 item 10)

STEPS = 60
RUN = [
    "model.name=vlp-tiny-clip",
    "objectives.caption.weight=0",
    "objectives.prototype.weight=1",
    "objectives.prototype_external.weight=1",
    "prototypes.episode_shards=2",  # 120 samples: 15 steps of 8 (sizes.json)
    "prototypes.clusters=10",
    "prototypes.head_hidden=32",
    "prototypes.head_dim=16",
    "prototypes.lit_episodes=1",
    "data.batch_size=8",
    "data.workers=2",
    "data.shuffle_buffer=100",
    f"train.steps={STEPS}",
    "train.warmup_steps=3",
    "train.deterministic=true",
    "train.log_every_steps=1",
    "checkpoint.every_steps=5",
    "checkpoint.keep=20",
    "run.trackers=[]",
    *NO_DEMO_EVAL,
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    command = [sys.executable, "-m", "data_tools", "demo", str(out), "--num-samples", "480"]
    command += ["--samples-per-shard", "60", "--image-size", "32", "--eval-samples", "8"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return str(out / "train" / "{00000..00007}.tar")


def _train(shards: str, run_dir: Path, *extra: str, code: int = 0) -> str:
    command = [sys.executable, "vlp/train.py", "--config", "configs/protoclip_demo.yaml"]
    command += [f"data.train_shards={shards}", f"run.output_dir={run_dir}", *RUN, *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == code, result.stderr[-3000:]
    return result.stderr


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:09d}" / "state" / "model.safetensors")


@pytest.mark.slow
def test_episodes_warm_up_cluster_and_freeze_the_image_tower_and_resume_exactly(shards, tmp_path):
    log = _train(shards, tmp_path / "a")
    assert "episode 0: steps 1-15, without prototypes" in log and "episode 1: steps 16-30" in log
    assert "episode 3: steps 46-60, without prototypes" in log and "clustering: 120 samples" in log
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    steps = {r["step"]: r for r in records if "loss/total" in r}
    for step in range(1, 16):  # warm-up: the contrastive loss alone, bit for bit
        assert steps[step]["loss/total"] == steps[step]["loss/contrastive"]
        assert "loss/prototype" not in steps[step]
    for step in range(16, 46):
        assert "loss/prototype" in steps[step] and "loss/prototype_external" in steps[step]
        assert steps[step]["logit_scale_proto"] <= 100
    # LiT from step 46 (0-based 45): the image tower's rate is 0 and it no longer moves
    assert steps[45]["lr_visual"] > 0 and all(steps[s]["lr_visual"] == 0 for s in range(46, 61))
    assert all(steps[s]["loss/total"] == steps[s]["loss/contrastive"] for s in range(46, 61))
    before, after = _weights(tmp_path / "a", 45), _weights(tmp_path / "a", STEPS)
    visual = [k for k in before if k.startswith("clip.visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not torch.equal(before["clip.text_projection"], after["clip.text_projection"])
    # a run resumed inside a clustering episode (step 20 of 16-30) lands on the same weights
    resumed = tmp_path / "b" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / f"step_{20:09d}", resumed / f"step_{20:09d}")
    # other episodes would be another data stream: a changed prototypes setting cannot resume
    log = _train(shards, tmp_path / "b", "prototypes.episode_shards=4", code=2)
    assert "different data stream (prototypes changed)" in log and "Traceback" not in log
    log = _train(shards, tmp_path / "b")
    assert "resumed from" in log and log.count("clustering: ") == 1  # episode 2's only
    final = _weights(tmp_path / "b", STEPS)
    assert final.keys() == after.keys()
    assert all(torch.equal(final[k], after[k]) for k in after)


def test_duplicate_keys_in_an_episode_are_reported():
    generator = torch.Generator().manual_seed(4)
    features = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    keys = ["a", "b", "a", "c", "d", "b"]
    said: list[str] = []
    clustering = Clustering(2, 5, 1, "faiss", 0)
    state = build_state(
        Bank(keys, features, features, [""] * 6), clustering, None, torch.device("cpu"), said.append
    )
    assert any(line.startswith("2 samples of the episode share their key") for line in said)
    assert state.rows(["a", "b"], torch.device("cpu")).tolist() == [2, 5]
