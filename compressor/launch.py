"""Several processes under `accelerate launch`: the first runs the recipe, the others follow.

Only training spans processes (DDP, or FSDP with `--use_fsdp`: compressor.sharding). The main
process does everything else, as in a one-process run: it measures, writes the store and the
report. Before each stage it builds it tells the others which one; they load the same input,
build the stage beside it up to the end of its training (where they meet) and stop there,
writing nothing; stages that do not train run in the main process alone. So a launched run
leaves exactly what a one-process run leaves.
"""

from __future__ import annotations

import os
from datetime import timedelta

# Followers wait, without a collective, while the main process measures a stage (lm-eval on a
# large model takes hours): the process group's default 30 minutes would end the run.
WAIT = timedelta(hours=24)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def join(device):
    """Join the launch's process group (when launched); return the device this process trains on."""
    if world() == 1:
        return device
    from accelerate import PartialState

    from .heap import map_large_blocks

    map_large_blocks()  # before the models load: what FSDP gathers and frees would otherwise stay resident
    state = PartialState(cpu=device.type == "cpu", timeout=WAIT)
    return device if device.type == "cpu" else state.device


class Trained(Exception):
    """Raised in a follower when a stage's training is over: the rest is the main process's."""


def _broadcast(message):
    import torch

    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def tell(order: tuple | None) -> None:
    """Main process: the stage the followers build next (stage index, key, input key), or None
    when the run is over."""
    if world() > 1:
        _broadcast(order)


def orders():
    """Follower: the stages the main process builds, in order, until it says the run is over."""
    while (order := _broadcast(None)) is not None:
        yield order
