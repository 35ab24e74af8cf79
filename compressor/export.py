"""`compressor export`: a stage's artifact as a standalone folder for `from_pretrained`.

The folder holds the weights (safetensors only), the config with its quantization config, the
tokenizer and a model card (README.md) with the recipe, the stage chain and the measured table.
Loading it needs transformers (and the quantization backend: torchao or bitsandbytes), not
this package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import UserError
from .report import table
from .storage import MANIFEST, atomic_dir, read_json

PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def pick_stage(record: dict, name: str | None) -> int:
    names = [s["name"] for s in record["stages"]]
    if name is None:
        return len(names) - 1
    if name not in names:
        raise UserError(f"--stage: no stage {name!r} in this run; stages: {', '.join(names)}")
    return names.index(name)


def model_card(record: dict, upto: int) -> str:
    chain = record["stages"][: upto + 1]
    stage = chain[-1]
    recipe = Path(record.get("recipe_path") or "")
    lines = [
        f"# {record['recipe']} — {stage['name']}",
        "",
        f"Made by `compressor` from `{chain[0].get('source', 'the teacher')}` through: "
        + " → ".join(f"{s['name']} ({s['kind']})" for s in chain),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        f"Kernel as loaded on the measuring machine ({record.get('device', '?')}): "
        f"{stage['metrics'].get('kernel', 'unknown')}.",
        "",
        "## Measured (teacher and every stage up to this one)",
        "",
        table(chain),
        "",
        "## Stage details",
        "",
        *[f"- {s['name']}: {s.get('info', {})}" for s in chain[1:]],
        "",
    ]
    if recipe.is_file():
        lines += ["## Recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]
    lines += [f"Versions: {record.get('versions', {})}", ""]
    return "\n".join(lines)


def export(run_dir: Path, out: Path, stage: str | None = None) -> Path:
    """Copy the chosen stage's artifact (default: the last) to `out`, atomically."""
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir}: no run.json here (run a recipe first)")
    record = read_json(run_dir / "run.json")
    index = pick_stage(record, stage)
    source = Path(record["stages"][index]["artifact"])
    if not (source / "config.json").is_file():
        name = record["stages"][index]["name"]
        raise UserError(f"{source}: the artifact of stage {name!r} is gone; rerun the recipe")
    pickled = [p.name for p in source.iterdir() if p.suffix in PICKLED]
    if pickled:
        raise UserError(f"{source}: holds pickled weights {pickled}; only safetensors are exported")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out {out}: must be outside the run folder")
    with atomic_dir(out) as tmp:
        for f in source.iterdir():
            if f.is_file() and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(model_card(record, index))
    return out
