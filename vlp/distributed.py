"""Every collective vlp uses, in one place (each is tested with 2 gloo processes).

Losses must gather with `gather_with_grad`: `accelerator.gather` returns tensors without a
gradient path, which silently drops the cross-rank terms of a contrastive loss's gradient.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from vlp.config import ConfigError


def new_accelerator(**kwargs: Any):
    """An Accelerator that also runs multi-process on CPU-only machines.

    Without `cpu=True`, accelerate treats `torchrun` processes on a machine without a GPU as
    independent single processes (no process group), which would silently train W copies.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


def local_processes() -> int:
    """Processes of this run on this node (torchrun and accelerate's launchers set it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cpu_cores() -> int:
    """The cores this process may run on (its affinity on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(requested: int) -> int:
    """torch's intra-op threads for one CPU process: `requested`, or with 0 this process's
    cores ÷ the processes on this node.

    OMP_NUM_THREADS is deliberately not consulted: `accelerate launch` and torchrun set it to 1
    for every CPU process, which would leave all but one core idle.
    """
    if requested:
        return requested
    return max(1, cpu_cores() // local_processes())


def configure_engine(accelerator, micro_batch: int, grad_accum: int, grad_clip: float) -> None:
    """Settings an engine needs before `accelerator.prepare` (DeepSpeed; nothing otherwise).

    vlp feeds its own DataLoader (never prepared by accelerate), so accelerate cannot fill
    DeepSpeed's batch sizes. DeepSpeed also clips inside its own step and scales the loss by its
    accumulation count, so vlp's train.grad_clip goes into its config and train.grad_accum must
    be 1 (vlp's loop divides the loss itself).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum={grad_accum}: DeepSpeed runs need 1 (raise data.batch_size, "
            "or use configs/accelerate/ddp.yaml or fsdp.yaml for gradient accumulation)"
        )
    plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro_batch,
        train_batch_size=micro_batch * accelerator.num_processes,
        gradient_accumulation_steps=1,
        gradient_clipping=grad_clip,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's shard.

    All ranks must pass the same shape. Returns `x` itself when not distributed.
    """
    if not is_distributed():
        return x
    with warnings.catch_warnings():
        # deprecated in favour of a private API; it remains the public gather with gradient
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def ring_pass(x: Tensor) -> Tensor:
    """The `x` of rank r-1 (mod W), received on rank r; gradients travel back along the ring.

    One exchange: every rank sends to r+1 and receives from r-1 (send/recv, no all_gather),
    so W-1 calls hand every rank every other rank's block while each holds one at a time.
    All ranks must call it together with the same shape. Returns `x` when not distributed.
    """
    if not is_distributed():
        return x
    return _RingPass.apply(x)


class _RingPass(torch.autograd.Function):
    """y_r = x_{r-1}; so dL/dx_r = dL/dy_{r+1}: the backward passes the other way round."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _exchange(x, to=(rank() + 1) % world_size(), source=(rank() - 1) % world_size())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _exchange(grad, to=(rank() - 1) % world_size(), source=(rank() + 1) % world_size())


def _exchange(x: Tensor, to: int, source: int) -> Tensor:
    """Send `x` to rank `to` while receiving a tensor of its shape from rank `source`."""
    received = torch.empty_like(x)
    operations = [
        dist.P2POp(dist.isend, x.contiguous(), to),
        dist.P2POp(dist.irecv, received, source),
    ]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient (masks, counts)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_targets(num_local: int, device: torch.device | str) -> Tensor:
    """Row i of this rank's logits matches global column rank * num_local + i."""
    return torch.arange(num_local, device=device) + rank() * num_local


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (no gradient); `x` itself when not distributed."""
    if not is_distributed():
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` when not distributed."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def decided_on_rank0(decide: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Rank 0 runs `decide()` -> (kept, shared): `kept` stays on rank 0 (None elsewhere), and
    every rank gets `shared`, or the exception `decide` raised, by a broadcast, so a refusal
    reaches every rank and none is left waiting."""
    kept, shared = None, None
    if rank() == 0:
        try:
            kept, shared = decide()
        except Exception as err:  # raised on every rank, below
            shared = err
    shared = broadcast_object(shared)
    if isinstance(shared, Exception):
        raise shared
    return kept, shared


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate `x` [n_r, ...] from all ranks along dim 0 when n_r differs between ranks
    (no gradient); `x` itself when not distributed."""
    if not is_distributed():
        return x
    counts = [int(n) for n in all_gather_objects(x.shape[0])]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = gather(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def broadcast_tensors(tensors: dict[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    """Rank `src`'s tensors on every rank. Every rank passes tensors of the same names, shapes,
    dtypes and device (the other ranks' values are overwritten)."""
    if is_distributed():
        for tensor in tensors.values():
            dist.broadcast(tensor, src=src)
    return tensors


_cpu_group: Any = None


def max_over_ranks(value: int) -> int:
    """The largest `value` of any rank (a small int such as a flag or a signal number), reduced
    on CPU tensors so a GPU run does not wait for its device; `value` when not distributed."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX, group=_host_group())
    return int(total.item())


def _host_group():
    """A process group for CPU tensors: the default one when it runs gloo, else a gloo group
    over the same ranks (created on first use, which every rank reaches at the same point)."""
    global _cpu_group
    if "gloo" in str(dist.get_backend()):
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")
    return _cpu_group


def average_gradients(params: list[Tensor]) -> None:
    """Replace each parameter's gradient by its mean over ranks, in place (what DDP does; vlp's
    FSDP does it for the scalar parameters FSDP2 cannot shard)."""
    if not is_distributed():
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world_size())


def clip_grad_norm(sharded: list[Tensor], replicated: list[Tensor], max_norm: float) -> Tensor:
    """Scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the 2-norm over all of
    them, as torch.nn.utils.clip_grad_norm_ does; returns ‖g‖.

    `sharded`: this rank's local pieces of gradients split over ranks (their squares are summed
    over ranks); `replicated`: gradients every rank holds whole (counted once).
    """
    grads = [*sharded, *replicated]
    if not grads:
        return torch.zeros(())
    zero = torch.zeros((), dtype=torch.float32, device=grads[0].device)  # no host sync

    def squares(part: list[Tensor]) -> Tensor:
        return sum((g.detach().float().pow(2).sum() for g in part), zero)

    total = (all_reduce_sum(squares(sharded)) + squares(replicated)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """(model state, optimizer state) of a model sharded by FSDP2, gathered whole onto rank 0's
    CPU (empty dicts elsewhere); the optimizer state is keyed by parameter names. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )  # fmt: skip

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load whole states (as `full_state` returns them, read by every rank) into an FSDP2 model
    and its optimizer: each rank keeps its shards. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )
