"""Every data file our tasks read, made offline: the published benchmark files turned into the
rows lm-eval's stock tasks read, the stdlib tasks' generated rows, and a user's own files.

Our benchmark tasks `include:` the installed stock task (its prompt, scoring and `!function`
helpers) and only swap the hub dataset for a local JSON file with the hub's field names. This
module finds the data folder, converts each published file into that JSON once (cached by the
source's content), generates the stdlib tasks' rows, and converts a user's own file
(`mc:FILE.json`, `ppl:FILE.txt`). It knows nothing of lm-eval: `tasks.py` sits above it.

The multiple-choice files come in a prompt format, `{instruction, input, output, answer}`:

    Please choose the correct answer to the question: <question>\\n\\n
    Answer1: <choice> Answer2: <choice> ...\\n\\nAnswer format: answer1/answer2/...

The preamble ends at the instruction's first ": ". The markers (`Answer1:`, `Solution1:`,
`Option1:`) are the words the "Answer format:" line lists, capitalised; each choice is the text
between its marker and the next one, stripped of the spaces and blank lines the format adds.
`answer` names the gold marker ("answer2" → the second choice).
"""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import UserError
from .data import stdlib_documents
from .storage import atomic_dir, home, sha256_file

# Bump when a conversion changes: it is part of every converted file's cache key.
CONVERSION_VERSION = 1


def data_dir(explicit: str | None = None) -> Path | None:
    """Where the published files are: the recipe's `eval.data_dir`, else `$COMPRESSOR_DATA`,
    else `../shared/data` beside the working folder or beside this checkout."""
    if explicit:
        return Path(explicit)
    if os.environ.get("COMPRESSOR_DATA"):
        return Path(os.environ["COMPRESSOR_DATA"]).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


# --- text for perplexity ----------------------------------------------------------------------


def text_documents(text: str, chars: int = 4000) -> list[dict]:
    """Whole blank-line paragraphs grouped into documents of about `chars` characters. Plain
    text files carry no document boundaries (TinyStories' blank lines also part paragraphs of
    one story), so each document gets a few thousand characters of running context."""
    docs, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= chars:
            docs.append({"text": current})
            current = ""
    if current:
        docs.append({"text": current})
    return docs


def read_text(path: Path) -> list[dict]:
    return text_documents(path.read_text(encoding="utf-8"))


def wikitext_pages(path: Path) -> list[dict]:
    """The tokenized WikiText-2 release as the hub's document-level rows: a page starts at each
    top-level heading line (` = Title = `), lines kept as they are."""
    pages: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n?", line) or not pages:
            pages.append("")
        pages[-1] += line
    return [{"page": p} for p in pages if p.strip()]


def lambada_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
        raise UserError(f"{path}: expected one JSON object with a `text` string per line")
    return rows


# --- multiple choice --------------------------------------------------------------------------


@dataclass
class Item:
    question: str
    choices: list[str]
    gold: int


def parse_item(item: dict, where: str) -> Item:
    """One row of the prompt format (see the module docstring)."""
    if not isinstance(item, dict) or not isinstance(item.get("instruction"), str):
        raise UserError(f"{where}: expected an object with an `instruction` string")
    prompt, sep, fmt = item["instruction"].rpartition("Answer format:")
    keys = [k.strip() for k in fmt.split("/")]
    if not sep or len(keys) < 2 or not all(re.fullmatch(r"[a-z]+\d+", k) for k in keys):
        raise UserError(f"{where}: the instruction must end with 'Answer format: answer1/answer2/...'")
    _, colon, body = prompt.partition(": ")
    body = body if colon else prompt
    starts = []
    for key in keys:
        at = body.find(f"{key.capitalize()}: ", starts[-1] if starts else 0)
        if at < 0:
            raise UserError(f"{where}: choice marker {key.capitalize()!r} not found in the instruction")
        starts.append(at)
    ends = starts[1:] + [len(body)]
    choices = [body[s + len(k) + 2 : e].strip() for k, s, e in zip(keys, starts, ends)]
    answer = str(item.get("answer", "")).strip().lower()
    if answer not in keys:
        raise UserError(f"{where}: answer {item.get('answer')!r} is not one of {'/'.join(keys)}")
    return Item(question=body[: starts[0]].strip(), choices=choices, gold=keys.index(answer))


def read_items(path: Path) -> list[Item]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty JSON list of {{instruction, input, output, answer}} objects")
    return [parse_item(row, f"{path} item {i}") for i, row in enumerate(rows)]


def arc_rows(path: Path) -> list[dict]:
    """The hub's ai2_arc fields (choices labelled A, B, C, ...)."""
    labels = "ABCDEFGHIJ"
    return [
        {
            "id": str(i),
            "question": it.question,
            "choices": {"text": it.choices, "label": list(labels[: len(it.choices)])},
            "answerKey": labels[it.gold],
        }
        for i, it in enumerate(read_items(path))
    ]


