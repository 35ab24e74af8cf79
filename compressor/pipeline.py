"""plan -> run stages -> measure -> time -> record, with a content-addressed cache.

Each stage's artifact lives in the store under its key (`keys.py`): a rerun reuses every
finished stage, a killed stage resumes from its last checkpoint, a corrupt artifact (hash
mismatch) is rebuilt, and recipes that start alike share their first stages. Every artifact is
measured the same way, from what is on disk (cached per artifact and eval settings); then every
row of the run is timed together, in interleaved rounds (`latency.py`), and the record is written.
"""

from __future__ import annotations

import copy
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from . import FORMAT_VERSION, keys, launch
from .crosstok import same_tokenizer
from .data import TextSource, documents, load_documents, pack
from .families import sequence_bos
from .latency import Timed, TorchRunner, time_models
from .layerwise import load_skeleton, load_streamed
from .measure import EvalSpec, measure, measure_deployed
from .memory import measuring
from .models import Loaded, load_pretrained, resolve_device, shape_of
from .progress import say, stage_progress
from .recipe import Recipe, Stage, check_crossing
from .record import RunRecord, StageRecord, machine, make_record, versions
from .report import write_report
from .runtimes import RUNTIMES
from .stages import StageContext
from .storage import Store, digest, home, output_folder, read_json, write_json
from .tasks import scoring_length
from .teachers import TeacherSpec, load_teacher, local_folder, stream_teacher


def reference_row(spec) -> tuple[str, TeacherSpec]:
    """Row 0: the teacher, or the base model when the teacher has no logits to measure here."""
    return ("teacher", spec.teacher) if spec.teacher.has_logits else ("base", spec.base)


