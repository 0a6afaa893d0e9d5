"""How the model and its optimizer are spread over processes: accelerate's engines, or FSDP2.

`Engine` hands the model to `accelerator.prepare`: one process, DDP, or DeepSpeed. When the
launcher asks for FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, which
sets ACCELERATE_USE_FSDP), `ShardedEngine` shards the model itself with torch's FSDP2
`fully_shard`, on GPUs and on CPUs alike: accelerate uses FSDP only with an accelerator (on a
CPU it silently trains with DDP instead), and its FSDP2 refuses the 0-dim temperature
parameters CLIP models have. The trainer calls only the methods below, whichever engine runs.

The ShardedEngine, per process (W processes, one mesh over all of them):
- every transformer block (`fsdp_transformer_layer_cls_to_wrap`, by class name) is a unit
  whose parameters are all-gathered just before its forward; the rest belong to the root unit;
- the 0-dim parameters (logit scales, logit bias) stay whole on every rank, outside FSDP; their
  gradients are averaged over ranks after the backward, as DDP would;
- checkpoints hold the whole model and the optimizer state keyed by parameter name, gathered
  to rank 0; a resume reads them on every rank and keeps its own shards;
- evaluation during training runs on rank 0, so rank 0 keeps an unsharded copy of the open_clip
  model that is refreshed from the shards (a collective) before each evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vlp import distributed
from vlp.checkpoint import open_clip_weights
from vlp.config import ConfigError
from vlp.runlayout import STATE_MODEL_FILE, STATE_OPTIMIZER_FILE

NewOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
DEFAULT_UNITS = "ResidualAttentionBlock"
"""open_clip's transformer block: the towers' and the CoCa decoder's."""


