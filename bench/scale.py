"""GPTQ INT4 on models bigger than the ones we ship: peak resident memory and seconds, measured
against `compressor.memory`'s estimate.

    python bench/scale.py [--models 0.1b,0.5b,1.5b] [--samples 4] [--parts gptq,fsdp,measure,run,prune]

The models are random-initialised Llamas built from config (no downloads), at widths that are
multiples of 256 so every GGUF type applies; 0.5b and 1.5b share their width and differ in depth,
so a path whose peak does not grow with depth shows it. Each is saved as a float32 safetensors
checkpoint, then quantized by a fresh process (GPTQ INT4, groups of 32, act-order, `--samples`
calibration blocks of 512 random tokens, batch 4) whose peak resident memory the kernel reports
(`wait4`'s ru_maxrss): loading included, as a user's run has it. The `fsdp` part is
`bench/fsdp.py`: a KD run as one process and as two under FSDP (gloo), losses and weights
compared. The `measure` part scores the 1.5b's held-out perplexity loaded whole and a decoder layer
at a time (eval.layerwise), each in a fresh process. The `run` part gives the 1.5b a tokenizer and
runs `compressor run` on it, quantizing a layer at a time (GPTQ on llama.cpp's Q4_K_M mix) and
measuring both rows a layer at a time, as a user would: the peak of that whole process. The `prune`
part prunes the 1.5b (activation importance) loaded whole and a layer at a time. Writes
reports/scale.{json,md}; a part not run keeps its figures (and the command that made them) from
the existing report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _reports import ROOT, load_average, prepare, save

THREADS = 2
SEQ, BATCH = 512, 4
MODELS = {  # Llama shapes; vocabulary 32000, tied embeddings
    "0.1b": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "0.5b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 10, "num_attention_heads": 16},
    "1.5b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 32, "num_attention_heads": 16},
}
PARTS = ("gptq", "fsdp", "measure", "run", "prune")
PRUNE = {"targets": {"layers": 0.25, "mlp": 0.5}, "method": "activation"}
RUN_FIGURES = ("heldout_ppl", "teacher_kl", "top1_agreement", "measured_within_bytes")
COMMON = {"vocab_size": 32000, "num_key_value_heads": 4, "tie_word_embeddings": True, "model_type": "llama"}


def build(shape: dict, folder: Path, tokenizer: bool = False) -> None:
    """A random-initialised Llama of `shape`, saved as a float32 safetensors checkpoint; with
    `tokenizer`, a byte-level BPE trained on the standard library's training split beside it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"}, max_position_embeddings=SEQ)
    if tokenizer:
        from compressor.data import stdlib_documents
        from compressor.teachers.builtin import train_tokenizer

        tok = train_tokenizer(stdlib_documents("train")[:400], 4096)
        tok.save_pretrained(folder)
        config.eos_token_id = config.pad_token_id = tok.eos_token_id
        config.bos_token_id = None
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def score(path: str, folder: Path, samples: int) -> dict:
    """Held-out perplexity of the checkpoint in `folder` on `samples` blocks of random tokens: the
    model loaded whole, or (`layerwise`) read a decoder layer at a time (eval.layerwise)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.layerwise import streaming
    from compressor.measure import token_perplexity

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    blocks = torch.randint(0, vocab, (samples, SEQ), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if path == "whole":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    else:
        model = streaming(folder, torch.device("cpu"))
    ppl = token_perplexity(model, blocks, BATCH)
    return {"seconds": time.perf_counter() - start, "heldout_ppl": ppl}


def quantize(path: str, folder: Path, samples: int) -> dict:
    """GPTQ INT4 of the checkpoint in `folder`, written as a checkpoint beside it: the whole model
    loaded, or (`layerwise`) a layer at a time. Seconds from loading to the last file written."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.data import Calibration
    from compressor.gptq_model import DAMP, run_gptq
    from compressor.layerwise import Checkpoint, Streamed, skeleton

    cpu = torch.device("cpu")
    cfg = SimpleNamespace(
        bits=4, group_size=32, lm_head=False, act_order=True, damp=DAMP,
        calibration=Calibration(samples=samples, batch_size=BATCH),
    )  # fmt: skip
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    blocks = torch.randint(0, vocab, (samples, SEQ), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if path == "whole":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        codes = run_gptq(model, cfg, blocks, cpu)
        model.save_pretrained(folder.with_name("quantized"))  # the dequantized weights, as a stage saves them
    else:
        model = skeleton(folder)
        stream = Streamed(model, Checkpoint(folder), folder.with_name("quantized"), cpu)
        codes = run_gptq(model, cfg, blocks, cpu, stream=stream)
        stream.finish()
    return {"seconds": time.perf_counter() - start, "linears": len(codes)}


def prune(path: str, folder: Path, samples: int) -> dict:
    """A prune stage (`PRUNE`) of the checkpoint in `folder`, importance on `samples` calibration
    blocks, written as a checkpoint beside it: the whole model loaded, or (`layerwise`) a layer at a
    time. Seconds from loading to the last file written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.layerwise import skeleton
    from compressor.stages.base import StageContext
    from compressor.stages.prune import Config, prune

    cpu, out = torch.device("cpu"), folder.with_name(f"pruned-{path}")
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    blocks = torch.randint(0, vocab, (samples, SEQ), generator=torch.Generator().manual_seed(0))
    cfg = Config(**PRUNE, layerwise=path == "layerwise", calibration={"samples": samples, "batch_size": BATCH})
    ctx = StageContext(
        name="prune", config=cfg, device=cpu, seed=0, scratch=folder.with_name("scratch"), cache=folder.parent,
        load_teacher=lambda: None, train_blocks=lambda _: blocks, seq_len=SEQ, cache_key="scale", source=folder,
    )  # fmt: skip
    start = time.perf_counter()
    if path == "whole":
        prune(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ctx).save_pretrained(out)
    else:
        prune(skeleton(folder), ctx).rename(out)
    return {"seconds": time.perf_counter() - start, "params_after": ctx.info["params_after"]}


def in_child(*args: str) -> tuple[dict, int]:
    """Run this file's `--child` mode in a fresh process; its JSON answer and peak RSS in bytes."""
    out, peak = peak_of([sys.executable, __file__, "--child", *args])
    return json.loads(out.strip().splitlines()[-1]), peak


def peak_of(command: list[str], env: dict | None = None) -> tuple[str, int]:
    """Run `command`; its standard output and its peak resident memory in bytes (wait4)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{shlex.join(command)} failed with status {status}")
    return out, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=4)
    parts_help = "gptq (the models), fsdp (bench/fsdp.py), measure, run, prune (the 1.5b)"
    parser.add_argument("--parts", default=",".join(PARTS), help=parts_help)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    prepare(THREADS)
    if args.child:
        kind, folder, *rest = args.child
        if kind == "build":
            build(json.loads(rest[0]), Path(folder), tokenizer=len(rest) > 1)
            print(json.dumps({}))
        elif kind.startswith("score-"):
            print(json.dumps(score(kind.removeprefix("score-"), Path(folder), int(rest[0]))))
        elif kind.startswith("prune-"):
            print(json.dumps(prune(kind.removeprefix("prune-"), Path(folder), int(rest[0]))))
        elif kind.startswith("gptq-"):
            print(json.dumps(quantize(kind.removeprefix("gptq-"), Path(folder), int(rest[0]))))
        return

    command = shlex.join(["python", "bench/scale.py", *sys.argv[1:]])
    kept = json.loads((ROOT / "reports" / "scale.json").read_text()) if parts != set(PARTS) else {}
    gptq_keys = ("command", "calibration", "models", "gptq_seconds", "gptq_load_average")
    out = {"threads": THREADS, **{k: kept[k] for k in gptq_keys if k in kept}}
    out |= {part: kept.get(part) for part in ("fsdp", "measure", "run", "prune")}
    if "gptq" in parts:
        start = time.time()
        out.update(command=command, calibration={"samples": args.samples, "seq_len": SEQ, "batch_size": BATCH})
        out["models"] = gptq_rows(args.models.split(","), args.samples)
        out.update(gptq_seconds=round(time.time() - start, 1), gptq_load_average=load_average())
    if "fsdp" in parts:
        from fsdp import compare

        print("fsdp: one process against two (gloo)", flush=True)
        start = time.time()
        out["fsdp"] = {"command": command, **compare("bench", steps=8)}
        out["fsdp"].update(seconds=round(time.time() - start, 1), load_average=load_average())
    for part, bench in (("measure", measure_part), ("run", run_part), ("prune", prune_part)):
        if part in parts:
            start = time.time()
            out[part] = {"command": command, **bench(args.samples)}
            out[part].update(seconds=round(time.time() - start, 1), load_average=load_average())
    out["targets"] = targets(out["models"])
    save("scale", out, markdown(out))
    print(markdown(out))


def gptq_rows(names: list[str], samples: int) -> list[dict]:
    """Each model built, then GPTQ'd whole and layer by layer, each in a fresh process."""
    from compressor.memory import gptq, parameters

    rows = []
    for name in names:
        shape = {**COMMON, **MODELS[name]}
        row = {"name": name, "params": parameters(shape), "layers": shape["num_hidden_layers"]}
        row["hidden"] = shape["hidden_size"]
        estimate = lambda path, shape=shape: gptq(shape, samples, BATCH, SEQ, layerwise=path == "layerwise")  # noqa: E731
        each_way("gptq", samples, estimate, row, model=name)
        rows.append(row)
    return rows


def each_way(part: str, samples: int, estimate, out: dict, after=None, model: str = "1.5b") -> None:
    """`model` built in a temporary folder, then this file's `--child {part}-{path}` run on it
    loaded whole and a layer at a time, each in a fresh process: its answer, peak resident memory
    and `estimate(path)` (parts in bytes) go to out[path]; `after(source)` runs while the files are
    there."""
    shape = {**COMMON, **MODELS[model]}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        print(f"{part}: building the {model}", flush=True)
        in_child("build", str(source), json.dumps(shape))
        for path in ("whole", "layerwise"):
            print(f"{part}: {path}", flush=True)
            got, peak = in_child(f"{part}-{path}", str(source), str(samples))
            out[path] = {**got, "peak_mb": peak / 2**20, "estimate_mb": sum(estimate(path).values()) / 2**20}
            print(part, path, json.dumps(out[path]), flush=True)
        if after is not None:
            after(source)


def measure_part(samples: int) -> dict:
    """The 1.5b's held-out perplexity, loaded whole and a layer at a time, each in a fresh process."""
    from compressor.memory import measuring

    shape = {**COMMON, **MODELS["1.5b"]}
    out = {"model": "1.5b", "samples": samples, "seq_len": SEQ, "batch_size": BATCH}
    each_way("score", samples, lambda path: measuring(shape, BATCH, SEQ, layerwise=path == "layerwise"), out)
    out["same_ppl"] = out["whole"]["heldout_ppl"] == out["layerwise"]["heldout_ppl"]
    return out


def prune_part(samples: int) -> dict:
    """The 1.5b pruned (`PRUNE`) loaded whole and a layer at a time, each in a fresh process: peak
    resident memory against the stage's estimate, and whether both wrote the same weights."""
    from types import SimpleNamespace

    from compressor.layerwise import Checkpoint
    from compressor.stages.prune import Config, Prune

    shape = {**COMMON, **MODELS["1.5b"]}
    calibration = {"samples": samples, "batch_size": BATCH}
    out = {"model": "1.5b", "prune": PRUNE, "calibration": calibration, "seq_len": SEQ}

    def estimate(path: str) -> dict:
        cfg = Config(**PRUNE, layerwise=path == "layerwise", calibration=calibration)
        return Prune().memory(cfg, shape, Prune().check(cfg, shape, shape), shape, SimpleNamespace(seq_len=SEQ))[0]

    def compare(source: Path) -> None:
        whole, layered = (Checkpoint(source.with_name(f"pruned-{p}")) for p in ("whole", "layerwise"))
        out["same_weights"] = whole.files.keys() == layered.files.keys() and all(
            torch_equal(whole.read([k]), layered.read([k])) for k in whole.files
        )

    each_way("prune", samples, estimate, out, compare)
    return out


def torch_equal(a: dict, b: dict) -> bool:
    import torch

    return all(torch.equal(a[k], b[k]) for k in a)


def run_part(samples: int) -> dict:
    """`compressor run` on the 1.5b, quantized and measured a layer at a time: its peak resident
    memory (the whole process: Python, validation, calibration data, GPTQ, lm-eval) against the
    largest of the estimates validation checks."""
    import yaml

    from compressor.memory import gptq, in_a_run, measuring, parameters

    shape = {**COMMON, **MODELS["1.5b"]}
    calibration = {"samples": samples, "batch_size": BATCH}
    stage = {"method": "gptq", "mix": "Q4_K_M", "layerwise": True, "calibration": calibration}
    evaluation = {"layerwise": True, "latency": {"enabled": False}, "tasks": ["stdlib_mc"], "limit": 12}
    evaluation["fidelity"] = {"samples": samples, "batch_size": BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("run: building the 1.5b with a tokenizer", flush=True)
        in_child("build", str(tmp / "model"), json.dumps(shape), "tokenizer")
        recipe = {"name": "scale-1.5b", "seed": 0, "teacher": f"hf:{tmp / 'model'}", "data": {"seq_len": SEQ}}
        recipe |= {"stages": [{"quantize": stage}], "eval": evaluation}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        print("run: compressor run (quantize a layer at a time, measure a layer at a time)", flush=True)
        env = {**os.environ, "COMPRESSOR_HOME": str(tmp / "home"), "OMP_NUM_THREADS": str(THREADS)}
        command = [sys.executable, "-m", "compressor", "run", str(tmp / "recipe.yaml"), "--out", str(tmp / "out")]
        _, peak = peak_of(command, env)
        record = json.loads((tmp / "out" / "run.json").read_text())
    estimates = {  # what validation checks (recipe._check_shapes): each step with the run's own holdings
        "quantize": sum(in_a_run(gptq(shape, samples, BATCH, SEQ, layerwise=True)).values()),
        "measuring": sum(in_a_run(measuring(shape, BATCH, SEQ, layerwise=True)).values()),
    }
    rows = [
        {
            "name": r["name"],
            "build_seconds": r["build_seconds"],
            "measure_seconds": r["measure_seconds"],
            **{k: r["metrics"].get(k) for k in RUN_FIGURES},
            "accuracy": r["metrics"]["accuracy"],
            "bits_per_param": r["metrics"]["bits_per_param"],
            "info": r.get("info", {}),
        }
        for r in record["stages"]
    ]
    return {
        "model": "1.5b",
        "float32_gb": 4 * parameters(shape) / 1e9,
        "recipe": recipe,
        "peak_mb": peak / 2**20,
        "estimate_mb": max(estimates.values()) / 2**20,
        "estimates_mb": {k: v / 2**20 for k, v in estimates.items()},
        "rows": rows,
    }


def targets(rows: list[dict]) -> dict:
    """The issue's targets, from the rows measured: the largest model's layerwise peak, its growth
    with depth at one width, its seconds per parameter against the whole path's, the estimates."""
    by = {r["name"]: r for r in rows}
    out = {"estimate_over_peak": [r[p]["estimate_mb"] / r[p]["peak_mb"] for r in rows for p in ("whole", "layerwise")]}
    if "1.5b" in by:
        big = by["1.5b"]
        out["layerwise_peak_mb_1.5b"] = big["layerwise"]["peak_mb"]
        out["layerwise_over_whole_seconds_1.5b"] = big["layerwise"]["seconds"] / big["whole"]["seconds"]
        if "0.5b" in by:
            out["layerwise_peak_1.5b_over_0.5b"] = big["layerwise"]["peak_mb"] / by["0.5b"]["layerwise"]["peak_mb"]
    return out


def measure_lines(m: dict | None) -> list[str]:
    if not m:
        return []
    return [
        "## Measuring a model a decoder layer at a time",
        "",
        f"Regenerate: `{m['command']}` ({m['seconds']:.0f} s). Held-out perplexity of the {m['model']} on "
        f"{m['samples']} blocks of {m['seq_len']} random tokens (batch {m['batch_size']}), each way in a fresh "
        "process: peak resident memory (loading included) against `compressor.memory.measuring`.",
        "",
        *each_way_lines(m, "perplexity", lambda r: f"{r['heldout_ppl']:.6g}"),
        f"- The same perplexity both ways: {'yes, to the last bit' if m['same_ppl'] else 'NO'}; {_ratios(m)}",
        "",
    ]


def each_way_lines(m: dict, column: str | None = None, value=None) -> list[str]:
    """The table of a part run whole and a layer at a time (`each_way`), with one more `column`."""
    more = (f" {column} |", "---|") if column else ("", "")
    return [
        f"| path | peak MiB | estimate MiB | estimate / peak | seconds |{more[0]}",
        f"|---|---|---|---|---|{more[1]}",
        *[
            f"| {name} | {r['peak_mb']:,.0f} | {r['estimate_mb']:,.0f} | {r['estimate_mb'] / r['peak_mb']:.2f} | "
            f"{r['seconds']:,.0f} |" + (f" {value(r)} |" if column else "")
            for name, r in (("whole", m["whole"]), ("layer by layer", m["layerwise"]))
        ],
        "",
    ]


def _ratios(m: dict) -> str:
    w, lw = m["whole"], m["layerwise"]
    less, time = w["peak_mb"] / lw["peak_mb"], lw["seconds"] / w["seconds"]
    return f"layer by layer holds {less:.1f}x less and takes {time:.2f}x the time."


def prune_lines(m: dict | None) -> list[str]:
    if not m:
        return []
    w = m["whole"]
    return [
        "## Pruning a model a decoder layer at a time",
        "",
        f"Regenerate: `{m['command']}` ({m['seconds']:.0f} s). A prune stage `{json.dumps(m['prune'])}` on the "
        f"{m['model']}, importance on {m['calibration']['samples']} calibration blocks of {m['seq_len']} random "
        "tokens, each way in a fresh process (loading and writing included); estimate: the stage's own "
        f"(`Prune.memory`). {w['params_after'] / 1e9:.2f}B parameters stay.",
        "",
        *each_way_lines(m),
        f"- The same weights both ways: {'yes, every tensor bit for bit' if m['same_weights'] else 'NO'}; {_ratios(m)}",
        "",
    ]


def run_lines(r: dict | None) -> list[str]:
    if not r:
        return []
    teacher, quantized = r["rows"][0], r["rows"][-1]
    acc = quantized["accuracy"].get("stdlib_mc/acc")
    return [
        "## `compressor run` on the 1.5b, a layer at a time",
        "",
        f"Regenerate: `{r['command']}` ({r['seconds']:.0f} s). A recipe on the 1.5b (a random-initialised "
        "checkpoint with a BPE tokenizer of the standard library): `quantize: {method: gptq, mix: Q4_K_M, "
        "layerwise: true}` and `eval: {layerwise: true}` (held-out fidelity, KL to the teacher, lm-eval's "
        f"stdlib_mc), run as a user runs it: peak resident memory of the whole process {r['peak_mb']:,.0f} MiB "
        f"= {r['peak_mb'] * 2**20 / 1e9:.2f} GB against the largest estimate {r['estimate_mb']:,.0f} MiB "
        f"(quantize {r['estimates_mb']['quantize']:,.0f}, measuring {r['estimates_mb']['measuring']:,.0f}); the "
        f"model is {r['float32_gb']:.1f} GB in float32.",
        "",
        f"- quantize built in {quantized['build_seconds']:,.0f} s (load average at the end "
        f"{r['load_average'][0]:.1f}) at "
        f"{quantized['info'].get('gguf_bits_per_weight')} bits per weight "
        f"({', '.join(f'{k} x{n}' for k, n in sorted(quantized['info'].get('gguf_types', {}).items()))}); "
        f"measured in {quantized['measure_seconds']:,.0f} s "
        f"(the teacher row in {teacher['measure_seconds']:,.0f} s); KL to the teacher {quantized['teacher_kl']:.4f}, "
        f"top-1 agreement {quantized['top1_agreement']:.3f}, stdlib_mc acc {acc:.3f} (random weights: the figures "
        "show the path runs, not quality).",
        "",
    ]


def markdown(out: dict) -> str:
    lines = [
        "# GPTQ INT4 at scale: peak memory and time",
        "",
        f"Regenerate: `{out['command']}` ({out['threads']} CPU threads). Random-initialised Llamas "
        f"(vocabulary 32000, tied), GPTQ INT4 g32 act-order on {out['calibration']['samples']} calibration "
        f"blocks of {out['calibration']['seq_len']} tokens; peak resident memory of a fresh process, loading "
        "and saving included; estimate: `compressor.memory.gptq`.",
        "",
        "| model | params | layers | hidden | path | peak MiB | estimate MiB | estimate / peak | seconds "
        "| s per M params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in out["models"]:
        for path in ("whole", "layerwise"):
            r = m[path]
            lines.append(
                f"| {m['name']} | {m['params'] / 1e9:.2f}B | {m['layers']} | {m['hidden']} | {path} | "
                f"{r['peak_mb']:,.0f} | {r['estimate_mb']:,.0f} | {r['estimate_mb'] / r['peak_mb']:.2f} | "
                f"{r['seconds']:,.0f} | {r['seconds'] / (m['params'] / 1e6):.3f} |"
            )
    t = out["targets"]
    f = out["fsdp"]
    lines += [
        "",
        "## Distillation under FSDP",
        "",
        f"Regenerate: `{f['command']}` ({f['seconds']:.0f} s). `bench/fsdp.py`: {f['steps']} steps of KD (a "
        "6-layer student of a 12-layer teacher, 768 wide, 32k vocabulary) as one process and as two under "
        f"FSDP ({f['backend']}), both through `accelerate launch`.",
        "",
        f"- Largest relative difference of a step's loss: {f['max_rel_loss_diff']:.1e} (target: 1e-4); "
        f"of a trained weight matrix: {f['max_rel_weight_diff']:.1e}.",
        f"- Parameters each process holds while training: {f['params_per_process_fraction']:.2f} of the "
        f"student's, {f['teacher_params_per_process_fraction']:.2f} of the teacher's. Peak resident memory: "
        f"{f['peak_mb_one_process']:,.0f} MiB in one process, {f['peak_mb_each_of_two']:,.0f} MiB in the larger "
        "of two (each loads both models whole before sharding them).",
        "",
        *measure_lines(out.get("measure")),
        *run_lines(out.get("run")),
        *prune_lines(out.get("prune")),
        "## Targets",
    ]
    lines += ["", f"- Estimate / measured peak: {min(t['estimate_over_peak']):.2f}-{max(t['estimate_over_peak']):.2f} "
              "(target: within 25%)."]  # fmt: skip
    if "layerwise_peak_mb_1.5b" in t:
        seconds = t["layerwise_over_whole_seconds_1.5b"]
        peak = t["layerwise_peak_mb_1.5b"]
        units = f"{peak:,.0f} MiB = {peak / 1024:.2f} GiB = {peak * 2**20 / 1e9:.2f} GB"
        lines.append(f"- Layer by layer, 1.5b: peak {units} (target < 1.5 GB), {seconds:.2f}x the whole "
                     "path's seconds (target <= 1.2x).")  # fmt: skip
    if "layerwise_peak_1.5b_over_0.5b" in t:
        lines.append(f"- Depth: the 1.5b's layerwise peak is {t['layerwise_peak_1.5b_over_0.5b']:.2f}x the 0.5b's, "
                     "same width (target within 10%).")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