class Session:
    """What one run shares between its stages, each made on first use."""

    def __init__(self, recipe: Recipe, store: Store):
        self.recipe, self.spec, self.store = recipe, recipe.spec, store
        self.device = launch.join(resolve_device(self.spec.device))
        self.teacher_key = keys.teacher_key(self.spec)
        self.data_identity = keys.data_identity(self.spec.data)
        self.keys = keys.stage_keys(recipe, self.teacher_key, self.data_identity)
        self.measurement_key = keys.measurement_key(self.spec, self.teacher_key, machine(self.device))
        self._blocks: dict[tuple, torch.Tensor] = {}

    @cached_property
    def teacher(self):
        """The teacher as a local model, or as a text-only client (answers.Teacher)."""
        return load_teacher(self.spec.teacher, self.device)

    @cached_property
    def start(self) -> Loaded:
        """What the first stage starts from: the recipe's `base`, else the teacher."""
        return load_teacher(self.spec.base, self.device) if self.spec.base is not None else self.teacher

    def reference_model(self) -> Loaded:
        return self.teacher if self.spec.teacher.has_logits else self.start

    def measured_reference(self) -> Loaded:
        """Row 0's model as measurement reads it: loaded (and kept), or a decoder layer at a time
        (eval.layerwise: made for each use, so its tables are not held while a stage works); with a
        teacher that has logits, the teacher every row's KL is taken against."""
        if not self.spec.eval.layerwise:
            return self.reference_model()
        return stream_teacher(reference_row(self.spec)[1], self.device)

    def measuring_teacher(self) -> torch.nn.Module | None:
        """The model each row's KL is taken against: the teacher, unless it has none or reads
        other tokens than the rows' (`crossed`)."""
        return self.measured_reference().model if self.spec.teacher.has_logits and not self.crossed else None

    @cached_property
    def crossed(self) -> bool:
        """The teacher has a tokenizer of its own (a `base` of another family): the data is in the
        base's tokens, the teacher is measured on its own, and no row's KL to it is taken."""
        if self.spec.base is None or not self.spec.teacher.has_logits:
            return False
        return not same_tokenizer(tokenizer_of(self.spec.teacher), tokenizer_of(self.spec.base))

    def load_measured(self, key: str) -> Loaded:
        """An artifact as measurement reads it: loaded, or a decoder layer at a time (eval.layerwise)."""
        if self.spec.eval.layerwise:
            return load_streamed(self.store.path(key), self.device)
        return self.load_artifact(key)

    @cached_property
    def tokenizing(self) -> Loaded:
        """Whose tokenizer and config pack the data: the first stage's input, not loaded (its
        skeleton, weightless) when every model is measured a layer at a time."""
        if not self.spec.eval.layerwise:
            return self.start
        return load_skeleton(local_folder(self.spec.base or self.spec.teacher, "eval.layerwise"))

    @cached_property
    def _documents(self) -> tuple[list[str], list[str]]:
        return documents(self.spec.data)

    def blocks(self, split: str, seq_len: int, teachers: bool = False) -> torch.Tensor:
        """The data in blocks of the first stage's input's tokens (`teachers`: the teacher's own,
        where it has another tokenizer)."""
        if (split, seq_len, teachers) not in self._blocks:
            data = self.spec.data
            source = data.heldout.identity() if split == "heldout" and data.heldout else data.train.identity()
            by = self.measured_reference() if teachers else self.tokenizing
            blocks = pack(
                lambda: self._documents[0 if split == "train" else 1],
                by.tokenizer,
                seq_len,
                cache_key=f"{self.teacher_key}:{source}:{split}:{data.heldout_fraction}" + (":teachers" * teachers),
                bos=sequence_bos(by.model.config, by.tokenizer),
            )
            if split == "train" and data.max_train_tokens:
                blocks = blocks[: max(1, data.max_train_tokens // seq_len)]
            self._blocks[(split, seq_len, teachers)] = blocks
        return self._blocks[(split, seq_len, teachers)]

    def heldout(self, reference: bool = False) -> torch.Tensor:
        """Held-out blocks; row 0's (`reference`) in the teacher's own tokens where it has them."""
        return self.blocks("heldout", self.spec.data.seq_len, teachers=reference and self.crossed)

    def measured(self, label: str, key: str, load, reference: bool = False) -> tuple[dict, bool, float]:
        """Metrics of the artifact `key` but latency (cached), whether they were cached, seconds."""
        path = self.store.root / "measurements" / f"{key}-{self.measurement_key}.json"
        if path.is_file():
            return read_json(path), True, 0.0
        start = time.time()
        loaded: Loaded = load()
        say(f"measuring {label}: size, fidelity, accuracy ({', '.join(self.spec.eval.tasks) or 'no tasks'})")
        teacher = None if reference else self.measuring_teacher()
        metrics = measure(
            loaded.model,
            loaded.tokenizer,
            loaded.folder,
            self.spec.eval,
            self.heldout(reference),
            teacher,
            self.spec.seed,
        )
        if reference and self.crossed:  # per token of its own tokens: not comparable with the rows'
            metrics.pop("heldout_ppl", None)
            metrics["higher_is_better"].pop("heldout_ppl", None)
        if self.spec.eval.layerwise:
            metrics["measured_within_bytes"] = layerwise_bound(
                self.spec.eval, self.spec.data.seq_len, loaded.model.config, teacher
            )
        if reference and self.spec.teacher.has_logits and not self.crossed:
            metrics.update(teacher_kl=0.0, top1_agreement=1.0)
            metrics["higher_is_better"].update(teacher_kl=False, top1_agreement=True)
        write_json(path, metrics)
        return metrics, False, round(time.time() - start, 2)

    def threads(self) -> int:
        return self.spec.eval.latency.threads or torch.get_num_threads()

    def n_ctx(self, model_config) -> int:
        """Context a runtime needs: the longest of lm-eval's windows and the held-out blocks."""
        return max(scoring_length(self.spec.eval, model_config), self.spec.data.seq_len) + 1

    def deployed(self, row: StageRecord, folder: Path, load, reference: bool = False) -> list[StageRecord]:
        """Rows of `row`'s model (row 0's: `reference`) as each other runtime of eval.runtimes runs it."""
        rows = []
        options = self.spec.eval.gguf.model_dump()
        for name in self.spec.eval.runtimes:
            if name == "torch":
                continue
            runtime, start = RUNTIMES[name], time.time()
            path = runtime.deploy(folder, row["key"], options, self.store.root / "deployed")
            settings = digest(options)  # how it is exported for this runtime
            key = f"{row['key']}@{name}-{settings[:8]}"
            cache = self.store.root / "measurements" / f"{row['key']}@{name}-{settings}-{self.measurement_key}.json"
            if cache.is_file():
                metrics, measure_s = read_json(cache), 0.0
            else:
                loaded: Loaded = load()
                say(f"measuring {row['name']} in {name}: fidelity, accuracy from its own logits")
                logits = runtime.logits(path, self.n_ctx(loaded.model.config), self.threads())
                try:
                    metrics = measure_deployed(
                        logits,
                        loaded.model,
                        loaded.tokenizer,
                        path,
                        runtime.kernel(path),
                        self.spec.eval,
                        self.heldout(reference),
                        self.measuring_teacher(),
                        self.spec.seed,
                    )
                finally:
                    logits.close()
                write_json(cache, metrics)
                measure_s = round(time.time() - start, 2)
            rows.append(
                {
                    **{k: v for k, v in row.items() if k not in ("metrics", "key", "artifact")},
                    "key": key,
                    "runtime": name,
                    "cached": row["cached"],
                    "measure_seconds": measure_s,
                    "artifact": str(path),
                    "metrics": metrics,
                }
            )
        return rows

    def load_artifact(self, key: str) -> Loaded:
        return load_pretrained(str(self.store.path(key)), self.device, dtype="auto")

    def stage_input(self, input_key: str | None, layerwise: bool) -> Loaded:
        """What a stage starts from: the previous artifact, or a copy of the start model; for a
        stage that reads it a layer at a time (`StageKind.streams`), its skeleton and folder."""
        if layerwise:
            start = self.spec.base or self.spec.teacher
            folder = self.store.path(input_key) if input_key else local_folder(start, "a layerwise stage")
            return load_skeleton(folder)
        if input_key:
            return self.load_artifact(input_key)
        return Loaded(copy.deepcopy(self.start.model), self.start.tokenizer, None)

    def build(self, stage: Stage, key: str, input_key: str | None, keep: bool = True) -> dict | None:
        """Run one stage on its input and save the artifact atomically; return its manifest.
        (`keep=False`: a follower process, which builds it beside the main one up to the end of
        its training, and writes nothing.)"""
        if keep and stage.impl.trains:
            launch.tell((stage.index, key, input_key))
        torch.manual_seed(self.spec.seed)
        source = self.stage_input(input_key, stage.impl.streams(stage.config))
        scratch = self.store.scratch(key)
        ctx = StageContext(
            name=f"{stage.name} ({stage.index + 1}/{len(self.recipe.stages)})",
            config=stage.config,
            device=self.device,
            seed=self.spec.seed,
            # a follower's files on the way apart from the main process's, which it removes when it saves
            scratch=scratch if keep else self.store.scratch(f"{key}-process-{launch.rank()}"),
            checkpoints=scratch,
            cache=home(),
            load_teacher=lambda: self.teacher,
            train_blocks=lambda seq_len: self.blocks("train", seq_len),
            seq_len=self.spec.data.seq_len,
            cache_key=f"{self.teacher_key}:{self.data_identity}",
            source=source.folder,
        )
        start = time.time()
        try:
            model = stage.impl.apply(source.model, source.tokenizer, ctx)
        except launch.Trained:  # a follower: its part, the training, is over
            shutil.rmtree(ctx.scratch)
            return None
        manifest = {
            "name": stage.name,
            "kind": stage.kind,
            "params": stage.params(),
            "input": input_key,
            "teacher": self.spec.teacher.identity(),
            "seed": self.spec.seed,
            "info": ctx.info,
            "seconds": round(time.time() - start, 2),
            "versions": versions(),
            "format": FORMAT_VERSION,
        }
        with self.store.build(key, manifest) as tmp:
            if isinstance(model, Path):  # written a layer at a time
                for file in model.iterdir():
                    shutil.move(file, tmp / file.name)
            else:
                model.save_pretrained(tmp)
            source.tokenizer.save_pretrained(tmp)
            for name, write in ctx.files.items():
                write(tmp / name)
        return self.store.get(key, verify=False)


def tokenizer_of(spec: TeacherSpec):
    """A model's tokenizer, without its weights: from its folder (converted first where it is made
    into one), or a hub id's."""
    from transformers import AutoTokenizer

    if spec.folder() is None:
        return AutoTokenizer.from_pretrained(spec.target, revision=spec.revision)
    return AutoTokenizer.from_pretrained(local_folder(spec, "comparing tokenizers"))


def layerwise_bound(spec: EvalSpec, seq: int, config, teacher: torch.nn.Module | None) -> int:
    """Estimated peak of measuring a model a layer at a time (memory.measuring): held-out fidelity,
    the teacher's resident tables beside it, or an lm-eval batch, whichever is larger."""
    parts = measuring(shape_of(config.to_dict()), spec.fidelity.batch_size, seq, layerwise=True)
    if teacher is not None:
        tables = measuring(shape_of(teacher.config.to_dict()), 1, 1, layerwise=True)["embeddings, head"]
        parts["teacher's embeddings, head"] = tables
    scoring = measuring(shape_of(config.to_dict()), spec.batch_size, scoring_length(spec, config), layerwise=True)
    return max(sum(parts.values()), sum(scoring.values()) if spec.tasks else 0)


def build_and_measure(session: Session) -> list[StageRecord]:
    """Every stage built (or found) and measured, row 0 the reference model; latency apart."""
    recipe, store = session.recipe, session.store
    finished = [store.get(k) is not None for k in session.keys]
    if not all(finished):
        session.spec.teacher.impl.preflight()
        if session.crossed:  # a vocabulary of the same size, other tokens: validate could not tell
            check_crossing(recipe.path, session.spec, recipe.stages, "the teacher's tokenizer is not the base's")
    say(
        f"recipe {recipe.name}: {len(session.keys)} stage(s); "
        + ", ".join(f"{s.name} {'cached' if done else 'to run'}" for s, done in zip(recipe.stages, finished))
    )
    name, reference = reference_row(session.spec)
    start = time.time()
    metrics, cached, measure_s = session.measured(name, session.teacher_key, session.measured_reference, reference=True)
    rows: list[StageRecord] = [
        {
            "name": name,
            "kind": name,
            "runtime": "torch",
            "key": session.teacher_key,
            "cached": cached,  # row 0 is not built: whether its measurement was found
            "seconds": round(time.time() - start, 2),
            "build_seconds": None,
            "measure_seconds": measure_s,
            "source": reference.source,
            "artifact": str(reference.folder() or reference.target),
            "metrics": metrics,
        }
    ]
    if reference.folder() is not None:  # a hub id has no folder to export
        rows += session.deployed(rows[0], reference.folder(), session.measured_reference, reference=True)
    input_key = None
    for stage, key in zip(recipe.stages, session.keys):
        start = time.time()
        manifest = store.get(key)
        with stage_progress(stage.name, recipe.path):
            if manifest is None:
                with store.lock(key):  # another run may be building it: wait, then use theirs
                    manifest = store.get(key)
                    cached = manifest is not None
                    manifest = manifest or session.build(stage, key, input_key)
            else:
                cached = True
            if cached:
                say(f"{stage.name}: cached (artifact {key})")
            metrics, _, measure_s = session.measured(stage.name, key, lambda k=key: session.load_measured(k))
        rows.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                "runtime": "torch",
                "key": key,
                "cached": cached,
                "seconds": round(time.time() - start, 2),
                "build_seconds": manifest.get("seconds"),
                "measure_seconds": measure_s,
                "artifact": str(store.path(key)),
                "info": manifest.get("info", {}),
                "metrics": metrics,
            }
        )
        with stage_progress(stage.name, recipe.path):
            rows += session.deployed(rows[-1], store.path(key), lambda k=key: session.load_measured(k))
        input_key = key
    return rows


