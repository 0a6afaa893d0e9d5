"""configs/accelerate/: every file is a valid accelerate config, and the ones accelerate can run
on a CPU train vlp with 2 gloo processes exactly as torchrun does."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from tests.conftest import demo_shards
from vlp import distributed
from vlp.config import ConfigError
from vlp.distributed import configure_engine

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
BIN = Path(sys.executable).parent
STEPS = 4
original_gather = distributed.gather_with_grad
ENGINES = {
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
}


def test_every_accelerate_config_loads_with_its_engine():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(ENGINES)
    for name, engine in ENGINES.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert str(config.distributed_type).split(".")[-1] == engine, name
        # vlp's train.precision decides the precision and train.compile the compiler
        assert config.mixed_precision == "no", name
        assert config.dynamo_config.get("dynamo_backend", "NO") == "NO", name
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "ResidualAttentionBlock"
    zero = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    assert zero["zero_stage"] == 2


def _deepspeed_accelerator(processes: int):
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def test_deepspeed_gets_vlps_batch_and_clipping():
    accelerator = _deepspeed_accelerator(4)
    configure_engine(accelerator, micro_batch=32, grad_accum=1, grad_clip=0.5)
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 32,
        "train_batch_size": 128,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.5,
    }
    with pytest.raises(ConfigError, match="train.grad_accum=2"):
        configure_engine(_deepspeed_accelerator(4), micro_batch=32, grad_accum=2, grad_clip=1)
    plain = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), num_processes=2)
    configure_engine(plain, micro_batch=32, grad_accum=4, grad_clip=1.0)  # nothing to set


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = demo_shards(tmp_path_factory.mktemp("shards"), 240, 30)
    return str(out / "train" / "{00000..00007}.tar")


def _train(launcher: list[str], shards: str, run_dir: Path, *extra: str) -> dict:
    """Train the tiny CoCa for STEPS steps (no evaluators); return the final checkpoint."""
    run_dir.parent.mkdir(parents=True)
    config = run_dir.parent / "base.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text().split("\neval:")[0] + "\n")
    command = [
        *launcher, "vlp/train.py", "--config", str(config),
        f"data.train_shards={shards}", f"run.output_dir={run_dir}", "run.trackers=[]",
        "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=30",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.grad_accum=2",
        "train.deterministic=true", f"checkpoint.every_steps={STEPS}", "resume=null", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = run_dir / "checkpoints" / f"step_{STEPS:09d}"
    meta = json.loads((final / "meta.json").read_text())
    log = result.stdout + result.stderr
    return {"weights": load_file(final / "model.safetensors"), "meta": meta, "log": log}


def _accelerate(config: str, processes: int, port: int) -> list[str]:
    return [
        str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
        "--num_processes", str(processes), "--main_process_port", str(port),
    ]  # fmt: skip


def _assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for name, tensor in a["weights"].items():
        assert tensor.equal(b["weights"][name]), name


@pytest.mark.slow
def test_ddp_config_trains_two_processes_as_torchrun_does(shards, tmp_path):
    torchrun = [shutil.which("torchrun", path=str(BIN)), "--nproc_per_node", "2",
                "--master_port", "29561"]  # fmt: skip
    reference = _train(torchrun, shards, tmp_path / "torchrun" / "run")
    launched = _train(_accelerate("ddp.yaml", 2, 29563), shards, tmp_path / "ddp" / "run")
    # one process group of 2 (not 2 independent runs): the global batch counts both
    assert launched["meta"]["data"]["stream"]["processes"] == 2
    assert launched["meta"]["samples_seen"] == STEPS * 4 * 2 * 2
    _assert_same(launched, reference)
    # the same run keeping the whole contrastive batch over both micro-batches (and ranks)
    cached = _train(torchrun, shards, tmp_path / "cache" / "run", "train.grad_cache=true")
    assert cached["weights"].keys() == reference["weights"].keys()
    assert any(not t.equal(reference["weights"][n]) for n, t in cached["weights"].items())
    assert all(t.isfinite().all() for t in cached["weights"].values())


@pytest.mark.slow
def test_single_gpu_config_trains_as_plain_python_does(shards, tmp_path):
    reference = _train([sys.executable], shards, tmp_path / "python" / "run")
    launched = _train(_accelerate("single_gpu.yaml", 1, 29565), shards, tmp_path / "one" / "run")
    assert launched["meta"]["data"]["stream"]["processes"] == 1
    # accelerate launch sets OMP_NUM_THREADS=1; the run still uses every core it may run on
    assert f"; {len(os.sched_getaffinity(0))} CPU threads" in launched["log"]
    _assert_same(launched, reference)


def _bench(name: str, monkeypatch):
    """A bench script as a module; its helpers (bench/_common.py) sit beside it, where running
    the script puts them on sys.path."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_contrastive_loss_memory_is_linear_in_world_size_at_fixed_per_rank_batch(
    monkeypatch,
):
    loss_memory = _bench("loss_memory", monkeypatch)
    local = {w: loss_memory.peak_mib("local", 64, w)[0] for w in (8, 32)}
    naive = {w: loss_memory.peak_mib("naive", 64, w)[0] for w in (8, 32)}
    # 4x the ranks: the local loss's [B, W*B] logits and gathered rows grow 4x (its fixed
    # [B, D] part does not), the naive [W*B, W*B] matrix 16x (its rows 4x)
    assert 3 < local[32] / local[8] <= 4
    assert naive[32] / naive[8] > 10
    assert distributed.gather_with_grad is original_gather  # the simulation is undone


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """`make bench-gpu`'s smoke mode: FLOPs, MFU, peak memory and decode rate, both tools."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--quick", "--skip-runs",
         "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["bf16_matmul_peak_tflops"] > 0
    assert sorted(payload["models"]) == ["vlp-tiny-clip", "vlp-tiny-coca"]
    for model, m in payload["models"].items():
        for tool in ("vlp", "open_clip"):
            assert m[tool]["gflop_per_sample"] > 0 and m[tool]["peak_memory_mb"] > 0, model
            assert 0 < m[tool]["mfu"] < 1 and m[tool]["samples_per_s"] > 0, model
        assert m["decode_per_core_samples_per_s"] > 0
    coca = payload["models"]["vlp-tiny-coca"]
    # open_clip decodes and projects the whole context; vlp only up to the longest caption
    assert coca["vlp"]["gflop_per_sample"] < coca["open_clip"]["gflop_per_sample"]
