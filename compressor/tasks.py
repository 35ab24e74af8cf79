"""Accuracy through lm-evaluation-harness, with tasks as data.

Our tasks are YAML files (in `compressor/evals/` and in any folder a recipe names) whose
`dataset_kwargs.data_files` may be relative: packaged ones name files we generate into the
cache, a user's name files beside their YAML. Before evaluating we copy each task folder
(YAML and `!function` helpers) into the cache with those paths made absolute, and hand it to
`TaskManager(include_path=...)`. Stock lm-eval task names pass through unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml

from . import UserError
from .data import stdlib_documents
from .storage import atomic_dir, digest, home

PACKAGED_DIR = Path(__file__).parent / "evals"


# --- YAML that keeps lm-eval's `!function` tags as they are --------------------------------


class _Tagged(str):
    def __new__(cls, tag: str, value: str):
        obj = super().__new__(cls, value)
        obj.tag = tag
        return obj


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: _Tagged(suffix, loader.construct_scalar(node)))
_Dumper.add_representer(_Tagged, lambda dumper, data: dumper.represent_scalar("!" + data.tag, str(data)))


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    return doc if isinstance(doc, dict) else {}


# --- data for the packaged tasks, generated offline and deterministically -------------------


def stdlib_ppl_rows() -> list[dict]:
    """The first ~4 KB (whole lines) of every held-out stdlib file."""
    rows = []
    for doc in stdlib_documents("heldout"):
        text = doc[:4000]
        rows.append({"text": text[: text.rfind("\n") + 1] or text})
    return rows


def stdlib_mc_rows(n_items: int = 400, context_lines: int = 6) -> list[dict]:
    """Which line really comes next? The true line against three shufflings of its own words
    (same tokens, same length, broken syntax): a minimal-pair test of what the model knows of
    Python, which a 3M-parameter model passes well above chance and compression erodes."""
    rng = random.Random(1234)
    files = [doc.splitlines() for doc in stdlib_documents("heldout")]
    candidates = [
        (fi, li)
        for fi, lines in enumerate(files)
        for li in range(context_lines, len(lines))
        if len(set(lines[li].split())) >= 3
    ]
    rows = []
    for fi, li in rng.sample(candidates, min(n_items, len(candidates))):
        line = files[fi][li]
        indent, words = line[: len(line) - len(line.lstrip())], line.split()
        shuffled: set[str] = set()
        for _ in range(100):
            rng.shuffle(words)
            candidate = indent + " ".join(words)
            if candidate != indent + " ".join(line.split()):
                shuffled.add(candidate)
            if len(shuffled) == 3:
                break
        if len(shuffled) < 3:
            continue
        label = rng.randrange(4)
        choices = sorted(shuffled)
        choices.insert(label, line)
        context = "\n".join(files[fi][li - context_lines : li]) + "\n"
        rows.append({"context": context, "choices": choices, "label": label})
    return rows


GENERATED: dict[str, Callable[[], list[dict]]] = {
    "stdlib_ppl.jsonl": stdlib_ppl_rows,
    "stdlib_mc.jsonl": stdlib_mc_rows,
}


def generated_data_dir() -> Path:
    """Data of the packaged tasks, one folder per Python version (the stdlib differs)."""
    folder = home() / "evals" / f"data-py{sys.version_info[0]}.{sys.version_info[1]}-v2"
    if not all((folder / name).is_file() for name in GENERATED):
        with atomic_dir(folder) as tmp:
            for name, make in GENERATED.items():
                with open(tmp / name, "w", encoding="utf-8") as f:
                    for row in make():
                        f.write(json.dumps(row) + "\n")
    return folder


# --- task folders -----------------------------------------------------------------------------


def task_names(folder: Path) -> dict[str, Path]:
    """Task and group names defined by the YAML files of a folder."""
    names = {}
    for path in sorted(folder.rglob("*.yaml")):
        doc = _read_yaml(path)
        for key in ("task", "group"):
            if isinstance(doc.get(key), str):
                names[doc[key]] = path
    return names


def _absolute_data_files(doc: dict, data_root: Path) -> dict:
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return doc

    def fix(value):
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value if Path(value).is_absolute() else str((data_root / value).resolve())

    fixed = {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
    return dict(doc, dataset_kwargs=dict(doc["dataset_kwargs"], data_files=fixed))


def materialize(task_dirs: tuple[Path, ...] = ()) -> Path:
    """A cache folder holding our task folders with every data path made absolute."""
    # packaged YAMLs name generated files; a user's YAML names files beside itself
    sources = [(PACKAGED_DIR, generated_data_dir())] + [(Path(d), None) for d in task_dirs]
    stamp = digest(
        [
            [
                str(src),
                str(root),
                {
                    str(p.relative_to(src)): p.read_text(encoding="utf-8")
                    for p in sorted(src.rglob("*"))
                    if p.suffix in (".yaml", ".py")
                },
            ]
            for src, root in sources
        ]
    )
    out = home() / "tasks" / stamp
    if out.is_dir():
        return out
    with atomic_dir(out) as tmp:
        for i, (src, data_root) in enumerate(sources):
            for path in sorted(src.rglob("*")):
                if path.suffix not in (".yaml", ".py"):
                    continue
                target = tmp / str(i) / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".py":
                    shutil.copyfile(path, target)
                    continue
                doc = _absolute_data_files(_read_yaml(path), data_root or path.parent)
                target.write_text(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def local_task_names(task_dirs: tuple[Path, ...] = ()) -> set[str]:
    names = set(task_names(PACKAGED_DIR))
    for folder in task_dirs:
        names |= set(task_names(Path(folder)))
    return names


@lru_cache(maxsize=4)
def _task_manager(include: str | None, with_stock: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=with_stock, verbosity="ERROR")


def unknown_tasks(names: list[str], task_dirs: tuple[Path, ...] = ()) -> list[str]:
    """Names that neither our folders nor lm-eval's stock index define (the stock index is
    only built, slowly, when a name is not ours)."""
    missing = [n for n in names if n not in local_task_names(task_dirs)]
    if not missing:
        return []
    stock = _task_manager(None, True).all_tasks
    return [n for n in missing if n not in stock]


def _offline_unless_needed(names: list[str], task_dirs: tuple[Path, ...]) -> None:
    """Our tasks read local files: keep `datasets` from reaching for the hub."""
    if set(names) <= local_task_names(task_dirs):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def evaluate(
    model,
    tokenizer,
    names: list[str],
    *,
    task_dirs: tuple[Path, ...] = (),
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """lm-eval `simple_evaluate` on an in-memory model; returns {"task/metric": value}."""
    if not names:
        return {}
    _offline_unless_needed(names, task_dirs)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    include = str(materialize(task_dirs))
    manager = _task_manager(include, not set(names) <= local_task_names(task_dirs))
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)

    class Quiet(HFLM):
        """lm-eval's per-document bars redraw in place on a terminal but flood a log file."""

        quiet = not sys.stderr.isatty()

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm or self.quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm or self.quiet)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):  # rolling forces False
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet, **kwargs)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm or self.quiet)

    lm = Quiet(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=str(model.device)
    )
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"lm-eval failed on tasks {names}: {type(exc).__name__}: {exc}", code=1) from None
    metrics = {}
    for task, values in (out or {}).get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}/{metric if filt in ('', 'none') else metric + '_' + filt}"] = float(value)
    return metrics