def attach_latency(runs: list[tuple[Session, list[StageRecord]]]) -> dict | None:
    """Time every distinct model of these runs together (interleaved rounds) and add the figures
    to their rows; the timing is cached by the set of models, settings and machine."""
    session = runs[0][0]
    spec = session.spec.eval.latency
    if not spec.enabled:
        return None
    models: dict[str, tuple[str, Callable]] = {}
    for s, rows in runs:
        for row in rows:
            if row["key"] in models:
                continue
            if row.get("runtime", "torch") != "torch":
                runtime, path = RUNTIMES[row["runtime"]], Path(row["artifact"])
                n_ctx = spec.prompt_tokens + spec.new_tokens + 1
                load = lambda r=runtime, p=path, s=s, n=n_ctx: r.runner(p, s.threads(), n, n)  # noqa: E731
                models[row["key"]] = (f"{row['name']} @{row['runtime']}", load, row["kind"] == "teacher" and s.crossed)
                continue
            reference = row["kind"] in ("teacher", "base")
            load = s.reference_model if reference else (lambda k=row["key"], s=s: s.load_artifact(k))
            models[row["key"]] = (row["name"], _for_timing(load), reference and s.crossed)
    cache = (
        session.store.root
        / "measurements"
        / ("timing-" + keys.timing_key(spec, machine(session.device), [*models, session.data_identity]) + ".json")
    )
    if cache.is_file():
        timing = read_json(cache)
        say(f"latency: cached ({timing['session']['models']} models)")
    else:
        own = session.heldout(reference=True).flatten() if session.crossed else None  # the teacher's tokens
        timed = [Timed(key, name, load, prompt=own if theirs else None) for key, (name, load, theirs) in models.items()]
        say(f"latency: timing {len(timed)} models in {spec.repeats} interleaved rounds")
        timing = time_models(timed, session.heldout().flatten(), spec, session.device)
        write_json(cache, timing)
    for _, rows in runs:
        for row in rows:
            row["metrics"].update(timing["models"][row["key"]])
    return timing["session"]


