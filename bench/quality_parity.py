"""Does vlp train the same model as open_clip's trainer when nothing else differs?

Part of quality_vs_open_clip.py (run there, in a child process of vlp's .venv). Two checks:

1. Initial weights: `train.seed=S` in vlp (accelerate's set_seed, then build_model) against
   open_clip_train.main's random_seed(S, 0) then create_model_and_transforms (for CoCa with the
   benchmark wrapper's decoder-projection initialisation): equal tensors or not.
2. Trajectory: from the same initial weights, STEPS training steps on the same real batches
   (Fashion-MNIST mosaics, open_clip's eval transform, so no augmentation draws), vlp's step
   (VLPModel + its objectives, fused AdamW with its decay groups, lr_at) against open_clip_train's
   (ClipLoss or CoCaLoss with caption weight 2, its AdamW groups, for-each kernel, the same lr,
   logit-scale clamp). The per-step loss difference says whether the two tools' losses differ
   for a reason of their own or only because their data order and initial draws differ.

    .venv/bin/python bench/quality_parity.py OUT.json [--lr 2e-3 --warmup 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from _common import run_timed, write_results

MODELS = ("vlp-tiny-clip", "vlp-tiny-coca")
STEPS = 40
BATCH = 64
SEEDS = (0, 1, 2)


def run(here: Path, lr: float, warmup: int) -> dict[str, Any]:
    """Runs this file as a child process and returns its JSON."""
    out = here / "parity.json"
    print("parity: same init and batches, vlp's step vs open_clip_train's ...", flush=True)
    command = [sys.executable, __file__, str(out), "--lr", str(lr), "--warmup", str(warmup)]
    result = run_timed(command, here / "logs" / "parity.log")
    data = json.loads(out.read_text())
    data["seconds"] = round(result.seconds, 1)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=16)
    args = parser.parse_args(argv)
    import quality_vs_open_clip as q

    shards = sorted(str(p) for p in (q.DATA / "train").glob("*.tar"))
    result = {
        "method": __doc__.split("\n\n")[1].strip(),
        "steps": STEPS,
        "batch_size": BATCH,
        "lr": args.lr,
        "warmup": args.warmup,
        "models": {m: model_parity(m, shards, args.lr, args.warmup) for m in MODELS},
    }
    write_results(args.out, result)
    return 0


def initial_weights_equal(name: str, seed: int) -> bool:
    import open_clip
    import torch
    from accelerate.utils import set_seed
    from open_clip_train.main import random_seed

    from vlp.config import ModelConfig
    from vlp.model import build_model, init_decoder_projection

    set_seed(seed)
    ours = build_model(ModelConfig(name=name))[0].clip.state_dict()
    random_seed(seed, 0)
    peer = open_clip.create_model_and_transforms(name, output_dict=True)[0]
    if hasattr(peer, "text_decoder"):  # the benchmark wrapper's --init-coca-projection
        init_decoder_projection(peer.text_decoder)
    theirs = peer.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def batches(name: str, shards: list[str], count: int) -> list[tuple[Any, Any]]:
    import open_clip
    import torch
    import webdataset as wds

    from vlp.model import register_model_configs

    register_model_configs()
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    stream = iter(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "txt"))
    out = []
    for _ in range(count):
        pairs = [next(stream) for _ in range(BATCH)]
        images = torch.stack([preprocess(image) for image, _ in pairs])
        out.append((images, tokenizer([text for _, text in pairs])))
    return out


def model_parity(name: str, shards: list[str], lr: float, warmup: int) -> dict[str, Any]:
    import open_clip
    import torch
    from train_vs_open_clip import open_clip_adamw

    from vlp.config import ModelConfig, ObjectivesConfig, TrainConfig
    from vlp.model import build_model
    from vlp.objectives import WeightedObjective
    from vlp.optim import build_optimizer, lr_at

    torch.manual_seed(0)
    vlp, *_ = build_model(ModelConfig(name=name))
    coca = vlp.has_decoder
    objectives = ObjectivesConfig()
    objectives.caption.weight = 2.0 if coca else 0.0
    objective = WeightedObjective(objectives)
    vlp_optimizer = build_optimizer(vlp, TrainConfig(lr=lr))
    peer = open_clip.create_model(name, output_dict=True)
    peer.load_state_dict(vlp.clip.state_dict())
    peer_loss = (
        open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
        if coca
        else open_clip.ClipLoss()
    )
    peer_optimizer = open_clip_adamw(peer)
    losses: dict[str, list[float]] = {"vlp": [], "open_clip": []}
    for step, (images, text) in enumerate(batches(name, shards, STEPS)):
        for optimizer in (vlp_optimizer, peer_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, warmup, STEPS)
        loss, _ = objective(vlp(images, text[:, None], None), None)
        loss.backward()
        _step(vlp, vlp_optimizer)
        objective.after_optimizer_step(vlp.clip)
        peer_total = sum(peer_loss(**peer(images, text), output_dict=True).values())
        peer_total.backward()
        _step(peer, peer_optimizer)
        with torch.no_grad():
            peer.logit_scale.clamp_(0, math.log(100))
        losses["vlp"].append(loss.item())
        losses["open_clip"].append(peer_total.item())
    diffs = [abs(a - b) for a, b in zip(losses["vlp"], losses["open_clip"], strict=True)]
    return {
        "initial_weights_equal_by_seed": {s: initial_weights_equal(name, s) for s in SEEDS},
        "steps": STEPS,
        "max_abs_diff": max(diffs),
        "final_abs_diff": diffs[-1],
        "losses": {k: [round(v, 6) for v in vs] for k, vs in losses.items()},
    }


def _step(model: Any, optimizer: Any) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    sys.exit(main())