class Engine:
    """accelerate's engine for the launch: one process, DDP or DeepSpeed."""

    sharded = False

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer

    def prepare(
        self, model: nn.Module, new_optimizer: NewOptimizer, cfg, not_shardable: str | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Distribute `model`, then build its optimizer with `new_optimizer(model)`;
        `not_shardable`: why the run's method cannot be sharded (Method.not_shardable)."""
        optimizer = new_optimizer(model)
        distributed.configure_engine(
            self.accelerator, cfg.data.batch_size, cfg.train.grad_accum, cfg.train.grad_clip
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, self.optimizer

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward passes inside it leave gradients unsynchronised (gradient accumulation)."""
        return self.accelerator.no_sync(self.model)

    def finish_gradients(self) -> None:
        """After the last backward of a step: whatever synchronisation the engine left to vlp."""

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def save_state(self, directory: Path) -> dict[str, Tensor]:
        """Collective: write model, optimizer and every rank's RNG states into `directory`;
        return the whole model state on the main process."""
        self.accelerator.save_state(str(directory))
        return self.accelerator.get_state_dict(self.model)  # every process: DeepSpeed gathers

    def load_state(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))

    def describe(self) -> str:
        """Collective: what the start-up message adds about the engine ('; ...' or '')."""
        if self.accelerator.device.type == "cpu":
            return f"; {torch.get_num_threads()} CPU threads"
        return ""

    def eval_module(self) -> nn.Module:
        """The open_clip model that evaluation during training calls on rank 0 (live weights)."""
        return self.unwrapped().clip

    def sync_eval_module(self) -> None:
        """Collective, before an evaluation: bring `eval_module()` up to the current weights."""


class ShardedEngine(Engine):
    """vlp's FSDP: torch's `fully_shard` (FSDP2) over every process, on any device."""

    sharded = True

    def __init__(self, accelerator, units: tuple[str, ...], reshard_after_forward: bool) -> None:
        super().__init__(accelerator)
        self.units = units
        self.reshard_after_forward = reshard_after_forward
        self.replica: nn.Module | None = None
        self.scalars: list[nn.Parameter] = []

    def prepare(self, model, new_optimizer, cfg, not_shardable=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not_shardable:
            raise ConfigError(
                f"objectives: {not_shardable}, which vlp's FSDP cannot shard yet; "
                "launch with configs/accelerate/ddp.yaml"
            )
        if cfg.train.compile:
            raise ConfigError(
                "train.compile=true: not supported with FSDP (configs/accelerate/fsdp.yaml) yet; "
                "set it to false or launch with ddp.yaml"
            )
        device = self.accelerator.device
        if distributed.rank() == 0:  # before sharding: the same weights, unsharded
            self.replica = copy.deepcopy(model.clip).to(device)
        blocks = [m for m in model.modules() if type(m).__name__ in self.units]
        if not blocks:
            raise ConfigError(
                f"fsdp_transformer_layer_cls_to_wrap: no module of class {', '.join(self.units)} "
                "in the model; name its transformer block class in the accelerate config"
            )
        self.scalars = [p for p in model.parameters() if p.ndim == 0]
        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        options = dict(mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(model.to(device), ignored_params=set(self.scalars), **options)
        if self.accelerator.mixed_precision != "no":  # bf16 autocast, as prepare() would
            model.forward = self.accelerator.autocast()(model.forward)
        # FSDP2 warns that the model's outputs include views (text_emb is a slice of
        # text_emb_all) because an in-place op on one would skip its backward hook; vlp's
        # objectives never modify the model's outputs in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        self.model, self.optimizer = model, new_optimizer(model)
        return self.model, self.optimizer

    def unwrapped(self) -> nn.Module:
        return self.model

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def finish_gradients(self) -> None:
        distributed.average_gradients(self.scalars)

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]
        return distributed.clip_grad_norm(sharded, whole, max_norm)

    def save_state(self, directory: Path) -> dict[str, Tensor]:
        model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
        self.accelerator.save_state(str(directory))  # nothing prepared: the RNG states only
        if self.accelerator.is_main_process:
            weights = {name: tensor.contiguous() for name, tensor in model_state.items()}
            save_file(weights, directory / STATE_MODEL_FILE)
            torch.save(optimizer_state, directory / STATE_OPTIMIZER_FILE)
        return model_state

    def load_state(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))
        model_state = load_file(directory / STATE_MODEL_FILE)
        optimizer_state = torch.load(directory / STATE_OPTIMIZER_FILE, weights_only=True)
        distributed.load_full_state(self.model, self.optimizer, model_state, optimizer_state)

    def describe(self) -> str:
        held = sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel()
            for p in self.model.parameters()
        )
        per_rank = " / ".join(f"{n:,}" for n in distributed.all_gather_objects(held))
        whole = sum(p.numel() for p in self.model.parameters())
        return (
            f"{super().describe()}; FSDP2 over {distributed.world_size()} processes, "
            f"parameter elements held per process {per_rank} of {whole:,}"
        )

    def eval_module(self) -> nn.Module:
        return self.replica if self.replica is not None else self.model.clip

    def sync_eval_module(self) -> None:
        state = distributed.full_state(self.model)[0]
        if self.replica is not None:  # on the device already: load_state_dict copies in place
            self.replica.load_state_dict(open_clip_weights(state))


def take_fsdp_request() -> bool:
    """Whether the launcher asked for FSDP; removes the request from the environment first, so
    accelerate does not act on it as well (vlp's ShardedEngine does the sharding)."""
    return os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true"


def new_engine(accelerator, fsdp: bool) -> Engine:
    """The engine for this launch; `fsdp`: what take_fsdp_request() said (one process has
    nothing to shard: it trains as a plain run)."""
    if not fsdp or distributed.world_size() == 1:
        return Engine(accelerator)
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ConfigError(
            "fsdp_offload_params: true is not supported by vlp's FSDP; set it to false"
        )
    units = tuple(filter(None, os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")))
    return ShardedEngine(accelerator, units or (DEFAULT_UNITS,), _reshard_after_forward())


def _reshard_after_forward() -> bool:
    """FSDP2's `fsdp_reshard_after_forward`; FSDP1 configs say it as a sharding strategy."""
    if os.environ.get("FSDP_VERSION", "1") == "2":
        return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    choices = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}
    if strategy not in choices:
        raise ConfigError(
            f"fsdp_sharding_strategy: {strategy} is not supported by vlp's FSDP; "
            "use FULL_SHARD or SHARD_GRAD_OP (or fsdp_version: 2)"
        )
    return choices[strategy]
