"""FSDP for the training loop, so a distillation holds about 1/N of its models per process.

Under `accelerate launch --num_processes N --use_fsdp` (GPUs, or CPUs with gloo) the student and
the teacher are trained as sharded replicas: PyTorch's `fully_shard` (FSDP2) on each decoder
layer and on the whole model, whose root keeps its parameters gathered from forward to backward,
so the chunked KD loss reads the output head as it does without sharding. The replica is built
on the meta device (no second copy), filled from the model, and the model's own tensors are
released while it trains; afterwards the trained weights are gathered back into the same
parameter objects (tied weights stay tied), so the stages around training never see FSDP.
We shard ourselves rather than through `accelerator.prepare` because accelerate offers FSDP on
GPUs only: one code path, the one the CPU tests run.
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from .launch import join, world
from .models import decoder_layers


def requested() -> bool:
    """True under `accelerate launch --use_fsdp` (or an accelerate config with FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextmanager
def accelerate_fsdp_hidden() -> Iterator[None]:
    """Build an `Accelerator` as a plain multi-process one: the FSDP is ours, and accelerate's
    own refuses CPUs."""
    flag = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ["ACCELERATE_USE_FSDP"] = flag


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _meta_replica(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device; buffers are copied as they are."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    replica = _meta_replica(model)
    for layer in decoder_layers(replica):
        fully_shard(layer)
    fully_shard(replica)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    replica.to_empty(device=device)
    set_model_state_dict(replica, model.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False))
    for name, value in buffers.items():
        replica.get_buffer(name).copy_(value)
    for p in model.parameters():  # released: the replica holds this process's shard
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return replica.train(model.training)


def _gather(replica: torch.nn.Module, into: torch.nn.Module) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(replica, options=StateDictOptions(full_state_dict=True))
    for name, p in into.named_parameters():
        p.data = full[name].to(p.dtype)


def local_fraction(model: torch.nn.Module) -> float:
    """The share of `model`'s parameters this process holds."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held / max(total, 1)


@contextmanager
def sharded(models: list[torch.nn.Module | None], device: torch.device) -> Iterator[list[torch.nn.Module | None]]:
    """Yield FSDP replicas of `models` (None stays None) when FSDP is requested across several
    processes, else the models themselves; on a normal exit the replicas' weights go back into
    the models."""
    if not requested() or world() == 1:
        yield models
        return
    device = join(device)
    # our outputs are views (logits_to_keep, hidden_states) that nothing modifies in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    replicas = [None if m is None else _shard(m, device) for m in models]
    yield replicas
    for model, replica in zip(models, replicas):
        if model is not None:
            _gather(replica, into=model)
