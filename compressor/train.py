"""The one training loop: built-in teacher, distill, recover and QAT all run through it.

It runs on `accelerate`, so `accelerate launch -m compressor run ...` trains on several GPUs
unchanged; on one CPU it is a plain loop. It checkpoints every `checkpoint_every` steps into a
folder that survives a crash, and since batch `i` and the sampling seed of step `i` depend only
on (seed, i), a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, load_model, save_file, save_model

from . import UserError
from .progress import Bar, checkpointed, say
from .seeds import step_seed
from .sharding import accelerate_fsdp_hidden, is_sharded
from .storage import atomic_dir, read_json, write_json


class TrainConfig(BaseModel):
    """Optimisation settings shared by every training stage."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps with linear warm-up")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine",
        description="cosine decay, or warmup-stable-decay "
        "(constant lr, then linear decay over the last `decay` fraction)",
    )
    decay: float = Field(0.3, gt=0, le=1, description="wsd: fraction of steps spent decaying")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the decay ends at lr x this")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1, description="steps between crash-safe checkpoints")
    precision: Literal["auto", "fp32", "bf16"] = "auto"


# The loss sees the model, a batch ({"input_ids": [B, L], optionally "labels": [B, L]}) and the
# optimiser step; it returns the loss and numbers to show beside it.
Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch, int], tuple[torch.Tensor, dict[str, float]]]


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = int(cfg.warmup * cfg.steps)

    stable_until = int((1 - cfg.decay) * cfg.steps)

    def at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "wsd":
            if step < stable_until:
                return 1.0
            progress = (step - stable_until) / max(1, cfg.steps - stable_until)
            return 1 - (1 - cfg.min_lr_ratio) * min(progress, 1.0)
        progress = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return at


def _accelerator(cfg: TrainConfig, device: torch.device):
    from accelerate import Accelerator

    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if bf16 and device.type != "cuda":
        bf16 = False  # bf16 autocast on CPU is slower than fp32 and changes results
    with accelerate_fsdp_hidden():
        return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")


def _holder(model, extra: torch.nn.Module | None) -> torch.nn.Module:
    """What a sharded checkpoint holds: the model and the loss's own trainable module, as one."""
    return torch.nn.ModuleDict({"model": model, **({"extra": extra} if extra is not None else {})})


def _save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, extra, *, sharded: bool, main: bool) -> None:
    """Every process calls this (a sharded state is gathered collectively); the main one writes."""
    if sharded:  # gathered whole, onto the main process
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(_holder(model, extra), optimizer, options=whole)
    if not main:
        return
    with atomic_dir(folder) as tmp:
        if sharded:
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
            optim_state = optimizer.state_dict()
            if extra is not None:
                save_model(extra, str(tmp / "extra.safetensors"))
        # serialized in memory first: on a full disk the write below fails with ENOSPC (one line from
        # the CLI), where torch's zip writer raises an opaque "unexpected pos" RuntimeError
        buffer = io.BytesIO()
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, buffer)
        (tmp / "optim.pt").write_bytes(buffer.getvalue())
        write_json(tmp / "progress.json", {"step": step, "sharded": sharded})


def _load_checkpoint(folder: Path, model, optimizer, scheduler, extra, *, sharded: bool) -> int:
    progress = read_json(folder / "progress.json")
    if progress.get("sharded", False) != sharded:
        was = "with" if progress.get("sharded") else "without"
        raise UserError(f"{folder}: this checkpoint was written {was} FSDP; resume it the same way or delete it")
    state = torch.load(folder / "optim.pt", weights_only=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            _holder(model, extra),
            optimizer,
            model_state_dict=load_file(str(folder / "model.safetensors")),
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        load_model(model, str(folder / "model.safetensors"))
        if extra is not None:
            load_model(extra, str(folder / "extra.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(progress["step"])


def _average(tensors, world: int) -> None:
    """Average gradients over the processes (for modules that neither DDP nor FSDP wraps)."""
    for t in tensors:
        torch.distributed.all_reduce(t)
        t /= world


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Callable[[int], Batch],
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    description: str,
    checkpoint_dir: Path | None = None,
    extra_module: torch.nn.Module | None = None,
) -> dict:
    """Train `model` in place for cfg.steps optimiser steps; return a summary.

    `extra_module` holds trainable parameters that belong to the loss (e.g. the projection of
    hidden-state distillation); they are optimised and checkpointed with the model.
    """
    accelerator = _accelerator(cfg, device)
    sharded = is_sharded(model)  # FSDP replicas (compressor.sharding) sit on their device already
    model.to(accelerator.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    extra_params = []
    if extra_module is not None:
        extra_module.to(accelerator.device)
        extra_params = list(extra_module.parameters())
    optimizer = torch.optim.AdamW(params + extra_params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes

    start_step = 0
    ckpt = checkpoint_dir / "checkpoint" if checkpoint_dir else None
    if ckpt is not None and (ckpt / "progress.json").is_file():
        start_step = _load_checkpoint(ckpt, raw_model, optimizer, scheduler, extra_module, sharded=sharded)
        checkpointed(start_step, cfg.steps)
        say(f"{description}: resuming from the checkpoint at step {start_step}/{cfg.steps}")

    losses: list[float] = []
    begin = time.time()
    with Bar(description, cfg.steps) as bar:
        if start_step:
            bar.update(start_step)
        for step in range(start_step, cfg.steps):
            logs: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                micro_batch = batches(step * cfg.grad_accum + micro)
                batch = {k: v[rank::world].to(accelerator.device) for k, v in micro_batch.items()}
                torch.manual_seed(step_seed(seed, step * cfg.grad_accum + micro))  # on-policy sampling
                with accelerator.autocast():
                    loss, logs = loss_fn(model, batch, step)
                if not torch.isfinite(loss):
                    raise UserError(
                        f"{description}: loss became {loss.item()} at step {step}; lower lr "
                        f"(now {scheduler.get_last_lr()[0]:.2g}) or check the data",
                        code=1,
                    )
                accelerator.backward(loss / cfg.grad_accum)
            if world > 1 and extra_params:
                _average([p.grad for p in extra_params if p.grad is not None], world)
            accelerator.clip_grad_norm_(params + extra_params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # the loss of the whole batch: each process saw 1/world of it
            shown = accelerator.reduce(loss.detach(), "mean").item() if world > 1 else loss.item()
            losses.append(shown)
            bar.update(1, loss=shown, **{k: v for k, v in logs.items() if k != "loss"})
            done = step + 1
            if ckpt is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                main = accelerator.is_main_process
                _save_checkpoint(ckpt, done, raw_model, optimizer, scheduler, extra_module, sharded=sharded, main=main)
                if main:
                    checkpointed(done, cfg.steps)
    raw_model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": cfg.steps,
        "resumed_at": start_step,
        "first_loss": losses[0] if losses else None,  # the start's, when not resumed: did training help?
        "final_loss": sum(tail) / len(tail) if tail else None,
        "train_seconds": round(time.time() - begin, 2),
    }
