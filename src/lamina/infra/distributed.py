"""Distributed training on torch.distributed: one process per device, launched by torchrun.

    torchrun --nproc_per_node 2 -m lamina pretrain --config run.yaml                  # DDP
    torchrun --nproc_per_node 2 -m lamina pretrain --config run.yaml --strategy fsdp  # FSDP (full shard)

`Distributed.from_env()` reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK and joins the process group (gloo on
CPU, nccl on CUDA); without them it is a single process and every collective is a no-op. `wrap()` applies
the strategy: DDP replicates the model and averages gradients; FSDP (FSDP2's `fully_shard`, the ZeRO-3
equivalent) shards parameters, gradients and optimizer state per block. `no_sync()` skips gradient
communication on the micro-steps of an accumulation that are not the last (nanoGPT's
`require_backward_grad_sync`, applied here for both strategies). Weights are gathered into one full state
dict on every rank for saving; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lamina.errors import InvalidRequestError

logger = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (an immutable default)
    strategy: Strategy = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, strategy: Strategy = "ddp", device: torch.device | None = None) -> Distributed:
        if strategy not in ("ddp", "fsdp"):
            raise InvalidRequestError(f"unknown strategy {strategy!r}; use ddp or fsdp", param="strategy")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device or torch.device("cpu"), strategy=strategy)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        logger.info("rank %d of %d on %s (%s)", rank, world, device, strategy)
        return cls(rank, world, local, device, strategy)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Inside: this backward adds to local gradients without communicating (when `skip`)."""
        if not (self.enabled and skip):
            yield
            return
        if self.strategy == "ddp":
            with model.no_sync():  # type: ignore[operator]
                yield
            return
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def mean(self, value: float) -> float:
        """The mean of a float across ranks (for logging the global loss)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded and on CPU (a collective: every rank must call it)."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))
        inner = model.module if hasattr(model, "module") else model
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full state (gathered under FSDP; rank 0 holds the result)."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return
        optimizer.load_state_dict(state)

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return
        inner = model.module if hasattr(model, "module") else model
        inner.load_state_dict(state)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()  # every rank done before the group goes (gloo aborts otherwise)
            dist.destroy_process_group()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Lamina model (each is one FSDP unit)."""
    for name in ("layers", "h"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    return []
