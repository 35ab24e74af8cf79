"""The distillation lab on a real model: SmolLM2-135M-Instruct as teacher, a half-depth student
made from it (the 15 of its 30 layers with the highest block influence, ShortGPT's 1 - cos(in,
out) on calibration text), trained by cross-entropy alone and by KD at equal steps, batches and
data; WikiText-2 test perplexity of each.

    python bench/smollm2_lab.py [--train tinystories|wikitext2] [--steps 40] [--batch 4] [--seq 512]
                                [--blocks 32] [--alpha 1.0]

The students are scored on the first `--blocks` blocks of WikiText-2 test (token perplexity, each
block scored from its first token). They train, by default, on text unlike it (TinyStories), as
the reference lab's students trained on OpenWebText and were scored on WikiText-2: what is
measured is what each loss carries beyond the training text. `--train wikitext2` trains on
WikiText-2 valid instead, the scored text's own tokenization (`<unk>`, ` @-@ `, a space before
every comma), which labels teach directly and the teacher does not know; that in-domain run is
written to reports/smollm2_lab_in_domain.{json,md}. All of it goes
through the pipeline (`prune` of half the layers, then `recover` with `teacher: none` vs from the
original teacher, forward KL, T = 1, `--alpha` of the loss on KD), so it resumes and caches like
any recipe. Layers evenly spaced instead (the reference lab's choice) start at a perplexity
near 10^6, ~50x worse; that figure is measured beside. The reference lab this mirrors:
gpt2-medium 24.87, distilgpt2 46.13 before and 36.41 after KD.
Writes reports/smollm2_lab.json ({teacher_ppl, student_init_ppl, ce_ppl, kd_ppl, steps, tokens,
seconds, ...}) and reports/smollm2_lab.md.

A third student trains by the same KD from the teacher-logit cache (`teacher_cache: {k:
--cache-k}`): the teacher's top-k/2 log-probabilities and k/2 tokens drawn from its tail, of
every row the training visits, captured once, then no teacher forward in any step; its
perplexity against the live KD student's, the cache's bytes per token and capture seconds are
reported. A fourth, from a cache of the top k with the tail as one bucket (`tail_samples: 0`),
shows what the draws are worth.

The KD/CE step ratio is measured twice: over the two trainings (each stage's own clock), and side
by side after them, `--timing-rounds` rounds of one CE step, one KD step and the teacher's forward
alone on the same batch, interleaved. The teacher's forward (its blocks, then its head on every
token) over the CE step is the floor no loss code goes under.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from _reports import SHARED, load_average, prepare, save

STUDENTS = ("ce", "kd", "kd_cache", "kd_cache_bucket")
TRAIN_TEXTS = {  # name -> (file under ../shared/data, what the report calls it, report name)
    "tinystories": ("tinystories/tinystories_val.txt", "TinyStories (validation, first 800 KB)", "smollm2_lab"),
    "wikitext2": ("wikitext2/wt2_tokens.valid.txt", "WikiText-2 valid", "smollm2_lab_in_domain"),
}


def step_timing(teacher, student, batch, loss: dict, lr: float, rounds: int, cache_k: int, tmp: Path) -> dict:
    """Seconds of a CE optimiser step, a KD step (teacher forward included), a KD step from the
    teacher-logit cache and the teacher's forward alone, interleaved on one batch; the student is
    a copy, its updates thrown away."""
    import torch

    from compressor.kd import Knobs, ce_only, kd_step
    from compressor.losses import Workspace, head_logits
    from compressor.teacher_cache import TeacherCache, capture

    student = copy.deepcopy(student).float().train().requires_grad_(True)
    knobs = Knobs(loss=loss, lr=lr)
    rows = list(range(len(batch)))
    captured, _ = capture(teacher, batch, rows, TeacherCache(k=cache_k), loss["temperature"], tmp)
    cached = {"input_ids": batch, **captured.take(rows)}
    steps = {
        "ce": kd_step(None, ce_only(knobs), 0, None),
        "kd": kd_step(teacher, knobs, 0, None),
        "kd_cache": kd_step(None, knobs, 0, None),
    }
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95))
    head, ws = teacher.get_output_embeddings(), Workspace()
    chunk = knobs.loss.chunk_tokens

    def optimiser_step(kind: str) -> None:
        loss_value, _ = steps[kind](student, cached if kind == "kd_cache" else {"input_ids": batch}, 0)
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward() -> None:
        with torch.no_grad():
            h = teacher(input_ids=batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1].flatten(0, 1)
            for start in range(0, h.shape[0], chunk):
                rows = h[start : start + chunk]
                out = ws.take("t", (rows.shape[0], head.weight.shape[0]), h.device)
                head_logits(rows, head.weight, getattr(head, "bias", None), out)

    runs = {kind: lambda kind=kind: optimiser_step(kind) for kind in steps} | {"teacher_forward": teacher_forward}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # a warm-up round, not timed
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(round(time.perf_counter() - start, 3))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "rounds": rounds,
        "seconds": seconds,
        "kd_over_ce": med["kd"] / med["ce"],
        "kd_over_ce_range": [
            min(k / c for k, c in zip(seconds["kd"], seconds["ce"])),
            max(k / c for k, c in zip(seconds["kd"], seconds["ce"])),
        ],
        "floor": (med["ce"] + med["teacher_forward"]) / med["ce"],
        "kd_cache_over_ce": med["kd_cache"] / med["ce"],
        "kd_cache_over_ce_range": [
            min(k / c for k, c in zip(seconds["kd_cache"], seconds["ce"])),
            max(k / c for k, c in zip(seconds["kd_cache"], seconds["ce"])),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", choices=sorted(TRAIN_TEXTS), default="tinystories", help="the students' training text")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--blocks", type=int, default=32, help="WikiText-2 test blocks scored")
    p.add_argument("--lr", type=float, default=2.0e-4)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KD term (the rest CE on labels)")
    p.add_argument("--timing-rounds", type=int, default=5, help="interleaved CE/KD/teacher rounds timed after")
    p.add_argument("--cache-k", type=int, default=64, help="teacher tokens per position in the teacher-logit cache")
    args = p.parse_args()
    prepare()
    import torch
    import yaml

    from compressor.compare import compare, plan
    from compressor.measure import token_perplexity
    from compressor.models import evenly_spaced, keep_layers
    from compressor.pipeline import Session
    from compressor.storage import Store

    train_file, train_name, report = TRAIN_TEXTS[args.train]
    train = {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup": 0.1, "checkpoint_every": 10}
    kd_loss = {"divergence": "forward_kl", "temperature": 1.0, "alpha": args.alpha}
    bucket = {"k": args.cache_k, "tail_samples": 0}  # the top k and the tail as one bucket
    recipe = {
        "name": "smollm2-lab",
        "seed": 0,
        "teacher": "gguf:smollm2-135m-instruct",
        "data": {
            "train": str(SHARED / train_file),
            "heldout": str(SHARED / "wikitext2" / "wt2_tokens.test.txt"),
            "seq_len": args.seq,
        },
        "stages": [
            {"name": "half", "prune": {"targets": {"layers": 0.5}, "calibration": {"samples": 32, "batch_size": 4}}},
            {"name": "ce", "recover": {"teacher": "none", **train}},
            {"name": "kd", "recover": {"teacher": "original", "loss": kd_loss, **train}},
            {"name": "kd_cache", "recover": {"loss": kd_loss, "teacher_cache": {"k": args.cache_k}, **train}},
            {"name": "kd_cache_bucket", "recover": {"loss": kd_loss, "teacher_cache": bucket, **train}},
        ],
        "orderings": {name: ["half", name] for name in STUDENTS},
        "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": args.blocks, "batch_size": 4}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lab.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        variants = plan([str(path)])
        record = compare(variants, Path(tmp) / "runs", Store())
        session = Session(variants[0][1], Store())
        teacher = session.teacher.model
        heldout = session.heldout()[: args.blocks]
        with torch.no_grad():
            evenly = keep_layers(teacher, evenly_spaced(teacher.config.num_hidden_layers, 15))
            evenly_ppl = token_perplexity(evenly, heldout, batch_size=4)
        half = next(s for s in record["stages"] if s["name"] == "half")
        timing = step_timing(
            teacher,
            keep_layers(teacher, half["info"]["kept_layers"]),
            session.heldout()[: args.batch],
            kd_loss,
            args.lr,
            args.timing_rounds,
            args.cache_k,
            Path(tmp) / "timing-cache",
        )
    rows = {s["ordering"]: s for s in record["stages"] if s["name"] in STUDENTS}
    ce, kd, kd_cache = rows["ce"]["info"], rows["kd"]["info"], rows["kd_cache"]["info"]
    out = {
        "teacher_ppl": record["stages"][0]["metrics"]["heldout_ppl"],
        "student_init_ppl": half["metrics"]["heldout_ppl"],
        "student_init_ppl_evenly_spaced": evenly_ppl,
        "student_layers": half["info"].get("kept_layers"),
        "ce_ppl": rows["ce"]["metrics"]["heldout_ppl"],
        "kd_ppl": rows["kd"]["metrics"]["heldout_ppl"],
        "train_text": train_name,
        "steps": args.steps,
        "tokens": args.steps * args.batch * args.seq,
        # a resumed run times the steps since its checkpoint only
        "ce_seconds_per_step": ce["train_seconds"] / (args.steps - ce.get("resumed_at", 0)),
        "kd_seconds_per_step": kd["train_seconds"] / (args.steps - kd.get("resumed_at", 0)),
        "kd_cache_ppl": rows["kd_cache"]["metrics"]["heldout_ppl"],
        "kd_cache_seconds_per_step": kd_cache["train_seconds"] / (args.steps - kd_cache.get("resumed_at", 0)),
        "cache": kd_cache["teacher_cache"],
        "kd_cache_bucket_ppl": rows["kd_cache_bucket"]["metrics"]["heldout_ppl"],
        "steps_timed": {n: args.steps - rows[n]["info"].get("resumed_at", 0) for n in ("ce", "kd", "kd_cache")},
        "teacher_params": record["stages"][0]["metrics"]["params"],
        "student_params": rows["kd"]["metrics"]["params"],
        "heldout_tokens": rows["kd"]["metrics"]["heldout_tokens"],
        "lr": args.lr,
        "kd_alpha": args.alpha,
        "step_timing": timing,
    }
    out["load_average"] = load_average()
    per_step = out["ce_seconds_per_step"] + out["kd_seconds_per_step"] + out["kd_cache_seconds_per_step"]
    out["seconds"] = round(args.steps * per_step, 1)  # the three trainings
    out["kd_vs_ce"] = out["kd_ppl"] / out["ce_ppl"] - 1
    out["kd_step_over_ce_step"] = out["kd_seconds_per_step"] / out["ce_seconds_per_step"]
    out["kd_cache_step_over_ce_step"] = out["kd_cache_seconds_per_step"] / out["ce_seconds_per_step"]
    out["kd_cache_vs_kd"] = out["kd_cache_ppl"] / out["kd_ppl"] - 1
    out["kd_cache_bucket_vs_kd"] = out["kd_cache_bucket_ppl"] / out["kd_ppl"] - 1
    drawn = out["cache"]["tail_samples"]
    lines = [
        "# Distillation lab on SmolLM2-135M",
        "",
        f"Regenerate: `python bench/smollm2_lab.py --train {args.train} --steps {args.steps} --alpha {args.alpha:g}` "
        "(2 CPU threads). "
        f"Student: the 15 of the teacher's 30 layers with the highest block influence, {out['student_layers']} "
        f"({out['student_params']:,} of {out['teacher_params']:,} parameters); "
        f"{args.steps} steps × {args.batch} × {args.seq} tokens of {train_name} = {out['tokens']:,} tokens for "
        f"each student, same batches; token perplexity on {out['heldout_tokens']:,} tokens of WikiText-2 test.",
        "",
        "| model | WikiText-2 test ppl |",
        "|---|---|",
        f"| teacher (SmolLM2-135M-Instruct, Q4_1 release dequantized) | {out['teacher_ppl']:.2f} |",
        f"| half-depth student, before training | {out['student_init_ppl']:.1f} |",
        f"| (15 evenly spaced layers instead, before training) | {out['student_init_ppl_evenly_spaced']:.1f} |",
        f"| student, cross-entropy only | {out['ce_ppl']:.2f} |",
        f"| student, KD (forward KL, T = 1, weight {args.alpha:g}; CE on labels {1 - args.alpha:g}) | "
        f"{out['kd_ppl']:.2f} ({100 * out['kd_vs_ce']:+.1f}% vs CE) |",
        f"| student, the same KD from the teacher-logit cache (top-{args.cache_k - drawn} and {drawn} drawn from "
        f"the tail) | {out['kd_cache_ppl']:.2f} ({100 * out['kd_cache_vs_kd']:+.1f}% vs live KD) |",
        f"| student, the same KD from a cache of the top-{args.cache_k} and the tail as one bucket | "
        f"{out['kd_cache_bucket_ppl']:.2f} ({100 * out['kd_cache_bucket_vs_kd']:+.1f}% vs live KD) |",
        "",
        f"The cache: {out['cache']['bytes_per_token']:.0f} bytes per token; {out['cache']['captured_rows']} of the "
        f"{out['cache']['rows']} rows the training visits captured in {out['cache']['capture_seconds']:.0f} s (the "
        "teacher's forwards of the whole training, once; the rest were in the cache already); its "
        f"training steps ran no teacher forward: {out['kd_cache_seconds_per_step']:.1f} s per step "
        f"({out['kd_cache_step_over_ce_step']:.2f}× the CE step).",
        "",
        f"KD step {out['kd_seconds_per_step']:.1f} s vs CE step {out['ce_seconds_per_step']:.1f} s "
        f"({out['kd_step_over_ce_step']:.2f}×, the teacher's forward included; timed over the last "
        f"{out['steps_timed']['ce']} CE and {out['steps_timed']['kd']} KD steps, a resumed run timing only what "
        f"it ran; load average {out['load_average'][0]} at the end).",
        "",
        f"Side by side after the trainings ({timing['rounds']} interleaved rounds on one batch of "
        f"{args.batch} × {args.seq} tokens, medians): CE step {statistics.median(timing['seconds']['ce']):.1f} s, "
        f"KD step {statistics.median(timing['seconds']['kd']):.1f} s, the teacher's forward alone "
        f"{statistics.median(timing['seconds']['teacher_forward']):.1f} s: KD/CE {timing['kd_over_ce']:.2f}× "
        f"(rounds {timing['kd_over_ce_range'][0]:.2f}–{timing['kd_over_ce_range'][1]:.2f}×); the teacher's forward "
        f"alone puts the floor at {timing['floor']:.2f}× (CE step + teacher forward, over CE step). "
        f"A KD step from the cache: {statistics.median(timing['seconds']['kd_cache']):.1f} s, "
        f"{timing['kd_cache_over_ce']:.2f}× the CE step (rounds {timing['kd_cache_over_ce_range'][0]:.2f}–"
        f"{timing['kd_cache_over_ce_range'][1]:.2f}×).",
    ]
    save(report, out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
