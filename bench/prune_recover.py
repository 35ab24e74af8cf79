"""Prune, then recover: how much does distillation from the original teacher heal, vs CE?

    python bench/prune_recover.py [--teachers builtin,stories260k] [--steps 300]

For each teacher: prune 50% of the MLP channels and 25% of the attention heads (rounded to a
head count the config can hold; the run prints how), then recover with equal steps and data
(a) by plain cross-entropy and (b) by distillation from the original teacher, in two regimes:
recovery data limited to DATA_BUDGET tokens (the usual case: far less text than the teacher
was trained on; the headline figures) and the whole training text. Then the same parameter
count reached by depth pruning (whole layers, chosen by block influence) instead of width,
recovered by distillation on the limited data. Each run is a recipe through the pipeline, so
the pruned artifact is shared by its recoveries. Writes reports/prune_recover.json and .md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from _reports import SHARED, available, prepare, save

TEACHERS = {
    "builtin": {
        "teacher": "builtin:tiny-stdlib",
        "data": {"train": "builtin:stdlib-text", "seq_len": 256},
        "batch_size": 8,
        "lr": 3.0e-3,
    },
    "stories260k": {
        "teacher": f"llama2c:{SHARED / 'stories260K' / 'stories260K.bin'}",
        "data": {"train": str(SHARED / "tinystories" / "tinystories_val.txt"), "seq_len": 256},
        "batch_size": 8,
        "lr": 5.0e-3,
    },
}
WIDTH = {"targets": {"mlp": 0.5, "heads": 0.25}, "method": "taylor", "gqa": "groups"}
KD = {"teacher": "original", "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 0.5}}
CE = {"teacher": "none"}
DATA_BUDGET = 65536  # tokens of recovery text in the limited regime (256 blocks of 256)


def recipe(setup: dict, prune: dict, recover: dict | None, steps: int, budget: int | None) -> dict:
    stages = [{"prune": {**prune, "calibration": {"samples": 32, "batch_size": 4}}}]
    if recover is not None:
        stages.append(
            {
                "recover": {
                    **recover,
                    "steps": steps,
                    "batch_size": setup["batch_size"],
                    "lr": setup["lr"],
                    "warmup": 0.05,
                    "checkpoint_every": 100,
                }
            }
        )
    return {
        "name": "prune-recover",
        "seed": 0,
        "teacher": setup["teacher"],
        "data": {**setup["data"], "max_train_tokens": budget},
        "stages": stages,
        "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": 64, "batch_size": 8}},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teachers", default="builtin,stories260k")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    prepare()

    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    report, lines = (
        {},
        [
            "# Prune, then recover",
            "",
            f"Regenerate: `python bench/prune_recover.py --steps {args.steps}` (2 CPU threads). "
            f"Held-out perplexity is token-level on text no stage trained on. KD: {KD['loss']} from the "
            "original teacher; CE: plain cross-entropy; same steps, batch, lr and data.",
            "",
        ],
    )
    for name, setup in available(args.teachers, TEACHERS):
        with tempfile.TemporaryDirectory() as tmp:

            def go(prune, recover, budget=DATA_BUDGET):
                path = Path(tmp) / "r.yaml"
                path.write_text(yaml.safe_dump(recipe(setup, prune, recover, args.steps, budget)))
                return run(load_recipe(path), Path(tmp) / "out")["stages"]

            teacher, pruned, kd = go(WIDTH, KD)
            _, _, ce = go(WIDTH, CE)
            _, _, kd_full = go(WIDTH, KD, None)
            _, _, ce_full = go(WIDTH, CE, None)
            target = pruned["metrics"]["params"]
            depth_prune = {"targets": {"layers": "auto"}, "target_params": target, "method": "taylor"}
            _, depth, depth_kd = go(depth_prune, KD)
        t_ppl = teacher["metrics"]["heldout_ppl"]
        row = {
            "teacher_ppl": t_ppl,
            "pruned_ppl": pruned["metrics"]["heldout_ppl"],
            "ce_recovered_ppl": ce["metrics"]["heldout_ppl"],
            "kd_recovered_ppl": kd["metrics"]["heldout_ppl"],
            "params_before": teacher["metrics"]["params"],
            "params_after": target,
            "steps": args.steps,
            "rounding": pruned["info"]["rounding"],
            "kd_over_teacher": kd["metrics"]["heldout_ppl"] / t_ppl,
            "recovery_tokens": DATA_BUDGET,
            "kd_config": KD["loss"],
            "lr": setup["lr"],
            "full_data": {
                "ce_recovered_ppl": ce_full["metrics"]["heldout_ppl"],
                "kd_recovered_ppl": kd_full["metrics"]["heldout_ppl"],
            },
            "depth": {
                "params": depth["metrics"]["params"],
                "pruned_ppl": depth["metrics"]["heldout_ppl"],
                "kd_recovered_ppl": depth_kd["metrics"]["heldout_ppl"],
                "rounding": depth["info"]["rounding"],
            },
        }
        report[name] = row
        lines += [
            f"## {name}",
            "",
            *[f"- {note}" for note in row["rounding"]],
            "",
            "| model | params | held-out ppl | × teacher |",
            "|---|---|---|---|",
        ]
        for label, params, ppl in [
            ("teacher", row["params_before"], t_ppl),
            ("width-pruned", target, row["pruned_ppl"]),
            (f"+ CE recovery ({args.steps} steps, {DATA_BUDGET:,} tokens)", target, row["ce_recovered_ppl"]),
            (f"+ KD recovery ({args.steps} steps, {DATA_BUDGET:,} tokens)", target, row["kd_recovered_ppl"]),
            (f"+ CE recovery ({args.steps} steps, all text)", target, row["full_data"]["ce_recovered_ppl"]),
            (f"+ KD recovery ({args.steps} steps, all text)", target, row["full_data"]["kd_recovered_ppl"]),
            ("depth-pruned (same budget)", row["depth"]["params"], row["depth"]["pruned_ppl"]),
            (
                f"+ KD recovery ({args.steps} steps, {DATA_BUDGET:,} tokens)",
                row["depth"]["params"],
                row["depth"]["kd_recovered_ppl"],
            ),
        ]:
            lines.append(f"| {label} | {params:,} | {ppl:.2f} | {ppl / t_ppl:.3f} |")
        lines += ["", *[f"- depth: {note}" for note in row["depth"]["rounding"]], ""]
        print("\n".join(lines[-16:]), flush=True)
    save("prune_recover", report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
