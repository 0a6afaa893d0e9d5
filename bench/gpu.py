"""`make bench-gpu`: CLIP and CoCa in bf16: samples/s, MFU, peak memory, data wait, vs open_clip.

For each model (ViT-B/32 CLIP and CoCa, configs/models/vlp-b32-*, equal to open_clip's ViT-B-32
and coca_ViT-B-32; and the tiny configs):

  - FLOPs per sample: one forward + backward of the training loss counted by
    torch.utils.flop_counter (matmuls and attention), for vlp's model and for open_clip's own
    forward + loss (which runs the text at the full context).
  - peak: the measured bf16 matmul rate of this device (best of square GEMMs), the denominator
    of MFU = samples/s x vlp's FLOPs per sample / peak (the same useful work for both tools).
  - in-process training step (no data loading) of both tools on one batch of demo captions:
    samples/s, MFU and peak memory (CUDA: max_memory_allocated; CPU: torch's MemTracker).
  - whole training runs of both tools (bench/train_vs_open_clip.py: same shards, settings and
    seeds, alternating): steady samples/s, data-wait fraction and MFU.
  - the decode limit: demo samples one core decodes and transforms per second (vlp's train
    transform), against the rate the run consumed them.

    python bench/gpu.py --peer-site DIR      # on a GPU machine; bench/README.md has the command
    python bench/gpu.py --device cpu --quick # smoke check of the whole harness on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import train_vs_open_clip as tvo
from _common import RESULTS, WORK, git_state, machine_info, write_results

NAME = "gpu"
MODELS = ["vlp-b32-clip", "vlp-b32-coca", "vlp-tiny-clip", "vlp-tiny-coca"]
QUICK_MODELS = ["vlp-tiny-clip", "vlp-tiny-coca"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {MODELS}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="per step, both tools")
    parser.add_argument("--samples", type=int, default=32_768, help="per CLIP training run")
    parser.add_argument("--coca-samples", type=int, default=16_384, help="per CoCa run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per model")
    parser.add_argument("--workers", type=int, default=8, help="data workers, both tools")
    parser.add_argument("--demo-samples", type=int, default=40_000)
    parser.add_argument("--image-size", type=int, default=224, help="demo shard image size")
    parser.add_argument("--steps", type=int, default=10, help="timed in-process steps")
    parser.add_argument("--peer-site", default="", metavar="DIR", help="see train_vs_open_clip")
    parser.add_argument("--skip-runs", action="store_true", help="in-process measures only")
    parser.add_argument(
        "--compile", action="store_true", help="also time vlp's step under torch.compile"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps; bench/.work")
    parser.add_argument("--output", type=Path, help="results file (default: bench/results/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.batch_size, args.samples, args.coca_samples, args.repeats = 32, 256, 256, 1
        args.workers, args.demo_samples, args.image_size, args.steps = 1, 1000, 32, 2
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    settings = run_settings(args)
    for samples in (args.samples, args.coca_samples):
        if samples % (args.batch_size * args.workers) or samples > args.demo_samples:
            raise SystemExit(
                f"{NAME}: samples per run must be a multiple of batch x workers (open_clip "
                "rounds its epoch to whole batches per worker) and at most --demo-samples"
            )
    shards = tvo.ensure_demo_shards(settings)
    import torch

    device = torch.device(args.device)
    peak = matmul_peak(device, quick=args.quick)
    print(f"{device_label(device)}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    out = args.output or (WORK / NAME / f"{NAME}.json" if args.quick else RESULTS / f"{NAME}.json")
    payload = {
        "benchmark": NAME,
        "command": " ".join(["bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "git": git_state(),
        "machine": {**machine_info(), "device": device_label(device), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "bf16_matmul_peak_tflops": float(f"{peak / 1e12:.4g}"),  # a CPU's is < 0.01
        "models": {},
        "training_runs": None,
    }
    for model in models:  # rewritten after each stage: a run cut short keeps its figures
        payload["models"][model] = in_process(model, device, args, peak, shards)
        print_model(model, payload["models"][model])
        write_results(out, payload)
    if not args.skip_runs:
        payload["training_runs"] = training_runs(args, models, payload["models"], peak, out)
        write_results(out, payload)
    print(f"results: {out}")
    return 0


def run_settings(args: argparse.Namespace) -> tvo.Settings:
    return tvo.Settings(
        batch_size=args.batch_size, clip_samples=args.samples, coca_samples=args.coca_samples,
        clip_repeats=args.repeats, coca_repeats=args.repeats, precision="bf16",
        device=args.device, demo_samples=args.demo_samples, demo_image_size=args.image_size,
        peer_site=args.peer_site, vlp_workers=args.workers, peer_workers=args.workers,
        warmup=2,
    )  # fmt: skip


def device_label(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, quick: bool) -> float:
    """Best bf16 FLOP/s over square GEMMs: what this device's matmuls reach, rather than the
    data sheet's figure (989 TFLOP/s dense for an H100 SXM; about 790 is the usual measure)."""
    import torch

    sizes = [512, 1024] if quick or device.type == "cpu" else [4096, 8192, 16384]
    # a CPU without bf16 units runs bf16 GEMMs slower than fp32 ones, and autocast keeps part
    # of the step in fp32 there: its peak is the faster of the two (else the MFU exceeds 1)
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.bfloat16, torch.float32]
    best = 0.0
    for n, dtype in itertools.product(sizes, dtypes):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(3 if quick else 10):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