def _for_timing(load):
    def get() -> TorchRunner:
        loaded = load()
        tok = loaded.tokenizer
        return TorchRunner(loaded.model, tok.pad_token_id or tok.eos_token_id)

    return get


def finish(session: Session, rows: list[StageRecord], timing: dict | None, out: Path) -> RunRecord:
    """Write out/run.json and out/report.md; return the record."""
    record = make_record(
        session.recipe.name,
        session.spec.seed,
        session.device,
        rows,
        timing,
        recipe_path=str(session.recipe.path),
        pick=session.spec.pick.model_dump(exclude_none=True),
    )
    notes = session.spec.teacher.impl.notes()
    if session.crossed:
        notes = [
            *notes,
            "The teacher has a tokenizer of its own: its held-out perplexity counts its own tokens and is "
            "not shown (its bits per byte of the same text are), no row has a KL or top-1 agreement with it, "
            "and lm-eval's scores compare across.",
        ]
    if notes:
        record["notes"] = notes
    write_json(out / "run.json", record)
    write_report(record, out)
    return record


def run(recipe: Recipe, out: Path, store: Store | None = None) -> RunRecord:
    """Run (or resume) a recipe into `out`; return the run record written to out/run.json."""
    store = store or Store()
    with output_folder(out):
        session = Session(recipe, store)
        rows = build_and_measure(session)
        launch.tell(None)  # the followers of a launched run are done
        timing = attach_latency([(session, rows)])
        return finish(session, rows, timing, out)


