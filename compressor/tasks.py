"""Accuracy through lm-evaluation-harness, with tasks as data.

`evaluate` goes one way: resolve the names (ours, a user's `mc:`/`ppl:` file, stock lm-eval)
-> materialize one cache folder holding our task YAMLs (`evals/`, installed as
`compressor.evals`, and any folder a recipe names) with every data path made absolute -> run
lm-eval on the in-memory model. Data files are made below this module by `evaldata`
(converted published files, generated stdlib rows, a user's files): packaged YAMLs name them by
file name, a user's YAMLs name files beside them. Stock lm-eval task names pass through.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml

from . import UserError, evals
from .evaldata import data_dir, missing_data, packaged_file, user_data, user_file, user_task_name
from .families import sequence_bos
from .progress import Bar, say
from .scoring import loglikelihoods
from .storage import atomic_dir, digest, home

PACKAGED_DIR = Path(evals.__file__).parent  # the top-level evals/ folder, installed as compressor.evals


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


def _data_files(doc: dict) -> list[str]:
    files = (doc.get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    return [v for value in values for v in (value if isinstance(value, list) else [value])]


def _resolved(doc: dict, resolve: Callable[[str], str]) -> dict:
    """The doc with relative data files resolved and `include: lm_eval/...` pointing at the
    installed lm-eval's stock task file."""
    doc = dict(doc)
    include = doc.get("include")
    if isinstance(include, str) and include.startswith("lm_eval/"):
        import lm_eval

        doc["include"] = str(Path(lm_eval.__file__).parent.parent / include)
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return doc

    def fix(value):
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value if Path(value).is_absolute() else resolve(value)

    fixed = {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
    return dict(doc, dataset_kwargs=dict(doc["dataset_kwargs"], data_files=fixed))


def _user_task(spec: str) -> dict:
    """The task a user's `mc:FILE.json` / `ppl:FILE.txt` defines: our arc_easy_local (the stock
    ARC prompt and scoring) or tinystories_local, over the file converted into the cache."""
    kind, _ = user_file(spec)
    data = str(user_data(spec))
    base = _read_yaml(PACKAGED_DIR / ("arc_easy_local.yaml" if kind == "mc" else "tinystories_local.yaml"))
    return _resolved(dict(base, task=user_task_name(spec), dataset_kwargs={"data_files": {"test": data}}), str)


def _task_files(task_dirs: tuple[Path, ...], data: Path | None, user_specs: list[str]) -> dict[str, str]:
    """Every file of the materialized task folder, by relative path."""
    files = {}
    sources = [(PACKAGED_DIR, lambda name: packaged_file(name, data))] + [(Path(d), None) for d in task_dirs]
    for i, (src, resolve) in enumerate(sources):
        for path in sorted(src.rglob("*")):
            if path.name == "__init__.py" and src == PACKAGED_DIR:
                continue
            target = f"{i}/{path.relative_to(src)}"
            if path.suffix == ".py":
                files[target] = path.read_text(encoding="utf-8")
            elif path.suffix == ".yaml":
                here = resolve or (lambda name, folder=path.parent: str((folder / name).resolve()))
                files[target] = _dump(_resolved(_read_yaml(path), here))
    for spec in user_specs:
        files[f"user/{user_task_name(spec)}.yaml"] = _dump(_user_task(spec))
    return files


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def materialize(task_dirs: tuple[Path, ...] = (), data: Path | None = None, user_specs: list[str] = ()) -> Path:
    """A cache folder holding our task folders with every path made absolute."""
    files = _task_files(task_dirs, data, list(user_specs))
    out = home() / "tasks" / digest(files)
    if not out.is_dir():
        with atomic_dir(out) as tmp:
            for name, text in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(text, encoding="utf-8")
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


def problem(names: list[str], task_dirs: tuple[Path, ...] = (), data: str | None = None) -> str | None:
    """Why these tasks cannot run, in one line (None: they can). Checked before any work: an
    unknown name (the stock index is only built, slowly, when a name is not ours), a user file
    that does not parse, a benchmark whose published file is not in the data folder."""
    ours = local_task_names(task_dirs)
    for spec in names:
        if user_file(spec):
            if not user_file(spec)[1].is_file():
                return f"{spec}: file not found"
            try:
                user_data(spec)
            except UserError as exc:
                return str(exc)
    plain = [n for n in names if not user_file(n)]
    missing = [n for n in plain if n not in ours]
    if missing:
        stock = _task_manager(None, True).all_tasks
        unknown = [n for n in missing if n not in stock]
        if unknown:
            return (
                f"unknown task {unknown[0]!r}; ours: {', '.join(sorted(ours))}, mc:FILE.json, ppl:FILE.txt, "
                "or any lm-eval task name"
            )
    folder = data_dir(data)
    packaged = task_names(PACKAGED_DIR)
    members = [m for n in plain if n in packaged for m in _read_yaml(packaged[n]).get("task", []) if isinstance(m, str)]
    for name in plain + members:  # a group's tasks read their own files
        for file in _data_files(_read_yaml(packaged[name])) if name in packaged else []:
            why = missing_data(file, folder)
            if why:
                return f"task {name!r} {why}"
    return None


def _offline_unless_needed(names: list[str], task_dirs: tuple[Path, ...]) -> None:
    """Our tasks read local files: keep `datasets` from reaching for the hub."""
    if all(user_file(n) or n in local_task_names(task_dirs) for n in names):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def token_perplexity(samples: list[dict], encode: Callable[[str], list[int]]) -> float:
    """exp(mean negative log-likelihood per token) from lm-eval's rolling log-likelihoods:
    each sample's text is scored whole, every token of it once (lm-eval's disjoint windows)."""
    nll = sum(-float(s["filtered_resps"][0]) for s in samples)
    tokens = sum(len(encode(s["arguments"][0][0])) for s in samples)
    return math.exp(nll / tokens)


DEFAULT_MAX_LENGTH = 2048  # tokens an lm-eval window holds unless eval.max_length says otherwise


def scoring_length(spec, config) -> int:
    """The longest window scored: eval.max_length, else the model's context up to 2,048 tokens
    (a 32k default context makes lm-eval's windows, and their attention, the memory)."""
    return spec.max_length or min(
        getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH
    )


def evaluate(model, tokenizer, spec, seed: int = 0, logits=None) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval `simple_evaluate` on an in-memory model, for an EvalSpec's tasks, task folders,
    data folder, limit, batch size and length; returns ({"task/metric": value}, {"task/metric":
    higher is better}) with lm-eval's own direction of each metric. Rolling (perplexity) tasks
    also get `token_perplexity` (lower is better).

    `logits` (token ids [B, L] -> logits [B, L, V]) scores with another runtime's forward pass
    (llama.cpp's, for a GGUF export) while lm-eval's own tokenization, windows and scoring stay
    exactly as for the torch model: only where the logits come from changes."""
    if not spec.tasks:
        return {}, {}
    dirs = tuple(Path(d) for d in spec.task_dirs)
    _offline_unless_needed(spec.tasks, dirs)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    users = [n for n in spec.tasks if user_file(n)]
    names = [user_task_name(n) if user_file(n) else n for n in spec.tasks]
    include = str(materialize(dirs, data_dir(spec.data_dir), users))
    manager = _task_manager(include, not all(n in local_task_names(dirs) for n in spec.tasks if not user_file(n)))
    max_length = scoring_length(spec, model.config)
    bos = sequence_bos(model.config, tokenizer)
    source = logits if logits is not None else model

    class Scorer(HFLM):
        # lm-eval passes disable=False to its per-request bars, which overrides TQDM_DISABLE
        # (progress.quiet_libraries): into a log file they would print a line per redraw, so
        # there our own bar counts the scored rows instead (a line every ~10%, with an ETA)
        quiet = not sys.stderr.isatty()
        bar: Bar | None = None

        def loglikelihood(self, requests, disable_tqdm=False):
            if not self.quiet:
                return super().loglikelihood(requests, disable_tqdm)
            with Bar(f"lm-eval ({', '.join(names)})", len(requests), unit="answer") as self.bar:
                try:
                    return super().loglikelihood(requests, True)
                finally:
                    self.bar = None

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm or self.quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """lm-eval puts the prefix token (BOS) before each document, and a tokenizer that
            adds BOS itself puts a second one after it, which is then scored as text
            (lm-eval issue #3333): score each document's own tokens after a single BOS."""
            self.add_bos_token, saved = False, self.add_bos_token
            bar = contextlib.nullcontext()
            if self.quiet:  # its windows come in batches, a call each: one bar counts them all
                windows = sum(-(-len(self.tok_encode(r.args[0])) // self.max_length) for r in requests)
                say(f"lm-eval: perplexity of {len(requests)} documents")
                bar = Bar("lm-eval perplexity", windows, unit="window")
            with bar as self.bar:
                try:
                    return super().loglikelihood_rolling(requests, disable_tqdm or self.quiet)
                finally:
                    self.add_bos_token, self.bar = saved, None

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):  # rolling forces False
            """Every log-likelihood, scored in bounded memory (scoring.py) from the torch model or
            the runtime's logits, with BOS in front of every window for a BOS family."""
            longest = max((len(cont) for _, _, cont in requests), default=0)
            if longest > self.max_length:
                raise UserError(
                    f"an answer of {longest} tokens is longer than the scoring context of {self.max_length} "
                    f"(eval.max_length, default the model's max_position_embeddings up to {DEFAULT_MAX_LENGTH}): "
                    "raise it (rotary models extrapolate, less accurately) or leave the task out"
                )
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            # lm-eval's windows leave room for the BOS put in front of them
            length = self.max_length + (1 if bos is not None else 0)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            bar = self.bar

            def advance(n: int) -> None:
                if bar is not None:
                    bar.update(min(n, bar.total - bar.done))

            out = loglikelihoods(source, pairs, length, self.batch_size, bos, pad, advance)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

    lm = Scorer(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=spec.batch_size,
        max_length=max_length - (1 if bos is not None else 0),
        device=str(model.device),
    )
    import lm_eval.api.task
    import lm_eval.evaluator

    # lm-eval records the git commit of the working folder by running `git`, which prints
    # "fatal: not a git repository" outside one: nothing of ours to record there
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    if Scorer.quiet:  # its request-building bars pass disable=False, which TQDM_DISABLE cannot override
        lm_eval.api.task.tqdm = lambda iterable, *args, **kwargs: iterable
    runs = []
    for limit in dict.fromkeys(spec.limit_of(n) for n in spec.tasks):  # one lm-eval run per limit
        tasks = [name for spec_name, name in zip(spec.tasks, names) if spec.limit_of(spec_name) == limit]
        try:
            runs.append(
                lm_eval.simple_evaluate(
                    model=lm,
                    tasks=tasks,
                    task_manager=manager,
                    limit=limit,
                    bootstrap_iters=0,
                    log_samples=True,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            )
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise UserError(f"lm-eval failed on tasks {tasks}: {type(exc).__name__}: {exc}", code=1) from None
    out = {
        key: {k: v for run in runs for k, v in run.get(key, {}).items()}
        for key in ("results", "samples", "configs", "higher_is_better")
    }
    metrics, higher = {}, {}
    for task, values in out["results"].items():
        declared = out.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric if filt in ('', 'none') else metric + '_' + filt}"
            metrics[name] = float(value)
            if metric in declared:
                higher[name] = bool(declared[metric])
    for task, samples in out["samples"].items():
        if out["configs"][task].get("output_type") == "loglikelihood_rolling" and samples:
            metrics[f"{task}/token_perplexity"] = token_perplexity(
                samples, lambda text: lm.tok_encode(text, add_special_tokens=False)
            )
            higher[f"{task}/token_perplexity"] = False
    return metrics, higher
