"""Process-group set-up and model wrapping for training.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) `init` joins
the process group: NCCL when the process has a GPU, gloo on CPU. Without those variables it is a
single process and nothing distributed is touched, so `echat train` runs the same code either way.
`wrap` applies DDP or FSDP (FSDP2's `fully_shard`, one unit per transformer block) and
`gradient_sync` turns gradient all-reduce off on accumulation micro-steps for both.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group if there is one; pick the device ("auto", "cpu", "cuda")."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device is cuda but torch sees no CUDA device")
    if not _under_torchrun():
        return DistContext(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"), None)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            # Binding NCCL to the device up front avoids a guessed device on the first collective.
            device_id=dev if backend == "nccl" else None,
        )
    return DistContext(rank, world_size, local_rank, dev, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op copy in a single process)."""
    out = values.detach().to(ctx.device if ctx.backend == "nccl" else "cpu", copy=True)
    if ctx.is_distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def wrap(
    model: nn.Module,
    ctx: DistContext,
    *,
    parallel: str = "ddp",
    find_unused_parameters: bool = True,
    bf16: bool = False,
    fsdp_units: list[nn.Module] | None = None,
) -> nn.Module:
    """The model to train: unchanged in one process, else DDP- or FSDP-wrapped.

    FSDP shards parameters, gradients and optimiser state over the ranks (needed to fully
    fine-tune the 3B model with AdamW on 80 GB cards); with bf16 it also keeps parameters in bf16
    for compute and reduces gradients in fp32.

    FSDP runs the same collectives on every rank, so a unit of its own (`fsdp_units`) must run in
    every forward on every rank: give the LLM's decoder layers, not the speech encoder (skipped by
    a batch without speech input) nor the speech head (unused by a text-only batch). Everything
    else is one root unit, gathered once per forward; so that its gradients are reduced with the
    same layout on every rank, each trainable root parameter is tied into the loss with weight 0
    (`_tie_root_parameters`): an unused one gets a zero gradient instead of none.
    """
    if not ctx.is_distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            model,
            device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        units = list(fsdp_units or [])
        in_units = {id(p) for unit in units for p in unit.parameters()}
        root_trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_units]
        for unit in units:
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        _tie_root_parameters(model, root_trainable)
        return model
    raise ValueError(f"unknown parallel strategy {parallel!r} (ddp or fsdp)")


def _tie_root_parameters(model: nn.Module, names: list[str]) -> None:
    """Add 0 * sum(p) of the named parameters to `output.loss` at the end of each training forward.

    The hook is prepended so it runs before FSDP's own post-forward hook, while the root unit's
    parameters are still gathered: `get_parameter` then returns the full tensors autograd sees.
    """
    if not names:
        return

    def hook(module: nn.Module, args, output):
        if not (module.training and torch.is_grad_enabled()) or getattr(output, "loss", None) is None:
            return output
        zero = sum(module.get_parameter(name).sum() for name in names) * 0.0
        output.loss = output.loss + zero.to(output.loss.dtype)
        return output

    model.register_forward_hook(hook, prepend=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so it is already that)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within this context, backward() all-reduces gradients only if `enabled`: off on the
    accumulation micro-steps, on for the last micro-batch before the optimiser step."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync") and not hasattr(model, "set_requires_gradient_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield  # single process: nothing to synchronise
