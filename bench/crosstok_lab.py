"""Distillation across tokenizers, measured: the SmolLM2 lab's half-depth student (the 15 of
SmolLM2-135M's 30 layers with the highest block influence) trained at equal steps, batches and
text (TinyStories) by

  ce                  cross-entropy alone
  kd_same_tokenizer   KD from SmolLM2-135M itself (forward KL, the same vocabulary)
  seq_kd              sequence-level KD: cross-entropy on Gemma 3 270M's continuations of
                      prompts cut from the text (its own tokenizer; the text re-tokenized)
  seq_kd_hybrid       the hybrid logit KD below on those continuations (the teacher's text and
                      its distribution)
  kd_uld, kd_hybrid, kd_mapped
                      logit KD from Gemma 3 270M across tokenizers (compressor.crosstok)
  <name>_cache        each logit-KD student again, from the teacher-logit cache (SmolLM2's: its
                      top k/2 and k/2 draws from the tail, the default; Gemma 3's across
                      tokenizers: its top k and the tail as one bucket)
  kd_same_tokenizer_cache_bucket
                      SmolLM2's cache with the top k and the tail as one bucket (what the
                      draws replace)

and scored by token perplexity on WikiText-2 test (SmolLM2's tokens: every student has them).

    python bench/crosstok_lab.py [--steps 40] [--batch 4] [--seq 256] [--blocks 32] [--alpha 0.5]

All of it runs through the pipeline (two recipes: Gemma 3 as teacher with SmolLM2 as `base`,
and SmolLM2 as its own teacher), so it resumes and caches like any recipe. Writes
reports/crosstok_lab.json ({"students": {name: {ppl, steps, tokens, step_seconds}},
"teacher_ppl": {...}, "cache": {k, bytes_per_token, capture_seconds}, ...}) and
reports/crosstok_lab.md. The teachers' perplexities count each one's own tokens: Gemma 3's is not
comparable with SmolLM2's or the students'.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _reports import SHARED, load_average, prepare, save

LOSSES = ("uld", "hybrid", "mapped")


def recipes(args) -> tuple[dict, dict]:
    """(Gemma 3 teaching a SmolLM2 student, SmolLM2 teaching itself)."""
    train = {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup": 0.1, "checkpoint_every": 10}
    kd = {"divergence": "forward_kl", "temperature": 1.0, "alpha": args.alpha}
    cache = {"k": args.k}
    half = {"name": "half", "prune": {"targets": {"layers": 0.5}, "calibration": {"samples": 32, "batch_size": 4}}}
    common = {
        "seed": 0,
        "data": {
            "train": str(SHARED / "tinystories" / "tinystories_val.txt"),
            "heldout": str(SHARED / "wikitext2" / "wt2_tokens.test.txt"),
            "seq_len": args.seq,
        },
        "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": args.blocks, "batch_size": 4}},
    }
    cross = [half, {"name": "ce", "recover": {"teacher": "none", **train}}]
    for loss in LOSSES:
        crossing = {"loss": kd, "cross_tokenizer": {"loss": loss, "top_k": args.k}, **train}
        cross.append({"name": f"kd_{loss}", "recover": crossing})
        cross.append({"name": f"kd_{loss}_cache", "recover": {**crossing, "teacher_cache": cache}})
    # Gemma 3's continuations as the text: cross-entropy alone (seq_kd), and with the hybrid loss on them
    sequences = {"prompts": args.prompts, "prompt_tokens": 16, "new_tokens": args.seq - 16, "batch_size": 4}
    on_answers = {"sequences": sequences, "cross_tokenizer": {"loss": "hybrid", "top_k": args.k}, **train}
    cross.append({"name": "seq_kd", "distill": {**on_answers, "loss": {**kd, "alpha": 0.0}}})
    cross.append({"name": "seq_kd_hybrid", "distill": {**on_answers, "loss": kd}})
    cross.append({"name": "seq_kd_hybrid_cache", "distill": {**on_answers, "loss": kd, "teacher_cache": cache}})
    gemma = {
        "name": "crosstok-lab",
        "teacher": "gguf:gemma3-270m",
        "base": "gguf:smollm2-135m-instruct",
        "stages": cross,
        "orderings": {s["name"]: ["half", s["name"]] for s in cross[1:]},
        "pick": {"metric": "heldout_ppl", "value": 1000.0},
        **common,
    }
    same = [
        half,
        {"name": "kd_same_tokenizer", "recover": {"loss": kd, **train}},
        {"name": "kd_same_tokenizer_cache", "recover": {"loss": kd, "teacher_cache": cache, **train}},
        {
            "name": "kd_same_tokenizer_cache_bucket",
            "recover": {"loss": kd, "teacher_cache": {**cache, "tail_samples": 0}, **train},
        },
    ]
    smollm2 = {
        "name": "crosstok-lab-same",
        "teacher": "gguf:smollm2-135m-instruct",
        "stages": same,
        "orderings": {s["name"]: ["half", s["name"]] for s in same[1:]},
        **common,
    }
    return gemma, smollm2


def same_start(inits: dict) -> str:
    """Both recipes prune SmolLM2 on the same calibration blocks: one half, or a line that says they differ."""
    first, *others = inits.values()
    if all(o["layers"] == first["layers"] for o in others):
        return f"Both recipes prune the same half from the same calibration blocks: layers {first['layers']}."
    return "The two recipes' halves DIFFER (compare kd_same_tokenizer only with its cached twin): " + "; ".join(
        f"{n}: layers {v['layers']}, {v['ppl']:.0f} ppl" for n, v in inits.items()
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--blocks", type=int, default=32, help="WikiText-2 test blocks scored")
    p.add_argument("--lr", type=float, default=2.0e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term (the rest CE on labels)")
    p.add_argument("--k", type=int, default=64, help="the teacher's top-k per position (live and cached)")
    p.add_argument("--prompts", type=int, default=64, help="Gemma 3 continuations for seq_kd")
    p.add_argument("--report", default="crosstok_lab")
    args = p.parse_args()
    prepare()
    import yaml

    from compressor.compare import compare, plan
    from compressor.measure import token_perplexity
    from compressor.pipeline import Session
    from compressor.storage import Store

    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes(args):
            path = Path(tmp) / f"{recipe['name']}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            variants = plan([str(path)])
            records[recipe["name"]] = compare(variants, Path(tmp) / recipe["name"], Store())
            if recipe.get("base"):
                session = Session(variants[0][1], Store())
                own = session.heldout(reference=True)[: args.blocks]  # Gemma's own tokens of the same text
                gemma_ppl = token_perplexity(session.teacher.model, own, batch_size=4)
                gemma_tokens = int(own.numel())
    rows = {}
    for record in records.values():
        rows.update({s["ordering"]: s for s in record["stages"] if s["name"] not in ("half", "teacher")})
    students = {}
    for name, row in rows.items():
        info = row["info"]
        ran = args.steps - info.get("resumed_at", 0)
        students[name] = {
            "ppl": row["metrics"]["heldout_ppl"],
            "steps": args.steps,
            # seq_kd's rows are 16 prompt tokens and at most seq - 16 of Gemma's text (cut at its EOS)
            "tokens": args.steps * args.batch * args.seq,
            "step_seconds": info["train_seconds"] / ran if ran else None,
        }
        if "cross_tokenizer" in info:
            students[name]["aligned_first_batch"] = info["cross_tokenizer"]["aligned_first_batch"]
    same = records["crosstok-lab-same"]
    caches = {
        s["ordering"]: s["info"]["teacher_cache"]
        for r in records.values()
        for s in r["stages"]
        if "teacher_cache" in s.get("info", {})
    }
    gemma_cache = [c for name, c in caches.items() if not name.startswith("kd_same_tokenizer")]
    out = {
        "students": students,
        "teacher_ppl": {
            "smollm2_135m": same["stages"][0]["metrics"]["heldout_ppl"],
            "gemma3_270m_own_tokens": gemma_ppl,
        },
        "gemma_heldout_tokens": gemma_tokens,
        "cache": {  # Gemma 3's (the text's, shared by three students; the continuations'); each in `captures`
            "k": gemma_cache[0]["k"],
            "bytes_per_token": gemma_cache[0]["bytes_per_token"],
            "capture_seconds": sum(c["capture_seconds"] for c in gemma_cache),
            "captures": caches,
        },
        "student_init": {  # each recipe prunes its own half
            name: {"ppl": half["metrics"]["heldout_ppl"], "layers": half["info"]["kept_layers"]}
            for name, half in ((n, next(s for s in r["stages"] if s["name"] == "half")) for n, r in records.items())
        },
        "heldout_tokens": rows["ce"]["metrics"]["heldout_tokens"],
        "alpha": args.alpha,
        "lr": args.lr,
        "seq": args.seq,
        "batch": args.batch,
        "seq_kd_prompts": args.prompts,
        "mapped_teacher_tokens": rows["kd_hybrid"]["info"]["cross_tokenizer"]["mapped_teacher_tokens"],
        "load_average": load_average(),
    }
    ce = students["ce"]["ppl"]
    for s in students.values():
        s["vs_ce"] = s["ppl"] / ce - 1
    lines = [
        "# Distillation across tokenizers: Gemma 3 270M into a SmolLM2 student",
        "",
        f"Regenerate: `python bench/crosstok_lab.py --steps {args.steps} --alpha {args.alpha:g} "
        f"--prompts {args.prompts}` (2 CPU threads). "
        f"Student: SmolLM2-135M's 15 most influential layers ({out['student_init']['crosstok-lab']['ppl']:.0f} ppl "
        "before training); "
        f"{args.steps} steps × {args.batch} × {args.seq} tokens for each student: TinyStories, the same batches, "
        f"but for the seq_kd rows, which train on {args.prompts} Gemma 3 continuations of TinyStories prompts; "
        f"token perplexity on {out['heldout_tokens']:,} SmolLM2 tokens of WikiText-2 test. Logit KD: weight "
        f"{args.alpha:g} on the divergence, {1 - args.alpha:g} on cross-entropy, T = 1, the teacher's top-{args.k} "
        "at every aligned position (compressor.crosstok).",
        "",
        "| student | WikiText-2 ppl | vs CE | s/step |",
        "|---|---|---|---|",
    ]
    for name, s in students.items():
        step = f"{s['step_seconds']:.1f}" if s["step_seconds"] else "–"
        lines.append(f"| {name} | {s['ppl']:.2f} | {100 * s['vs_ce']:+.1f}% | {step} |")
    lines += [
        "",
        same_start(out["student_init"]),
        "",
        f"Teachers: SmolLM2-135M {out['teacher_ppl']['smollm2_135m']:.2f} on the same tokens; Gemma 3 270M "
        f"{gemma_ppl:.2f} per its own token ({gemma_tokens:,} Gemma tokens of the same text: not comparable).",
        f"The vocabulary map matches {out['mapped_teacher_tokens']:,} of Gemma 3's 262,144 tokens to SmolLM2 tokens "
        "of the same text.",
        f"Gemma 3's caches: {out['cache']['bytes_per_token']} bytes per token at k = {out['cache']['k']}, each "
        f"captured once ({out['cache']['capture_seconds']:.0f} s in all): the text's, read by the three "
        "cross-tokenizer students, and the continuations'. "
        f"SmolLM2's: {caches['kd_same_tokenizer_cache']['bytes_per_token']} bytes per token, its top "
        f"{args.k - caches['kd_same_tokenizer_cache']['tail_samples']} tokens and "
        f"{caches['kd_same_tokenizer_cache']['tail_samples']} drawn from the tail (systematic sampling, each "
        "a share of the tail's mass: an unbiased estimate of the full-vocabulary gradient; "
        "kd_same_tokenizer_cache_bucket keeps the top "
        f"{args.k} and the tail as one bucket). "
        f"Load average at the end: {out['load_average'][0]}.",
    ]
    save(args.report, out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
