"""Recipes: YAML -> a validated plan, or one line saying what is wrong.

Everything is checked before any work starts: YAML syntax, every key and type (pydantic,
unknown keys refused), files that must exist, stage kinds, stage order (nothing that needs a
float model after a quantized one), stage settings against the teacher's dimensions, and
eval task names. A mistake raises UserError("stacks/x.yaml: stages[2].quantize.bits: must
be 4 or 8, got 3"); the CLI prints it and exits 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import UserError
from .data import TextSource
from .families import family_of
from .measure import EvalSpec
from .memory import fits, in_a_run, measuring
from .picks import Floor, floor_check
from .stages import STAGES, StageKind
from .tasks import problem
from .teachers import TeacherSpec


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: TextSource = TextSource(source="builtin:stdlib-text")
    heldout: TextSource | None = Field(
        None, description="default: the stdlib held-out files for builtin text, else the last heldout_fraction of train"
    )
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    seq_len: int = Field(256, ge=8)
    max_train_tokens: int | None = Field(
        None, ge=8, description="train on only the first N tokens of the text (a data budget)"
    )


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    teacher: TeacherSpec
    base: TeacherSpec | None = Field(
        None, description="the local model the first stage starts from (default: the teacher; required with openai:)"
    )
    data: DataSpec = DataSpec()
    stages: list[Any] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    pick: Floor = Field(Floor(), description="the accuracy floor the shipping picks must meet")
    orderings: dict[str, list[str]] | None = Field(
        None, description="compare: name -> stage names from `stages`, run in that order"
    )


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    kind: str
    config: BaseModel

    @property
    def impl(self) -> StageKind:
        return STAGES[self.kind]

    def params(self) -> dict:
        """What determines this stage's artifact (with defaults filled in)."""
        params = {"kind": self.kind, "config": self.config.model_dump(mode="json")}
        if self.impl.algorithm > 1:  # version 1 is left out: keys made before versions stay valid
            params["algorithm"] = self.impl.algorithm
        return params


@dataclass(frozen=True)
class Recipe:
    path: Path
    spec: RecipeModel
    stages: tuple[Stage, ...]

    @property
    def name(self) -> str:
        return self.spec.name


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ").replace("Input should be", "must be")
    shown = err.get("input")
    if kind != "value_error" and not isinstance(shown, (dict, list)):
        msg += f", got {shown!r}"
    return msg


def _fail(path: Path, where: str, message: str) -> UserError:
    return UserError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


