"""`compressor run | compare | validate | eval | report | export | teacher build`."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from . import UserError
from .launch import world
from .progress import interrupted, quiet_libraries


def _run(args) -> None:
    from . import launch
    from .pipeline import follow, run
    from .progress import console
    from .recipe import load_recipe
    from .storage import Store

    recipe = load_recipe(args.recipe)
    store = Store(Path(args.store)) if args.store else None
    if launch.rank() > 0:  # the main process speaks and writes for the whole launch
        console.quiet = True
        return follow(recipe, store)
    out = Path(args.out or Path("runs") / recipe.name)
    record = run(recipe, out, store)
    _done(record, out, f"{len(record['stages'])} rows")


def _compare(args) -> None:
    from .compare import compare, plan
    from .storage import Store

    variants = plan(args.recipes)
    out = Path(args.out or Path("runs") / ("compare-" + "-".join(r.name for _, r in variants[:1])))
    record = compare(variants, out, Store(Path(args.store)) if args.store else None)
    _done(record, out, f"{len(variants)} orderings, {len(record['stages'])} rows")


def _done(record: dict, out: Path, what: str) -> None:
    """The picks, then where the report is: what a person looks for at the end of a run."""
    from .picks import Floor, summary

    built = sum(not s["cached"] for s in record["stages"][1:])
    if "pick" in record:
        for line in summary(record["stages"], Floor(**record["pick"])):
            if line:
                print(line.replace("**", ""))
    print(f"{out / 'report.md'} ({what}: {built} built, {len(record['stages']) - 1 - built} cached)")


def _validate(args) -> None:
    from .recipe import load_orderings

    for label, recipe in load_orderings(args.recipe):
        print(f"{args.recipe}: {label}: ok ({len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)})")


def _eval(args) -> None:
    from pydantic import ValidationError

    from .data import TextSource
    from .measure import EvalSpec
    from .pipeline import evaluate_model
    from .tasks import problem

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks is not None else EvalSpec().tasks

    def option(flag: str, make):
        try:
            return make()
        except ValidationError as exc:
            raise UserError(
                f"{flag}: {exc.errors(include_url=False)[0]['msg'].removeprefix('Value error, ')}"
            ) from None

    spec = option(
        "--tasks/--task-dir/--data-dir",
        lambda: EvalSpec(
            tasks=tasks,
            task_dirs=args.task_dir,
            data_dir=args.data_dir,
            limit=args.limit,
            max_length=args.max_length,
            speculative={"enabled": args.speculative},
            layerwise=args.layerwise,
            latency={"enabled": not args.layerwise},
        ),
    )
    heldout = option("--data", lambda: TextSource.model_validate(args.data))
    if args.speculative and not args.teacher:
        raise UserError("--speculative: needs --teacher (the target the model drafts for)")
    why = problem(spec.tasks, tuple(Path(d) for d in spec.task_dirs), spec.data_dir)
    if why:
        raise UserError(f"--tasks: {why}")
    out = Path(args.out)
    evaluate_model(args.model, spec, out, heldout, args.seq_len, args.seed, args.device, args.teacher)
    print(out / "report.md")


def _report(args) -> None:
    from .report import rerender

    if not (Path(args.dir) / "run.json").is_file():
        raise UserError(f"{args.dir}: no run.json here")
    print(rerender(Path(args.dir)))


def _export(args) -> None:
    from .exporters import export

    options = {key: getattr(args, key) for key in _format_options() if getattr(args, key, None) is not None}
    print(export(Path(args.run_dir), Path(args.out), args.stage, args.format, **options))


def _teacher(args) -> None:
    from .teachers.builtin import ensure_teacher, teacher_report

    folder = ensure_teacher(args.name)
    report = teacher_report(folder)
    print(
        f"{folder}\nparams {report['params']:,}  held-out perplexity {report['heldout_ppl']:.1f}  "
        f"unigram {report['unigram_ppl']:.1f}  build {report['build_seconds']}s"
    )


EXAMPLES = {
    "run": "example: compressor run stacks/quickstart.yaml --out runs/quickstart",
    "compare": "example: compressor compare stacks/orderings.yaml --out runs/orderings",
    "validate": "example: compressor validate stacks/quickstart.yaml",
    "eval": "example: compressor eval hf:./my-model --tasks arc_easy_local,piqa_local --limit 200 --out runs/eval",
    "report": "example: compressor report runs/quickstart",
    "export": "example: compressor export runs/quickstart --stage recover --format hf --out exported/recover",
    "teacher build": "example: compressor teacher build",
}


def _sub(sub, name: str, summary: str, description: str, fn=None, example: str | None = None):
    p = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=EXAMPLES.get(example or name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if fn is not None:
        p.set_defaults(fn=fn)
    return p


def _docs() -> str:
    """Where the documentation is: the checkout's docs/ when installed from one, else the repository's."""
    local = Path(__file__).resolve().parents[1] / "docs"
    if (local / "recipes.md").is_file():
        return f"{local}/ (one page per concept: recipes, teachers, distillation, export, measurement, ...)"
    return "docs/ in the compressor source repository (one page per concept; its README.md lists them)"


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="compressor",
        description="Stack distillation, pruning and quantization; measure every stage.",
        epilog="example: compressor run stacks/quickstart.yaml   (then: compressor <command> --help)\n\n"
        f"docs: {_docs()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"compressor {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    r = _sub(
        sub,
        "run",
        "run (or resume) a recipe",
        "Run a recipe's stages in order, measure the teacher and every stage the same way, and write\n"
        "OUT/run.json and OUT/report.md with the picks. Finished stages are cached: a rerun, or a\n"
        "recipe that starts with the same stages, reuses them; an interrupted stage resumes.",
        _run,
    )
    r.add_argument("recipe", help="a recipe YAML (see stacks/): teacher, data, stages, eval, pick")
    _outputs(r, "runs/<recipe name>")

    c = _sub(
        sub,
        "compare",
        "run several orderings (or recipes) as one plan; pick among all",
        "Run every ordering of a recipe with `orderings:` (or several recipes that share teacher, data,\n"
        "eval and seed) through one store, so shared first stages are built once; time every model\n"
        "together; write OUT/<ordering>/ per ordering and OUT/report.md over all of them.",
        _compare,
    )
    c.add_argument("recipes", nargs="+", help="recipe files; one with `orderings:` runs each ordering")
    _outputs(c, "runs/compare-<name>")

    v = _sub(
        sub,
        "validate",
        "check a recipe without running it",
        "Check a recipe completely (keys, types,\n"
        "files, stage order, stage settings against the teacher's dimensions, eval tasks) and run nothing.",
        _validate,
    )
    v.add_argument("recipe", help="a recipe YAML")

    e = _sub(
        sub,
        "eval",
        "measure one model like a stage",
        "Measure one model the way every stage is measured (size, speed, accuracy, and fidelity with\n"
        "--teacher) and write OUT/run.json and OUT/report.md.",
        _eval,
    )
    e.add_argument(
        "model",
        help="builtin:NAME, hf:ID or hf:FOLDER, gguf:FILE or gguf:NAME, llama2c:FILE.bin, "
        "or a folder written by run/export",
    )
    e.add_argument_group("required").add_argument("--out", required=True, help="output folder")
    e.add_argument(
        "--tasks",
        help="comma-separated: our tasks, any lm-eval task, mc:FILE.json, ppl:FILE.txt (default: stdlib_ppl,stdlib_mc)",
    )
    e.add_argument("--task-dir", action="append", default=[], help="a folder of your own task YAMLs (repeatable)")
    e.add_argument(
        "--data-dir",
        help="folder of the published benchmark files (default: $COMPRESSOR_DATA, else ../shared/data)",
    )
    e.add_argument("--limit", type=int, help="items per task (default: all)")
    e.add_argument("--max-length", type=int, help="scoring context in tokens (default: the model's, at most 2,048)")
    e.add_argument(
        "--data", default="builtin:stdlib-heldout", help="held-out text for perplexity, KL and latency prompts"
    )
    e.add_argument("--seq-len", type=int, default=256, help="tokens per held-out block (default: 256)")
    e.add_argument("--teacher", help="a model to measure KL and top-1 agreement against")
    e.add_argument(
        "--speculative",
        action="store_true",
        help="with --teacher: measure the model as its draft (acceptance, speed-up)",
    )
    e.add_argument(
        "--layerwise",
        action="store_true",
        help="read the model (and --teacher) a decoder layer at a time: for models bigger than memory; no latency",
    )
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    e.add_argument("--seed", type=int, default=0, help="seed of lm-eval's sampling and of the timing (default: 0)")

    rp = _sub(
        sub,
        "report",
        "re-render DIR/report.md from DIR/run.json",
        "Re-render DIR/report.md and its plots from DIR/run.json alone.",
        _report,
    )
    rp.add_argument("dir", help="a run's output folder (holds run.json)")

    x = _sub(
        sub,
        "export",
        "a stage's model as a folder another program loads",
        "Write one stage of a finished run as a standalone folder in a format another program loads,\n"
        "with a model card (README.md) naming the packages it needs. Formats: " + ", ".join(_formats()) + ".",
        _export,
    )
    x.add_argument("run_dir", help="the run's output folder (holds run.json)")
    x.add_argument_group("required").add_argument("--out", required=True, help="output folder, outside the run folder")
    x.add_argument("--stage", help="stage name (default: the last)")
    x.add_argument("--format", default="hf", choices=_formats(), help="what to write (default: hf)")
    for key, (fmt, allowed) in _format_options().items():
        x.add_argument(f"--{key}", choices=allowed, help=f"{fmt} only: {', '.join(allowed)} (default: {allowed[0]})")

    t = _sub(sub, "teacher", "the built-in teacher", "Build the built-in teacher ahead of a run.")
    tsub = t.add_subparsers(dest="action", required=True, metavar="action")
    tb = _sub(
        tsub,
        "build",
        "build (or find cached) the built-in teacher",
        "Train the built-in teacher once (~3 min on 2 cores) and cache it in $COMPRESSOR_HOME.",
        _teacher,
        example="teacher build",
    )
    tb.add_argument("--name", default="tiny-stdlib", help="which built-in teacher (default: tiny-stdlib)")
    return p


def _outputs(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", help=f"output folder (default: {default_out})")
    p.add_argument("--store", help="artifact store (default: $COMPRESSOR_HOME/artifacts)")


def _formats() -> list[str]:
    from .exporters import EXPORTERS

    return list(EXPORTERS)


def _format_options() -> dict[str, tuple[str, tuple[str, ...]]]:
    from .exporters import EXPORTERS

    return {key: (name, allowed) for name, e in EXPORTERS.items() for key, allowed in e.options.items()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()
    try:
        if world() > 1 and args.fn is not _run:
            raise UserError(
                f"compressor {args.command} runs in one process; of the commands only `compressor run` "
                "trains across the processes of `accelerate launch`"
            )
        args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk surfaces as OSError, or inside torch/safetensors errors
        if not _disk_full(exc):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(
            f"error: no space left on the device{where}: nothing half-written was kept; free space and rerun "
            "the same command (finished stages are kept)",
            file=sys.stderr,
        )
        return 1
    return 0


def _disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