def piqa_rows(path: Path) -> list[dict]:
    return [
        {"goal": it.question, "sol1": it.choices[0], "sol2": it.choices[1], "label": it.gold} for it in read_items(path)
    ]


def winogrande_rows(path: Path) -> list[dict]:
    rows = []
    for i, it in enumerate(read_items(path)):
        if it.question.count("_") != 1:
            raise UserError(f"{path} item {i}: a WinoGrande sentence holds exactly one '_'")
        rows.append(
            {"sentence": it.question, "option1": it.choices[0], "option2": it.choices[1], "answer": str(it.gold + 1)}
        )
    return rows


def hellaswag_rows(path: Path) -> list[dict]:
    """Six lines per item: context ("<activity>: <text>"), gold index, four endings. The file
    keeps the hub's joined `ctx` (ctx_a + " " + ctx_b), so the whole text becomes ctx_a and
    ctx_b is empty; the stock query capitalises ctx_b's first letter, which therefore stays as
    written here (the only difference from the stock prompt)."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: expected 6 lines per item, got {len(lines)} lines")
    rows = []
    for i in range(0, len(lines), 6):
        context, gold, *endings = lines[i : i + 6]
        activity, _, text = context.partition(": ")
        rows.append({"activity_label": activity, "ctx_a": text, "ctx_b": "", "endings": endings, "label": gold})
    return rows


# --- what the packaged tasks read -------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A converted file: which published file (relative to the data folder) and how."""

    path: str
    convert: Callable[[Path], list[dict]]


SHARED: dict[str, Source] = {
    "tinystories.jsonl": Source("tinystories/tinystories_val.txt", read_text),
    "wikitext2.jsonl": Source("wikitext2/wt2_tokens.test.txt", wikitext_pages),
    "lambada_openai.jsonl": Source("lambada/lambada_test.jsonl", lambada_rows),
    "hellaswag.jsonl": Source("hellaswag/hellaswag_val_full.txt.bz2", hellaswag_rows),
    "arc_easy.jsonl": Source("mc/ARC-Easy.test.json", arc_rows),
    "arc_challenge.jsonl": Source("mc/ARC-Challenge.test.json", arc_rows),
    "piqa.jsonl": Source("mc/piqa.test.json", piqa_rows),
    "winogrande.jsonl": Source("mc/winogrande.test.json", winogrande_rows),
}


def converted(source: Path, convert: Callable[[Path], list[dict]]) -> Path:
    """`source` converted to JSON lines, cached by its content and the conversion."""
    key = f"{sha256_file(source)[:16]}-v{CONVERSION_VERSION}"
    out = home() / "evals" / "converted" / key / f"{convert.__name__}.jsonl"
    if not out.is_file():
        rows = convert(source)
        with atomic_dir(out.parent) as tmp:
            with open(tmp / out.name, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


# --- data our own tasks generate, offline and deterministically ------------------------------


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


def packaged_file(name: str, data: Path | None) -> str:
    """Where a packaged task's data file lies: generated, or converted from the published file in
    the data folder (a path that does not exist when that file is missing: `missing_data` says so)."""
    if name in GENERATED:
        return str(generated_data_dir() / name)
    source = SHARED[name]
    path = (data or Path("<no data folder>")) / source.path
    return str(converted(path, source.convert)) if path.is_file() else str(path)


def missing_data(name: str, data: Path | None) -> str | None:
    """Why a packaged data file cannot be made (its published file is not in the data folder)."""
    if name not in SHARED or (data and (data / SHARED[name].path).is_file()):
        return None
    where = f"under {data}" if data else "(no data folder found)"
    return (
        f"reads {SHARED[name].path} {where}: set eval.data_dir or $COMPRESSOR_DATA "
        "to the folder of the published files (see ../shared/data/README.md)"
    )


def user_data(spec: str) -> Path:
    """A user's `mc:FILE.json` / `ppl:FILE.txt` converted into the cache."""
    kind, path = user_file(spec)
    return converted(path, USER_KINDS[kind])


# --- a user's own files ------------------------------------------------------------------------

USER_KINDS = {"mc": arc_rows, "ppl": read_text}


def user_file(spec: str) -> tuple[str, Path] | None:
    """`mc:FILE.json` or `ppl:FILE.txt` → (kind, path); None for a plain task name."""
    kind, sep, path = spec.partition(":")
    return (kind, Path(path)) if sep and kind in USER_KINDS else None


def user_task_name(spec: str) -> str:
    """The task a user file defines: `mc_<stem>` / `ppl_<stem>`, made of safe characters."""
    kind, path = user_file(spec)
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_]+', '_', path.stem).strip('_').lower()}"
