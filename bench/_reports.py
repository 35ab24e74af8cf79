"""What every benchmark shares: where the checkout and the shared data are, the set-up before any
figure (the package importable from the checkout, quiet libraries, fixed threads), and where its
figures go: reports/<name>.json, and reports/<name>.md when it has a table."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # the bench's start: its report records the wall time since
ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
SHARED = ROOT.parent / "shared" / "data"
# a ~110M-parameter Llama (tied 32k embeddings): big enough that decoding reads weights, not overheads
LLAMA_100M = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}


def prepare(threads: int = 2) -> None:
    """Import compressor from this checkout, mute library chatter, fix the thread count (timings
    on a shared 2-core machine are only comparable at a fixed count)."""
    sys.path.insert(0, str(ROOT))
    from compressor.progress import quiet_libraries

    quiet_libraries()  # before anything imports tqdm: it reads TQDM_DISABLE once
    import torch

    torch.set_num_threads(threads)


def available(names: str, setups: dict) -> list[tuple[str, dict]]:
    """(name, setup) of the comma-separated teachers whose data is here; says which are skipped."""
    out = []
    for name in names.split(","):
        if name != "builtin" and not SHARED.is_dir():
            print(f"skipping {name}: {SHARED} is absent")
            continue
        out.append((name, setups[name]))
    return out


# the real-model benches' text: calibration and training on WikiText-2 valid, scoring on its test split
WIKITEXT = {
    "train": str(SHARED / "wikitext2" / "wt2_tokens.valid.txt"),
    "heldout": str(SHARED / "wikitext2" / "wt2_tokens.test.txt"),
    "seq_len": 512,
}


def build_on_wikitext(name: str, model: str, stages: list[dict], windows: int, tmp: Path):
    """Each stage of `stages` built on its own from the named GGUF teacher (as one plan through the
    shared artifact store, $COMPRESSOR_HOME: a rerun reuses what exists); returns ({stage name:
    artifact folder}, the float teacher loaded on the CPU, the first `windows` held-out blocks)."""
    import torch
    import yaml

    from compressor.compare import compare, plan
    from compressor.pipeline import Session
    from compressor.storage import Store
    from compressor.teachers import TeacherSpec, load_teacher

    recipe = {
        "name": name,
        "seed": 0,
        "teacher": f"gguf:{model}",
        "data": WIKITEXT,
        "stages": stages,
        "orderings": {s["name"]: [s["name"]] for s in stages},
        "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": 2, "batch_size": 2}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    variants = plan([str(path)])
    record = compare(variants, tmp / "runs", Store())
    artifacts = {s["ordering"]: Path(s["artifact"]) for s in record["stages"][1:] if s["runtime"] == "torch"}
    teacher = load_teacher(TeacherSpec.model_validate(f"gguf:{model}"), torch.device("cpu"))
    return artifacts, teacher, Session(variants[0][1], Store()).heldout()[:windows]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def save(name: str, figures: dict, markdown: str | None = None) -> Path:
    """reports/<name>.json (with the bench's wall time so far, `wall_seconds`) and .md."""
    figures = {**figures, "wall_seconds": round(time.time() - STARTED, 1)}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    if markdown is not None:
        (REPORTS / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return REPORTS / f"{name}.json"


# what a foreign client is asked to continue, greedily (bench/vllm_cpu.py, bench/gptqmodel_cpu.py)
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "In 1998, the company")


def client_venv(path: Path, requirements: list[str], drop: list[str] = ()) -> Path:
    """The python of a venv of its own for a client whose pins clash with ours (made once: a
    marker naming the requirements is written last, so an install cut short is redone)."""
    import subprocess

    marker, wanted = path / "installed.json", json.dumps([requirements, list(drop)])
    if not marker.is_file() or marker.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", *requirements], check=True)
        if drop:
            subprocess.run([str(path / "bin" / "pip"), "uninstall", "-q", "-y", *drop], check=True)
        marker.write_text(wanted)
    return path / "bin" / "python"


def greedy(loaded, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Our artifact's greedy continuation of each prompt (token ids), one at a time."""
    import torch

    rows = []
    for ids in prompts:
        with torch.no_grad():
            out = loaded.model.generate(
                torch.tensor([ids]),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=loaded.tokenizer.eos_token_id,
            )
        rows.append(out[0, len(ids) :].tolist())
    return rows