class Fixture:
    """One batch of demo captions and random images; a tool's model, loss and optimizer."""

    def __init__(self, model: str, device, batch: int, shards: Path):
        import torch

        from vlp.config import ModelConfig
        from vlp.model import build_model

        torch.manual_seed(0)
        self.device, self.name = device, model

        self.vlp, self.transform, _, tokenizer = build_model(ModelConfig(name=model))
        captions = demo_captions(shards, batch)
        self.text = tokenizer(captions).to(device)
        size = self.vlp.clip.visual.image_size
        self.images = torch.randn(batch, 3, *size, device=device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def vlp_tool(self, compiled: bool = False):
        """(model, step(optimizer_step: bool)) as vlp/train.py runs it, without the loader."""
        import torch

        from vlp.config import ObjectivesConfig, TrainConfig
        from vlp.objectives import WeightedObjective
        from vlp.optim import build_optimizer

        model = self.vlp.to(self.device)
        objectives = ObjectivesConfig()
        objectives.caption.weight = 2.0 if model.has_decoder else 0.0
        objective = WeightedObjective(objectives)
        optimizer = build_optimizer(model, TrainConfig())
        forward = torch.compile(model) if compiled else model

        def step(update: bool = True) -> None:
            with self.autocast:
                loss, _ = objective(forward(self.images, self.text[:, None]), None)
            loss.backward()
            if update:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, step

    def peer_tool(self):
        """open_clip_train's step (accum_freq 1, amp_bf16): its model, loss and AdamW."""
        import open_clip

        from vlp.model import new_clip

        model = new_clip(self.name, output_dict=True).to(self.device)
        if hasattr(model, "text_decoder"):
            loss_fn = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
        else:
            loss_fn = open_clip.ClipLoss()
        optimizer = tvo.open_clip_adamw(model)

        def step(update: bool = True) -> None:
            optimizer.zero_grad()
            with self.autocast:
                losses = loss_fn(**model(self.images, self.text), output_dict=True)
            sum(losses.values()).backward()
            if update:
                optimizer.step()

        return model, step


def demo_captions(shards: Path, count: int) -> list[str]:
    captions: list[str] = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode())
                if len(captions) == count:
                    return captions
    return (captions * (count // len(captions) + 1))[:count]


COMPILED = "vlp_compiled"


def in_process(model: str, device, args: argparse.Namespace, peak: float, shards: Path):
    batch = args.batch_size
    fixture = Fixture(model, device, batch, shards)
    result: dict[str, Any] = {"batch_size": batch, "precision": "bf16"}
    tools = [(tvo.VLP, fixture.vlp_tool), (tvo.PEER, fixture.peer_tool)]
    if args.compile:  # as train.compile=true runs it; FLOPs are counted on the eager step
        tools.append((COMPILED, lambda: fixture.vlp_tool(compiled=True)))
    for tool, build in tools:
        module, step = build()
        if tool != COMPILED:
            flops = flops_per_sample(step, batch)
            result[tool] = {"gflop_per_sample": round(flops / 1e9, 3)}
        else:
            start = time.perf_counter()
            step()
            result[tool] = {"first_step_seconds": round(time.perf_counter() - start, 1)}
        rate, memory = time_steps(step, args.steps, device, batch)
        result[tool].update(samples_per_s=rate, peak_memory_mb=memory)
        module.cpu()
        del module, step
        release(device)
    useful = result[tvo.VLP]["gflop_per_sample"] * 1e9
    for tool, _ in tools:
        result[tool]["mfu"] = round(result[tool]["samples_per_s"] * useful / peak, 4)
    result["decode_per_core_samples_per_s"] = decode_rate(shards, fixture.transform)
    return result


def flops_per_sample(step, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(update=False)
    return counter.get_total_flops() / batch


def time_steps(step, steps: int, device, batch: int) -> tuple[float, float]:
    """(samples/s over `steps` steps after two warm-up steps, peak memory MB of one step)."""
    import torch

    step()
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
    return round(batch / seconds, 2), round(peak / 2**20, 1)


def release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_rate(shards: Path, transform, limit: int = 200) -> float:
    """Samples/s one core decodes (JPEG) and transforms, reading the first shard's bytes."""
    import io

    from PIL import Image

    images = []
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(images) < limit:
                images.append(tar.extractfile(member).read())
    start = time.perf_counter()
    for data in images:
        transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return round(len(images) / (time.perf_counter() - start), 1)


def training_runs(args, models: list[str], per_model: dict[str, Any], peak: float, out: Path):
    """Whole runs of both tools (bench/train_vs_open_clip.py) and their MFU and decode needs;
    the runs' own results go beside `out`."""
    path = out.with_name(f"{out.stem}_train_vs_open_clip.json")
    command = [
        "--models", *models, "--device", args.device, "--precision", "bf16",
        "--batch-size", str(args.batch_size), "--clip-samples", str(args.samples),
        "--coca-samples", str(args.coca_samples), "--clip-repeats", str(args.repeats),
        "--coca-repeats", str(args.repeats), "--vlp-workers", str(args.workers),
        "--peer-workers", str(args.workers), "--demo-samples", str(args.demo_samples),
        "--demo-image-size", str(args.image_size), "--skip-analysis", "--output", str(path),
    ]  # fmt: skip
    if args.peer_site:
        command += ["--peer-site", args.peer_site]
    if tvo.main(command) != 0:
        raise SystemExit(f"{NAME}: the training runs failed (see bench/.work/{tvo.NAME}/logs)")
    summary = json.loads(path.read_text())["summary"]
    shown = path.relative_to(tvo.REPO) if path.is_relative_to(tvo.REPO) else path
    result: dict[str, Any] = {"results": str(shown)}
    for model in models:
        group, useful = summary[f"{model}/bf16"], per_model[model][tvo.VLP]["gflop_per_sample"]
        cell = {}
        for tool in (tvo.VLP, tvo.PEER):
            rate = group["per_tool"][tool]["median_steady_samples_per_s"]
            cell[tool] = {
                "steady_samples_per_s": rate,
                "data_wait_fraction": group["per_tool"][tool]["median_data_wait_fraction"],
                "mfu": round(rate * useful * 1e9 / peak, 4),
            }
        cell["ratio_vlp_over_open_clip"] = group["ratio_vlp_over_open_clip"][
            "steady_samples_per_s"
        ]["paired_median"]
        decode = per_model[model]["decode_per_core_samples_per_s"]
        cell["decode_cores_needed_by_vlp"] = round(
            cell[tvo.VLP]["steady_samples_per_s"] / decode, 2
        )
        result[model] = cell
        print(
            f"{model}: runs vlp {cell[tvo.VLP]['steady_samples_per_s']:.0f} samples/s "
            f"(MFU {cell[tvo.VLP]['mfu']:.1%}, data wait {cell[tvo.VLP]['data_wait_fraction']:.0%})"
            f", open_clip {cell[tvo.PEER]['steady_samples_per_s']:.0f} "
            f"(MFU {cell[tvo.PEER]['mfu']:.1%}, data wait "
            f"{cell[tvo.PEER]['data_wait_fraction']:.0%}); {cell['ratio_vlp_over_open_clip']:.2f}x",
            flush=True,
        )
    return result


def print_model(model: str, m: dict[str, Any]) -> None:
    parts = [
        f"{tool} {m[tool]['samples_per_s']:.0f} samples/s, MFU {m[tool]['mfu']:.1%}, "
        f"{m[tool].get('gflop_per_sample', m[tvo.VLP]['gflop_per_sample']):.2f} GFLOP/sample, "
        f"peak {m[tool]['peak_memory_mb']:.0f} MB"
        for tool in (tvo.VLP, tvo.PEER, COMPILED)
        if tool in m
    ]
    print(
        f"{model} in-process (batch {m['batch_size']}, bf16): {'; '.join(parts)}; decode "
        f"{m['decode_per_core_samples_per_s']:.0f} samples/s per core",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
