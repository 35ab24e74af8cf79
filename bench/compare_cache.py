"""What the shared-prefix cache saves: the orderings of stacks/orderings.yaml as one comparison
vs each ordering run on its own in a fresh store, and whether the metrics agree.

    python bench/compare_cache.py [--steps N] [--limit 50] [--repeats 2]

Fair by construction: an untimed warm-up comparison first builds what both sides share and
neither should be charged for (the built-in teacher, tokenized data, converted eval data); each
side then starts from fresh artifact stores. Both sides are timed `--repeats` times, alternating
which goes first (C I, I C, ...), each in fresh stores, with the machine's load average recorded
around every timing. The ratio is
min(comparison) / min(independent), with every repeat's seconds beside it. The recipe's
training steps are kept unless --steps scales them down; the eval limit is lowered and latency
left out (timings differ run to run, every other metric must be identical).
Writes reports/compare_cache.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from _reports import ROOT, load_average, prepare, save

COMPARED = ("heldout_ppl", "teacher_kl", "top1_agreement", "params", "bytes", "accuracy")


def scaled(recipe: dict, steps: int | None, limit: int) -> dict:
    for item in recipe["stages"]:
        for kind, cfg in item.items():
            if steps is not None and kind != "name" and isinstance(cfg, dict) and "steps" in cfg:
                cfg["steps"] = steps
    recipe["eval"]["limit"] = limit
    recipe["eval"]["latency"] = {"enabled": False}  # timings differ run to run; the rest must not
    return recipe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default=str(ROOT / "stacks" / "orderings.yaml"))
    p.add_argument("--steps", type=int, default=None, help="override every stage's training steps")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of each side, alternating")
    args = p.parse_args()
    prepare()
    from compressor.compare import compare, plan
    from compressor.storage import Store

    raw = scaled(yaml.safe_load(Path(args.recipe).read_text()), args.steps, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "orderings.yaml"
        path.write_text(yaml.safe_dump(raw))
        variants = plan([str(path)])
        compare(variants, tmp / "warm-up", Store(tmp / "store-warm-up"))  # untimed: builds what both share

        def together(run: int) -> tuple[float, dict]:
            start = time.time()
            record = compare(variants, tmp / f"together-{run}", Store(tmp / f"store-together-{run}"))
            return time.time() - start, record

        def alone(run: int) -> tuple[float, list[dict]]:
            start = time.time()
            records = [
                compare([v], tmp / f"alone-{run}-{i}", Store(tmp / f"store-alone-{run}-{i}"))
                for i, v in enumerate(variants)
            ]
            return time.time() - start, records

        timings = []
        for run in range(args.repeats):
            sides = (("compare", together), ("independent", alone))
            for side, fn in sides if run % 2 == 0 else sides[::-1]:
                before = load_average()
                seconds, result = fn(run)
                timings.append(
                    {
                        "side": side,
                        "repeat": run,
                        "seconds": round(seconds, 1),
                        "load_before": before,
                        "load_after": load_average(),
                    }
                )
                print(timings[-1], flush=True)
                if side == "compare":
                    last_together = result
                else:
                    last_alone = result

    def metrics(stages):
        return [{k: s["metrics"].get(k) for k in COMPARED} for s in stages]

    alone_stages = [s for record in last_alone for s in record["stages"][1:]]
    identical = metrics(last_together["stages"][1:]) == metrics(alone_stages)
    compare_s = [t["seconds"] for t in timings if t["side"] == "compare"]
    independent_s = [t["seconds"] for t in timings if t["side"] == "independent"]
    report = {
        "compare_s": min(compare_s),
        "independent_s": min(independent_s),
        "ratio": min(compare_s) / min(independent_s),
        "ratio_per_repeat": [round(c / i, 3) for c, i in zip(compare_s, independent_s)],
        "estimator": f"min over {args.repeats} alternating repeats per side, shared work built before the clock",
        "timings": timings,
        "metrics_identical": identical,
        "orderings": last_together["orderings"],
        "stages_built": sum(not s["cached"] for s in last_together["stages"][1:]),
        "stages_total": len(last_together["stages"]) - 1,
        "steps": args.steps,
        "eval_limit": args.limit,
    }
    save("compare_cache", report)
    print(json.dumps({k: v for k, v in report.items() if k != "timings"}, indent=2))


if __name__ == "__main__":
    main()
