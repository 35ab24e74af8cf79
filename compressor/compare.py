"""`compressor compare`: several orderings of stages (or several recipes) as one plan.

Every ordering runs through the same store, so stages with the same key (same teacher, data,
seed and stage settings up to that point) are built once: the shared-prefix cache. Every
distinct model of every ordering is then timed together, in interleaved rounds, so their
latencies compare. The combined run.json lists the teacher once and every ordering's stages
labelled with the ordering, and the report picks among all of them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from . import UserError
from .pipeline import Session, attach_latency, build_and_measure, finish
from .progress import say
from .recipe import Recipe, load_orderings
from .record import RunRecord, make_record
from .report import write_report
from .storage import Store, output_folder, write_json


def plan(paths: list[str]) -> list[tuple[str, Recipe]]:
    """Every (label, recipe) of the given files, refused as a whole if they cannot be compared."""
    variants = [v for p in paths for v in load_orderings(p)]
    labels = [label for label, _ in variants]
    dup = next((label for label in labels if labels.count(label) > 1), None)
    if dup is not None:
        raise UserError(f"{dup!r}: two recipes or orderings with the same name; rename one")
    first = variants[0][1]
    for _, recipe in variants[1:]:
        for field in ("teacher", "base", "data", "eval", "seed"):
            if getattr(recipe.spec, field) != getattr(first.spec, field):
                raise UserError(f"{recipe.path}: {field}: differs from {first.path}'s; a comparison shares one {field}")
    return variants


def compare(variants: list[tuple[str, Recipe]], out: Path, store: Store | None = None) -> RunRecord:
    """Build and measure every ordering through one store, time every distinct model together,
    then write each ordering's run into out/<ordering>/ and the comparison into out/."""
    store = store or Store()
    start = time.time()
    with contextlib.ExitStack() as held:
        held.enter_context(output_folder(out))
        runs = []
        for i, (label, recipe) in enumerate(variants):
            held.enter_context(output_folder(out / label))
            say(f"ordering {i + 1}/{len(variants)}: {label}: {' -> '.join(s.name for s in recipe.stages)}")
            session = Session(recipe, store)
            runs.append((label, session, build_and_measure(session)))
        timing = attach_latency([(session, rows) for _, session, rows in runs])
        records = [(label, finish(session, rows, timing, out / label)) for label, session, rows in runs]
        first = records[0][1]
        reference = [s for s in first["stages"] if s["kind"] in ("teacher", "base")]  # every runtime's row 0
        stages = reference + [
            {**stage, "ordering": label}
            for label, record in records
            for stage in record["stages"]
            if stage["kind"] not in ("teacher", "base")
        ]
        extra = {k: first[k] for k in ("pick", "notes") if k in first}
        record = make_record(
            "compare: " + ", ".join(label for label, _ in records),
            first["seed"],
            runs[0][1].device,
            stages,
            timing,
            recipe_paths=sorted({str(r.path) for _, r in variants}),
            orderings={
                label: [
                    s["name"] for s in rec["stages"] if s["kind"] not in ("teacher", "base") and s["runtime"] == "torch"
                ]
                for label, rec in records
            },
            seconds=round(time.time() - start, 2),
            **extra,
        )
        write_json(out / "run.json", record)
        write_report(record, out)
        return record
