"""What the shared-prefix cache saves: the orderings of stacks/orderings.yaml as one comparison
vs each ordering run on its own in a fresh store, and whether the metrics agree.

    python bench/compare_cache.py [--steps N] [--limit 50]

Both sides start from the same built teacher (in $COMPRESSOR_HOME) and fresh artifact stores, so
the difference is the stages the comparison builds once instead of once per ordering. The recipe's
training steps are kept unless --steps scales them down; the eval limit is lowered and latency left
out (timings differ run to run, every other metric must be identical).
Writes reports/compare_cache.json ({"compare_s", "independent_s", "ratio", "metrics_identical"}).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _reports import save

ROOT = Path(__file__).resolve().parents[1]
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
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from compressor.compare import compare, plan
    from compressor.progress import quiet_libraries
    from compressor.storage import Store

    quiet_libraries()
    torch.set_num_threads(2)
    raw = scaled(yaml.safe_load(Path(args.recipe).read_text()), args.steps, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "orderings.yaml"
        path.write_text(yaml.safe_dump(raw))
        variants = plan([str(path)])
        start = time.time()
        together = compare(variants, tmp / "together", Store(tmp / "store-together"))
        compare_s = time.time() - start
        start = time.time()
        alone = [compare([v], tmp / f"alone-{i}", Store(tmp / f"store-{i}")) for i, v in enumerate(variants)]
        independent_s = time.time() - start

    def metrics(stages):
        return [{k: s["metrics"].get(k) for k in COMPARED} for s in stages]

    alone_stages = [s for record in alone for s in record["stages"][1:]]
    identical = metrics(together["stages"][1:]) == metrics(alone_stages)
    report = {
        "compare_s": round(compare_s, 1),
        "independent_s": round(independent_s, 1),
        "ratio": compare_s / independent_s,
        "metrics_identical": identical,
        "orderings": together["orderings"],
        "stages_built": sum(not s["cached"] for s in together["stages"][1:]),
        "stages_total": len(together["stages"]) - 1,
        "steps": args.steps,
        "eval_limit": args.limit,
    }
    save("compare_cache", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