def follow(recipe: Recipe, store: Store | None = None) -> None:
    """A launched run's other processes: build each stage the main process builds, beside it."""
    session = Session(recipe, store or Store())
    for index, key, input_key in launch.orders():
        session.build(recipe.stages[index], key, input_key, keep=False)


def evaluate_model(
    model_ref: str,
    spec: EvalSpec,
    out: Path,
    heldout: TextSource,
    seq_len: int,
    seed: int,
    device_name: str = "auto",
    teacher_ref: str | None = None,
) -> RunRecord:
    """`compressor eval`: measure any model (a teacher spec or an artifact folder) like a stage."""
    device = resolve_device(device_name)

    def load(ref: str) -> Loaded:
        if Path(ref).is_dir():
            return load_streamed(Path(ref), device) if spec.layerwise else load_pretrained(ref, device, dtype="auto")
        teacher = TeacherSpec.model_validate(ref)
        return stream_teacher(teacher, device) if spec.layerwise else load_teacher(teacher, device)

    with output_folder(out):
        loaded = load(model_ref)
        teacher = load(teacher_ref).model if teacher_ref else None
        bos = sequence_bos(loaded.model.config, loaded.tokenizer)
        blocks = pack(load_documents(heldout), loaded.tokenizer, seq_len, bos=bos)
        start = time.time()
        metrics = measure(loaded.model, loaded.tokenizer, loaded.folder, spec, blocks, teacher, seed)
        if spec.layerwise:
            metrics["measured_within_bytes"] = layerwise_bound(spec, seq_len, loaded.model.config, teacher)
        measure_s = round(time.time() - start, 2)
        timing = None
        if spec.latency.enabled:
            timed = time_models(
                [Timed("model", "model", _for_timing(lambda: loaded))], blocks.flatten(), spec.latency, device
            )
            metrics.update(timed["models"]["model"])
            timing = timed["session"]
        name = Path(model_ref).name if Path(model_ref).is_dir() else model_ref
        row: StageRecord = {
            "name": name,
            "kind": "eval",
            "key": None,
            "cached": False,
            "seconds": round(time.time() - start, 2),
            "build_seconds": None,
            "measure_seconds": measure_s,
            "artifact": str(loaded.folder) if loaded.folder else None,
            "metrics": metrics,
        }
        record = make_record(None, seed, device, [row], timing)
        write_json(out / "run.json", record)
        write_report(record, out)
        return record
