"""Peak memory and time of the KD loss: naive (whole logits) vs chunked over tokens.

    python bench/kd_loss_memory.py [--vocab 32000 --seq 2048 --batch 4 --hidden 512 --chunk 1024]

Each variant runs in a fresh process (so one's allocations cannot hide the other's peak) on
the same seeded inputs; we report the loss's own peak above the inputs (CPU: process RSS
sampled every 2 ms; CUDA: max allocated), its time, and the largest gradient difference.
Writes reports/kd_loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _reports import save


def one(variant: str, args, out: Path) -> None:
    from safetensors.torch import save_file

    from compressor.latency import PeakRSS
    from compressor.losses import LossConfig, kd_loss, kd_loss_naive, shift_labels

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    hs = (torch.randn(args.batch, args.seq, args.hidden, generator=g) * 0.5).to(device).requires_grad_(True)
    ht = (torch.randn(args.batch, args.seq, args.hidden, generator=g) * 0.5).to(device)
    head_s = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device)
    head_t = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device)
    with torch.no_grad():
        head_s.weight.copy_(torch.randn(args.vocab, args.hidden, generator=g) * 0.05)
        head_t.weight.copy_(torch.randn(args.vocab, args.hidden, generator=g) * 0.05)
    labels = shift_labels(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)).to(device)
    cfg = LossConfig(divergence="forward_kl", temperature=2.0, alpha=0.5, chunk_tokens=args.chunk)

    def step():
        if variant == "naive":
            loss = kd_loss_naive(head_s(hs), head_t(ht).detach(), labels, cfg)
        else:
            loss = kd_loss(hs, head_s, ht, head_t, labels, cfg)
        loss.backward()
        return loss

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as rss:
            base = rss.peak
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
        peak = rss.peak - base
    save_file({"hs": hs.grad.cpu(), "w": head_s.weight.grad.cpu()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps({"peak_bytes": peak, "seconds": seconds, "loss": loss.item(), "device": str(device)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=["naive", "chunked"])
    p.add_argument("--out")
    args = p.parse_args()
    if args.variant:
        one(args.variant, args, Path(args.out))
        return

    from safetensors.torch import load_file

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked"):
            out = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--out", str(out)]
            cmd += [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "out")]
            subprocess.run(cmd, check=True)
            results[variant] = json.loads(out.read_text())
            results[variant]["grads"] = load_file(str(out.with_suffix(".safetensors")))
    diff = max((results["naive"]["grads"][k] - results["chunked"]["grads"][k]).abs().max().item() for k in ("hs", "w"))
    report = {
        "device": results["naive"]["device"],
        "shape": {
            "batch": args.batch,
            "seq": args.seq,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "chunk": args.chunk,
        },
        "threads": args.threads,
        "naive_peak_bytes": results["naive"]["peak_bytes"],
        "chunked_peak_bytes": results["chunked"]["peak_bytes"],
        "ratio": results["naive"]["peak_bytes"] / max(1, results["chunked"]["peak_bytes"]),
        "naive_seconds": results["naive"]["seconds"],
        "chunked_seconds": results["chunked"]["seconds"],
        "time_ratio": results["chunked"]["seconds"] / results["naive"]["seconds"],
        "loss_diff": abs(results["naive"]["loss"] - results["chunked"]["loss"]),
        "max_grad_diff": diff,
    }
    written = save("kd_loss_memory", report)
    gib = 2**30
    print(f"KD loss, batch {args.batch} x seq {args.seq} x vocab {args.vocab} on {report['device']}:")
    print(f"  naive   peak {report['naive_peak_bytes'] / gib:6.2f} GiB  {report['naive_seconds']:6.2f} s")
    print(f"  chunked peak {report['chunked_peak_bytes'] / gib:6.2f} GiB  {report['chunked_seconds']:6.2f} s")
    print(
        f"  memory ratio {report['ratio']:.1f}x, time ratio {report['time_ratio']:.2f}x, "
        f"max grad diff {diff:.2e} -> {written}"
    )


if __name__ == "__main__":
    main()
