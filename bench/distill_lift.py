"""How much does distillation lift a student over plain cross-entropy, and with which knobs?

    python bench/distill_lift.py [--teachers builtin,stories260k] [--steps N] [--quick]

For each teacher, students of the same shape start from the same initialisation and train
with equal steps and data: CE only (alpha 0), then every divergence, temperatures 1/2/4,
alpha 0.3/0.5/0.9, and on-policy lambda 0.5. Each run is a real recipe through the pipeline
(so the artifact store makes a rerun free); the figure is token-level held-out perplexity.
Writes reports/distill_lift.json and reports/distill_lift.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from _reports import SHARED, available, prepare, save

DATA_BUDGET = 32768  # tokens of in-domain text each student may see (the data-limited regime)

TEACHERS = {
    # the built-in teacher is weak (trained 3 min), so a student initialised from its layers is
    # nearly as good as it after a few steps; a fresh narrow student shows what KD transfers
    "builtin": {
        "teacher": "builtin:tiny-stdlib",
        "data": {"train": "builtin:stdlib-text", "seq_len": 128},
        "student": {
            "config": {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
            }
        },
        "steps": 120,
        "batch_size": 8,
        "lr": 3.0e-3,
    },
    # stories260K was trained on far more text than the student sees: 2 of its 5 layers
    "stories260k": {
        "teacher": f"llama2c:{SHARED / 'stories260K' / 'stories260K.bin'}",
        "data": {"train": str(SHARED / "tinystories" / "tinystories_val.txt"), "seq_len": 128},
        "student": {"num_layers": 2},
        "steps": 200,
        "batch_size": 8,
        "lr": 5.0e-3,
    },
}


def runs(quick: bool) -> list[dict]:
    """(label, loss settings, on-policy) for every student of the sweep."""
    out = [{"name": "ce", "loss": {"alpha": 0.0}}]
    for div in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        out.append({"name": f"{div} T2 a0.5", "loss": {"divergence": div, "temperature": 2.0, "alpha": 0.5}})
    if not quick:
        for t in (1.0, 4.0):
            out.append({"name": f"forward_kl T{t:g} a0.5", "loss": {"temperature": t, "alpha": 0.5}})
        for a in (0.3, 0.9):
            out.append({"name": f"forward_kl T2 a{a:g}", "loss": {"temperature": 2.0, "alpha": a}})
        out.append({"name": "forward_kl T1 a0.9", "loss": {"temperature": 1.0, "alpha": 0.9}})
    out.append(
        {
            "name": "jsd T1 a0.9 on-policy 0.5",
            "loss": {"divergence": "jsd", "temperature": 1.0, "alpha": 0.9},
            "on_policy": {"fraction": 0.5, "new_tokens": 32, "prompt_tokens": 16},
        }
    )
    out.append(
        {
            "name": "forward_kl T1 a0.9 teacher sequences",
            "loss": {"temperature": 1.0, "alpha": 0.9},
            "sequences": {"prompts": 512, "prompt_tokens": 16, "new_tokens": 112, "method": "sample"},
        }
    )
    return out


def recipe(teacher: str, setup: dict, run: dict, steps: int) -> dict:
    loss = {"divergence": "forward_kl", **run["loss"]}
    stage = {
        "student": {"from": "teacher", **setup["student"]},
        "loss": loss,
        "steps": steps,
        "batch_size": setup["batch_size"],
        "lr": setup["lr"],
        "warmup": 0.05,
        "checkpoint_every": 100,
    }
    for knob in ("on_policy", "sequences"):
        if knob in run:
            stage[knob] = run[knob]
    return {
        "name": f"lift-{teacher}",
        "seed": 0,
        "teacher": setup["teacher"],
        "data": setup["data"],
        "stages": [{"distill": stage}],
        "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": 96, "batch_size": 16}},
    }


def _run_all(teacher: str, setup: dict, specs: list[dict], steps: int, tmp: Path) -> list[dict]:
    from compressor.pipeline import run as run_recipe
    from compressor.recipe import load_recipe

    rows = []
    for spec in specs:
        path = tmp / "r.yaml"
        path.write_text(yaml.safe_dump(recipe(teacher, setup, spec, steps)))
        start = time.time()
        record = run_recipe(load_recipe(path), tmp / "out")
        m = record["stages"][1]["metrics"]
        rows.append(
            {
                **spec,
                "ppl": m["heldout_ppl"],
                "teacher_kl": m["teacher_kl"],
                "top1_agreement": m["top1_agreement"],
                "teacher_ppl": record["stages"][0]["metrics"]["heldout_ppl"],
                "seconds": round(time.time() - start, 1),
            }
        )
        budget = setup["data"].get("max_train_tokens") or "all"
        print(
            f"{teacher:12s} data {budget!s:>6} {spec['name']:38s} ppl {m['heldout_ppl']:8.2f}  "
            f"KL {m['teacher_kl']:.3f}  top-1 {m['top1_agreement']:.3f}  ({rows[-1]['seconds']}s)",
            flush=True,
        )
    return rows


def _table(rows: list[dict]) -> list[str]:
    ce = rows[0]["ppl"]
    lines = ["| run | held-out ppl | vs CE | KL to teacher | top-1 agreement |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ppl']:.2f} | {100 * (r['ppl'] / ce - 1):+.1f}% | "
            f"{r['teacher_kl']:.3f} | {r['top1_agreement']:.3f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teachers", default="builtin,stories260k")
    p.add_argument("--steps", type=int, help="override the per-teacher step count")
    p.add_argument("--quick", action="store_true", help="CE, the four divergences, on-policy and sequences only")
    p.add_argument(
        "--max-train-tokens",
        type=int,
        default=DATA_BUDGET,
        help=f"the data budget of the sweep (default {DATA_BUDGET}; 0: all the text)",
    )
    p.add_argument("--student-layers", type=int, help="student = this many evenly spaced teacher layers")
    args = p.parse_args()
    prepare()

    report: dict = {}
    lines = [
        "# Distillation lift over CE-only students",
        "",
        "Regenerate: `python bench/distill_lift.py` (2 CPU threads). Every student of a teacher has the same",
        "shape, initialisation, steps, batches and data; only the loss (and where its data comes from) differs.",
        "Held-out perplexity is token-level, on text the students never saw.",
        "",
    ]
    for teacher, setup in available(args.teachers, TEACHERS):
        steps = args.steps or setup["steps"]
        if args.student_layers:
            setup = dict(setup, student={"num_layers": args.student_layers})
        limited = dict(setup, data=dict(setup["data"], max_train_tokens=args.max_train_tokens or None))
        with tempfile.TemporaryDirectory() as tmp:
            rows = _run_all(teacher, limited, runs(args.quick), steps, Path(tmp))
            best = min(rows[1:], key=lambda r: r["ppl"])
            word_level = min((r for r in rows[1:] if "sequences" not in r), key=lambda r: r["ppl"])
            again = [rows[0]] + list({r["name"]: r for r in (best, word_level)}.values())
            full = _run_all(teacher, setup, again, steps, Path(tmp)) if args.max_train_tokens else []
        ce = rows[0]["ppl"]
        report[teacher] = {
            "teacher_ppl": rows[0]["teacher_ppl"],
            "ce_ppl": ce,
            "best_kd_ppl": best["ppl"],
            "lift": 1 - best["ppl"] / ce,
            "best_config": {k: best[k] for k in ("name", "loss", "on_policy", "sequences") if k in best},
            "steps": steps,
            "student": setup["student"],
            "data_budget_tokens": args.max_train_tokens or None,
            "runs": rows,
            "full_data": {"ce_ppl": full[0]["ppl"], "runs": full} if full else None,
        }
        budget = f"{args.max_train_tokens:,} tokens of text" if args.max_train_tokens else "all the text"
        lines += [
            f"## {teacher}",
            "",
            f"Teacher held-out ppl {rows[0]['teacher_ppl']:.2f}; student `{setup['student']}`, {steps} steps "
            f"of {setup['batch_size']} x {setup['data']['seq_len']} tokens, trained on {budget}.",
            "",
        ]
        lines += _table(rows)
        lines += [
            "",
            f"Best: **{best['name']}**, {best['ppl']:.2f} vs CE {ce:.2f} "
            f"({100 * report[teacher]['lift']:.1f}% lower perplexity).",
            "",
        ]
        if full:
            lines += ["With all the text (no data budget), same steps:", ""] + _table(full) + [""]
    save("distill_lift", report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
