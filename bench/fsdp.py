"""Does distillation under FSDP train the same model as one process does?

`python bench/fsdp.py` launches the same KD run (a random Llama student distilled from a random
Llama teacher, the chunked KD loss, AdamW, clipping) as one process and as two processes with
FSDP on CPU (gloo), both through `accelerate launch --use_fsdp`, exactly as a user would, and
compares the per-step losses (the whole batch's, averaged over the processes) and the trained
weights. It also records the share of the student's and teacher's parameters each process held
while training, and the peak resident memory of the largest process of each run (`wait4`).
`bench/scale.py` records its figures under "fsdp"; a test runs it tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _shape(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab}  # fmt: skip


SIZES = {  # student, teacher
    "tiny": (_shape(64, 2, 4, 2, 128, 256), _shape(96, 3, 4, 2, 192, 256)),
    # a 6-layer student of a 12-layer teacher, both at the 0.1B Llama's width (32k vocabulary)
    "bench": (_shape(768, 6, 12, 4, 2048, 32000), _shape(768, 12, 12, 4, 2048, 32000)),
}


def _llama(shape: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=512))


def worker(size: str, steps: int, out: Path, crash_at: int | None = None) -> None:
    """One process of the run (under `accelerate launch`): train (checkpointing into `out` every
    2 steps; failing at step `crash_at` if given), then write what it saw."""
    import torch
    from safetensors.torch import save_file

    from compressor.data import Batches
    from compressor.kd import Knobs, kd_step
    from compressor.launch import join
    from compressor.sharding import local_fraction, sharded
    from compressor.train import train

    torch.set_num_threads(1)
    cpu = join(torch.device("cpu"))  # as a launched `compressor run` joins, before its models load
    student_shape, teacher_shape = SIZES[size]
    student, teacher = _llama(student_shape, 0), _llama(teacher_shape, 1).eval()
    rows = torch.randint(0, student_shape["vocab_size"], (64, 64), generator=torch.Generator().manual_seed(2))
    knobs = Knobs(steps=steps, batch_size=8, lr=3e-3, warmup=0.1, checkpoint_every=2)
    seen: list[torch.Tensor] = []
    with sharded([student, teacher], cpu) as (s, t):
        step = kd_step(t, knobs, 0, None)

        def recorded(model, batch, i):
            if i == crash_at:
                raise RuntimeError(f"killed at step {i}")
            loss, logs = step(model, batch, i)
            seen.append(loss.detach().clone())
            return loss, logs

        held = {"student": local_fraction(s), "teacher": local_fraction(t)}
        batches = Batches(rows, knobs.batch_size, 0)
        train(s, recorded, batches, knobs, device=cpu, seed=0, description="fsdp check", checkpoint_dir=out)
    losses = torch.stack(seen)
    if torch.distributed.is_initialized():  # each process saw half the batch: the batch's loss is the mean
        torch.distributed.all_reduce(losses)
        losses /= torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    if rank == 0:
        save_file(
            {k: v.contiguous() for k, v in student.state_dict().items() if k != "lm_head.weight"},
            out / "student.safetensors",
        )
        (out / "result.json").write_text(json.dumps({"losses": losses.tolist(), "held": held}))


def launch(processes: int, size: str, steps: int, out: Path, crash_at: int | None = None) -> dict | None:
    """Run the worker under `accelerate launch` (FSDP when processes > 1); return its result
    (None when it was told to crash and did)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--use_fsdp"] if processes > 1 else ["--cpu"]
    command += ["--main_process_port", str(29500 + os.getpid() % 1000 + processes), __file__]
    command += ["--worker", "--size", size, "--steps", str(steps), "--out", str(out)]
    command += ["--crash-at", str(crash_at)] if crash_at is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # its peak: the largest of it and the workers it reaped
        log.seek(0)
        stderr = log.read()
    failed = os.waitstatus_to_exitcode(status) != 0
    if failed and crash_at is not None and f"killed at step {crash_at}" in stderr:
        return None
    if failed:
        raise RuntimeError(f"{processes}-process run failed:\n{stderr[-3000:]}")
    return {**json.loads((out / "result.json").read_text()), "peak_mb": usage.ru_maxrss / 1024}


def compare(size: str = "bench", steps: int = 8, folder: Path | None = None) -> dict:
    """One process against two under FSDP: the largest relative loss and weight differences. The
    runs are left in `folder/one` and `folder/two` when it is given."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        where = folder or Path(tmp)
        one, two = launch(1, size, steps, where / "one"), launch(2, size, steps, where / "two")
        w1, w2 = (load_file(str(where / run / "student.safetensors")) for run in ("one", "two"))
    rel = [abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"])]
    weight_rel = max(((w1[k] - w2[k]).norm() / w1[k].norm()).item() for k in w1)
    return {
        "processes": 2,
        "backend": "gloo, CPU",
        "steps": steps,
        "losses_one_process": [round(x, 6) for x in one["losses"]],
        "losses_two_processes": [round(x, 6) for x in two["losses"]],
        "max_rel_loss_diff": max(rel),
        "max_rel_weight_diff": weight_rel,
        "peak_mb_one_process": one["peak_mb"],
        "peak_mb_each_of_two": two["peak_mb"],
        "params_per_process_fraction": two["held"]["student"],
        "teacher_params_per_process_fraction": two["held"]["teacher"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="bench")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--crash-at", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.size, args.steps, args.out, args.crash_at)
        return
    print(json.dumps(compare(args.size, args.steps), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