def _first_error(path: Path, exc: ValidationError, prefix: tuple = ()) -> UserError:
    err = exc.errors(include_url=False)[0]
    loc = prefix + tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
    extra = ""
    if err["type"] == "extra_forbidden":
        extra = f" (allowed: {', '.join(_allowed_keys(loc))})" if _allowed_keys(loc) else ""
    return _fail(path, _where(loc), _message(err) + extra)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model that owns the unknown key, for the error message."""
    model: Any = RecipeModel
    parts = list(loc[:-1])
    if parts[:1] == ["stages"] and len(parts) >= 3:
        model, parts = STAGES[parts[2]].Config, parts[3:]
    elif parts[:1] == ["stages"]:
        return []
    for part in parts:
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    fields = getattr(model, "model_fields", {})
    return sorted(f.alias or name for name, f in fields.items())


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if "\x00" in text:
        raise UserError(f"{path}: not a text file (contains NUL bytes)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: {where}: broken YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be a mapping with name, teacher, data, stages, eval; got {type(raw).__name__}")
    return raw


def _parse_stages(path: Path, raw_stages: list, base: Path) -> tuple[Stage, ...]:
    stages, names = [], set()
    for i, item in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, where, f"must be a mapping like {{distill: {{...}}}}, got {item!r}")
        kinds = [k for k in item if k != "name"]
        if len(kinds) != 1:
            raise _fail(path, where, f"must have exactly one stage kind ({', '.join(STAGES)}), got {kinds}")
        kind = kinds[0]
        if kind not in STAGES:
            raise _fail(path, where, f"unknown stage kind {kind!r}; kinds: {', '.join(STAGES)}")
        try:
            config = STAGES[kind].Config.model_validate(item[kind] or {}, context={"base": base})
        except ValidationError as exc:
            raise _first_error(path, exc, ("stages", i, kind)) from None
        name = item.get("name") or kind
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise _fail(path, f"{where}.name", f"must be letters, digits, - or _, got {name!r}")
        if name in names:
            name = f"{name}-{i}"
        names.add(name)
        stages.append(Stage(i, name, kind, config))
    return tuple(stages)


def _check_order(path: Path, stages: tuple[Stage, ...]) -> None:
    quantized = None
    for stage in stages:
        if quantized is not None and stage.impl.needs_float:
            raise _fail(
                path,
                f"stages[{stage.index}].{stage.kind}",
                f"cannot follow stages[{quantized.index}].{quantized.kind}: it needs a float model, "
                f"and the weights are quantized by then; move it before the quantization",
            )
        if stage.impl.produces == "quantized":
            if quantized is not None:
                raise _fail(
                    path,
                    f"stages[{stage.index}].{stage.kind}",
                    f"a second quantization after stages[{quantized.index}].{quantized.kind}; "
                    f"a recipe quantizes once, last",
                )
            quantized = stage


def _check_black_box(path: Path, spec: RecipeModel, stages: tuple[Stage, ...]) -> None:
    """A text-only teacher (openai:) gives answers, not logits: a local base model to start from,
    and only stages that learn from text."""
    if spec.base is not None and not spec.base.has_logits:
        raise _fail(path, "base", f"must be a local model, not {spec.base.kind}:")
    if spec.teacher.has_logits:
        return
    if spec.base is None:
        raise _fail(
            path, "base", f"required with an {spec.teacher.kind}: teacher: the local model the student starts from"
        )
    _refuse_field(
        path,
        stages,
        lambda stage: stage.impl.white_box_fields(stage.config),
        lambda field: (
            f"needs the teacher's logits or weights; an {spec.teacher.kind}: teacher answers in text only"
            + (" (set sequences or cot)" if field == "sequences" else "")
        ),
    )


def _refuse_field(path: Path, stages: tuple[Stage, ...], field_of: Callable, why: Callable[[str], str]) -> None:
    """Refuse the first stage setting `field_of(stage)` names, saying `why(field)`."""
    for stage in stages:
        field = field_of(stage)
        if field:
            raise _fail(path, f"stages[{stage.index}].{stage.kind}.{field}", why(field))


def check_crossing(path: Path, spec: RecipeModel, stages: tuple[Stage, ...], why: str) -> None:
    """A teacher with a tokenizer of its own (`why`): what reads it token by token is refused,
    each setting naming the cross-tokenizer one (compressor.crosstok)."""
    if spec.eval.speculative.enabled:
        raise _fail(path, "eval.speculative", f"a draft model proposes the teacher's own tokens, and {why}")
    floor = spec.pick
    if floor.metric in ("teacher_kl", "top1_agreement") or (floor.metric == "heldout_ppl" and floor.retain):
        raise _fail(
            path,
            "pick.metric",
            f"{floor.metric} {'is' if floor.metric != 'heldout_ppl' else 'against the teacher is'} taken in the "
            f"teacher's tokens, and {why}: floor on bits per byte of the text (pick: {{metric: heldout_bpb, "
            "retain: 0.9}), an lm-eval score (pick: {metric: <task>/<metric>}) or an absolute value "
            "(pick: {metric: heldout_ppl, value: 40})",
        )
    _refuse_field(
        path,
        stages,
        lambda stage: stage.impl.same_tokens_field(stage.config),
        lambda field: (
            f"reads the teacher token by token, and {why}: "
            + (
                "build the student from the base (student.from: input)"
                if field == "student.from"
                else "set cross_tokenizer: {loss: hybrid} (or uld, mapped) in this stage"
            )
        ),
    )


def _check_runtimes(path: Path, spec: RecipeModel, shape: dict, where: str) -> None:
    """What a runtime of eval.runtimes cannot compute for a model of this shape (the context it
    is asked for: the longest lm-eval window or held-out block)."""
    from .runtimes import RUNTIMES
    from .tasks import scoring_length

    windows = scoring_length(spec.eval, SimpleNamespace(**shape)) if spec.eval.tasks else 0
    context = max(windows, spec.data.seq_len)
    for name in spec.eval.runtimes:
        why = RUNTIMES[name].refuses(shape, context) if name in RUNTIMES else None
        if why:
            raise _fail(path, where, f"runtime {name}: {why}")


def _check_folders(path: Path, spec: RecipeModel, stages: tuple[Stage, ...]) -> None:
    """A model read a decoder layer at a time is read from its folder: a hub id has none here."""
    reference = ("teacher", spec.teacher) if spec.teacher.has_logits else ("base", spec.base)
    start = ("base", spec.base) if spec.base is not None else ("teacher", spec.teacher)
    readers = [(*reference, "eval.layerwise")] if spec.eval.layerwise else []
    if stages and stages[0].impl.streams(stages[0].config):
        readers.append((*start, f"stages[0].{stages[0].kind}.layerwise"))
    for where, model, setting in readers:
        if model is not None and model.folder() is None:
            raise _fail(
                path,
                where,
                f"{setting} reads the model from its folder, and a hub id has none here; download "
                "it and name the folder (hf:./path/to/model)",
            )


def _check_shapes(path: Path, spec: RecipeModel, stages: tuple[Stage, ...]) -> None:
    teacher = spec.teacher.shape() if spec.teacher.has_logits else None
    shape = spec.base.shape() if spec.base is not None else teacher
    if teacher and shape and spec.base is not None and teacher["vocab_size"] != shape["vocab_size"]:
        why = f"the teacher's vocabulary ({teacher['vocab_size']:,}) is not the base's ({shape['vocab_size']:,})"
        check_crossing(path, spec, stages, why)
    for where, model in (("teacher", teacher), ("base", shape if spec.base is not None else None)):
        if model and "model_type" in model:
            try:
                family_of(model)
            except UserError as exc:
                raise _fail(path, where, str(exc)) from None
    loaded_teacher, teacher = teacher, teacher or shape
    if shape is None:
        return  # a hub model: checked when loaded
    _check_runtimes(path, spec, shape, "eval.runtimes")
    run = SimpleNamespace(seq_len=spec.data.seq_len, teacher_dtype=spec.teacher.dtype)
    on_cpu = spec.device == "cpu" or (spec.device == "auto" and not _has_cuda())
    if on_cpu and loaded_teacher:
        try:
            layerwise = spec.eval.layerwise
            parts = measuring(loaded_teacher, spec.eval.fidelity.batch_size, run.seq_len, layerwise)
            fixes = [] if layerwise else ["eval: {layerwise: true, latency: {enabled: false}}"]
            fits("measuring it", (in_a_run(parts), fixes))
        except ValueError as exc:
            raise _fail(path, "teacher", str(exc)) from None
    for stage in stages:
        where = f"stages[{stage.index}].{stage.kind}"
        try:
            after = stage.impl.check(stage.config, shape, teacher)
            if on_cpu:
                parts, fixes = stage.impl.memory(stage.config, shape, after, loaded_teacher, run)
                fits("the stage", (in_a_run(parts), fixes))
        except ValueError as exc:
            raise _fail(path, where, str(exc)) from None
        shape = after
        _check_runtimes(path, spec, shape, where)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_recipe(path: str | Path, check_tasks: bool = True) -> Recipe:
    """Read and validate a recipe completely; raise UserError with one line on any mistake."""
    path = Path(path)
    recipe = _validate(path, _read(path), check_tasks)
    if recipe.spec.orderings:
        raise UserError(f"{path}: orderings: this recipe compares stage orderings; run it with `compressor compare`")
    return recipe


def load_orderings(path: str | Path, check_tasks: bool = True) -> list[tuple[str, Recipe]]:
    """(label, recipe) per ordering of a recipe with `orderings:`, each validated as a recipe of
    its own; a recipe without them is one ordering labelled by its name."""
    path = Path(path)
    raw = _read(path)
    if not raw.get("orderings"):
        return [(str(raw.get("name")), _validate(path, raw, check_tasks))]
    pool = _validate(path, raw, check_tasks, chain=False)  # the pool; each ordering is checked as a chain
    by_name = {stage.name: item for stage, item in zip(pool.stages, raw["stages"])}
    out = []
    for label, names in pool.spec.orderings.items():
        if not names:
            raise _fail(path, f"orderings.{label}", "must be a non-empty list of stage names")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise _fail(path, f"orderings.{label}", f"unknown stage {unknown[0]!r}; stages: {', '.join(by_name)}")
        if len(set(names)) != len(names):
            raise _fail(path, f"orderings.{label}", "names a stage twice")
        variant = {**raw, "orderings": None, "stages": [{"name": n, **_without_name(by_name[n])} for n in names]}
        try:
            out.append((str(label), _validate(path, variant, check_tasks=False)))
        except UserError as exc:
            raise UserError(str(exc).replace(f"{path}: ", f"{path}: orderings.{label}: ", 1)) from None
    return out


def _without_name(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "name"}


def _validate(path: Path, raw: dict, check_tasks: bool, chain: bool = True) -> Recipe:
    base = path.resolve().parent
    try:
        spec = RecipeModel.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise _first_error(path, exc) from None
    stages = _parse_stages(path, spec.stages, base)
    _check_black_box(path, spec, stages)
    _check_folders(path, spec, stages)
    if chain:
        _check_order(path, stages)
        _check_shapes(path, spec, stages)
    why = floor_check(spec.pick, spec.eval.tasks)
    if why:
        raise _fail(path, "pick.metric", why)
    if check_tasks:
        why = problem(spec.eval.tasks, tuple(Path(d) for d in spec.eval.task_dirs), spec.eval.data_dir)
        if why:
            raise _fail(path, "eval.tasks", why)
    return Recipe(path, spec, stages)
