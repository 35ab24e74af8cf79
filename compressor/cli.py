"""`compressor run | compare | validate | eval | report | export | teacher build`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError
from .progress import quiet_libraries


def _run(args) -> None:
    from .pipeline import run
    from .recipe import load_recipe
    from .storage import Store

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / recipe.name)
    record = run(recipe, out, Store(Path(args.store)) if args.store else None)
    cached = sum(s["cached"] for s in record["stages"])
    print(f"{out / 'report.md'} ({len(record['stages'])} measured, {cached} cached)")


def _compare(args) -> None:
    from .compare import compare, plan
    from .storage import Store

    variants = plan(args.recipes)
    out = Path(args.out or Path("runs") / ("compare-" + "-".join(r.name for _, r in variants[:1])))
    record = compare(variants, out, Store(Path(args.store)) if args.store else None)
    cached = sum(s["cached"] for s in record["stages"])
    print(f"{out / 'report.md'} ({len(variants)} orderings, {len(record['stages'])} measured, {cached} cached)")


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
    from .export import export

    print(export(Path(args.run_dir), Path(args.out), args.stage))


def _teacher(args) -> None:
    from .builtin import ensure_teacher, teacher_report

    folder = ensure_teacher(args.name)
    report = teacher_report(folder)
    print(
        f"{folder}\nparams {report['params']:,}  held-out perplexity {report['heldout_ppl']:.1f}  "
        f"unigram {report['unigram_ppl']:.1f}  build {report['build_seconds']}s"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compressor", description="Stack distillation, pruning and quantization; measure every stage."
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a recipe")
    r.add_argument("recipe")
    r.add_argument("--out", help="output folder (default runs/<recipe name>)")
    r.add_argument("--store", help="artifact store (default $COMPRESSOR_HOME/artifacts)")
    r.set_defaults(fn=_run)

    c = sub.add_parser("compare", help="run several orderings (or recipes) as one plan; pick among all")
    c.add_argument("recipes", nargs="+", help="recipe files; one with `orderings:` runs each ordering")
    c.add_argument("--out", help="output folder (default runs/compare-<name>)")
    c.add_argument("--store", help="artifact store (default: $COMPRESSOR_HOME/artifacts)")
    c.set_defaults(fn=_compare)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.set_defaults(fn=_validate)

    e = sub.add_parser(
        "eval", help="measure one model: builtin:NAME, hf:ID|FOLDER, llama2c:FILE, or an artifact folder"
    )
    e.add_argument("model")
    e.add_argument("--tasks", help="comma-separated lm-eval task names (default stdlib_ppl,stdlib_mc)")
    e.add_argument("--task-dir", action="append", default=[], help="a folder of your own task YAMLs (repeatable)")
    e.add_argument("--data-dir", help="folder of the published benchmark files (default: ../shared/data)")
    e.add_argument("--limit", type=int, help="items per task")
    e.add_argument("--max-length", type=int, help="scoring context in tokens (default: the model's)")
    e.add_argument(
        "--data", default="builtin:stdlib-heldout", help="held-out text for perplexity, KL and latency prompts"
    )
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--teacher", help="a model to measure KL and top-1 agreement against")
    e.add_argument(
        "--speculative",
        action="store_true",
        help="with --teacher: measure the model as its draft (acceptance, speed-up)",
    )
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=_eval)

    rp = sub.add_parser("report", help="re-render DIR/report.md from DIR/run.json")
    rp.add_argument("dir")
    rp.set_defaults(fn=_report)

    x = sub.add_parser("export", help="a stage's model as a standalone from_pretrained folder with a model card")
    x.add_argument("run_dir", help="the run's output folder (holds run.json)")
    x.add_argument("--stage", help="stage name (default: the last)")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_export)

    t = sub.add_parser("teacher", help="the built-in teacher")
    tsub = t.add_subparsers(dest="action", required=True)
    tb = tsub.add_parser("build", help="build (or find cached) the built-in teacher")
    tb.add_argument("--name", default="tiny-stdlib")
    tb.set_defaults(fn=_teacher)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()
    try:
        args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
