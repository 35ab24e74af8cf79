"""llama.cpp's whole ladder against ours, from the same float model, scored in llama.cpp on the same
token ids in one run.

    python bench/ladder.py [--model smollm2-135m-instruct|gemma3-270m] [--rungs Q4_K_M,IQ4_XS,...]
                           [--ours gptq:Q4_K_M,qat:Q4_K_M,rtn:Q8_0,...] [--qat-steps 32]
                           [--qat-lr 2e-4,5e-5] [--windows 8] [--rounds 3] [--report ladder_qat]

Rows:
- `llamacpp`: each rung (llama.cpp's named mix) made by `llama-quantize` with an importance matrix
  that `llama-imatrix` computes on the calibration text (64 × 512 tokens of WikiText-2 valid, the
  text our own calibration reads); `llamacpp_no_imatrix`: the same rung without it. Both from the
  float model written as F32 GGUF by our exporter. The tools build from the llama.cpp tree in the
  llama-cpp-python source package (`python -m compressor.llamacpp_tools`, once, ~10 min on 2 cores).
- `ours`: a `quantize: {mix: <rung>}` stage per rung and method (the same tensor types as
  llama.cpp's mix: every difference is the integers): `gptq` (act-order, 64 calibration blocks)
  and `rtn` with `importance: true` (round to nearest after our importance-weighted scale search,
  the information an imatrix holds), and `qat` (a `qat: {mix: <rung>, init: gptq}` stage: GPTQ's
  solution, then distillation from the float model through the file's values, each block's stored
  scales kept), exported with `--format gguf` byte for byte.
- `floor`: llama.cpp's own Q8_0 file's weights, dequantized, stored as F32: what llama.cpp's
  arithmetic costs when the weights are exactly Q8_0's (its quantized kernels round activations to
  8-bit blocks; an F32 file does not).
- `release`: the GGUF file the float model was dequantized from, scored as it is: its weights are the
  float model's exactly, so its KL is llama.cpp's arithmetic on those types alone, the floor of any
  rung of the same types (Gemma 3's Q4_K_M: no quantizer can judge itself there).
Every row: bytes, bits per weight, perplexity, mean KL to the float model and top-1 agreement on the
same WikiText-2 test windows (llama.cpp's logits, our scorer), and decode ms/token at batch 1, each
rung's files (llama.cpp's with and without imatrix, ours of that mix) timed together in interleaved
rounds at 2 threads (min, range), one rung after another: one session holding all ~35 files made the
files loaded last 10-20% slower than the same bytes timed beside one other file. A byte-identical copy
of llama.cpp's imatrix file is timed with each rung: what the same bytes measure twice is the noise a
speed ratio is read against. Writes reports/ladder.{json,md,png} (reports/ladder_gemma3.* for Gemma 3).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from _reports import REPORTS, WIKITEXT, build_on_wikitext, load_average, prepare, save

THREADS = 2
RUNGS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "Q2_K")
CALIBRATION = {"samples": 64, "batch_size": 4}
MODELS = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (GGUF Q4_1 release, dequantized to fp32)", "ladder"),
    "gemma3-270m": ("Gemma 3 270M (GGUF Q4_K_M release, dequantized to fp32; Gemma Terms of Use)", "ladder_gemma3"),
}


QAT = {"batch_size": 4, "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0}}
QAT_LR = 2e-4  # SmolLM2's; a row at another lr carries it in its name


def our_stage(method: str, rung: str, qat_steps: int, lr: float = QAT_LR) -> dict:
    name = f"{method}_{rung.lower()}"
    if method == "llamacpp":  # llama-quantize as a stage, with the imatrix our calibration writes
        return {"name": name, "llamacpp": {"type": rung, "calibration": CALIBRATION}}
    if method == "qat":
        cfg = {"mix": rung, "init": "gptq", "calibration": CALIBRATION, "steps": qat_steps, "lr": lr, **QAT}
        return {"name": name if lr == QAT_LR else f"{name}_lr{lr:g}", "qat": cfg}
    cfg = {"method": method, "mix": rung, "calibration": CALIBRATION}
    cfg |= {"act_order": True} if method == "gptq" else {"importance": True}
    return {"name": name, "quantize": cfg}


LABELS = {"gptq": "GPTQ", "rtn": "RTN (importance)", "qat": "QAT (from GPTQ)"}
METHODS = (*LABELS, "llamacpp")


def listed(parse):
    """An argparse type for a comma-separated list: each item parsed, a bad one named (argparse exits 2)."""

    def items(text: str) -> list:
        out = []
        for item in text.split(","):
            try:
                out.append(parse(item))
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{item!r}: {e}") from None
        return out

    return items


def mix_name(text: str) -> str:
    from compressor.ggml.mixes import PRESETS

    if text not in PRESETS:
        raise ValueError(f"not one of llama.cpp's mixes we follow: {', '.join(PRESETS)}")
    return text


def method_rung(text: str) -> tuple[str, str]:
    method, _, name = text.partition(":")
    if method not in METHODS:
        raise ValueError(f"method:rung, the method one of {', '.join(METHODS)}")
    return method, mix_name(name)


def learning_rate(text: str) -> float:
    lr = float(text)
    if not 0 < lr < 1:
        raise ValueError("a learning rate between 0 and 1")
    return lr


def against_rungs(out: dict) -> dict:
    """Per llama.cpp imatrix rung: our lowest-KL file no bigger than it, and its KL as a share of the rung's."""
    best = {}
    for rung, r in out["llamacpp"].items():
        fits = [o for o in out["ours"] if o["bytes"] <= r["bytes"]]
        if fits:
            o = min(fits, key=lambda o: o["kl_to_float"])
            best[rung] = {"ours": o["name"], "bytes": o["bytes"], "kl_ratio": o["kl_to_float"] / r["kl_to_float"]}
            same = [x["ms_per_token"] / r["ms_per_token"] for x in out["ours"] if x["mix"] == rung]
            if same:  # our files of this rung's types: the slowest against llama.cpp's (target ≤ 1.1×)
                best[rung]["ms_ratio_same_types"] = max(same)
            if rung in out["timing"].get("copy_ms_ratio", {}):  # the same bytes timed again: the noise
                best[rung]["ms_ratio_copy"] = out["timing"]["copy_ms_ratio"][rung]
            release = out.get("release")
            if release and release["types"] == r["types"]:  # the float model's own file, on the rung's types
                best[rung]["release_kl"] = release["kl_to_float"]
            by_method = {}
            for m in LABELS:
                mine = [x for x in fits if x["method"] == m]
                if mine:
                    by_method[m] = min(x["kl_to_float"] for x in mine) / r["kl_to_float"]
            best[rung]["kl_ratio_by_method"] = by_method
    return best


def main() -> None:
    prepare(THREADS)  # before the arguments: their check reads compressor's mixes from this checkout
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=list(MODELS), default="smollm2-135m-instruct")
    p.add_argument("--rungs", type=listed(mix_name), default=list(RUNGS))
    every = "method:rung of our stages; default: gptq and rtn on every rung"
    p.add_argument("--ours", type=listed(method_rung), default=None, help=every)
    p.add_argument("--qat-steps", type=int, default=32, help="training steps of each qat row (batch 4 x 512)")
    p.add_argument(
        "--qat-lr", type=listed(learning_rate), default=[QAT_LR], help="comma-separated: a qat row per learning rate"
    )
    p.add_argument("--windows", type=int, default=8, help="512-token WikiText-2 test windows scored")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report", default=None, help="report name under reports/ (default: ladder, ladder_gemma3)")
    args = p.parse_args()
    rungs = args.rungs
    pairs = args.ours or [(m, r) for m in ("gptq", "rtn") for r in rungs]
    what, report = MODELS[args.model]
    report = args.report or report
    import torch

    from compressor.exporters.gguf import write_gguf
    from compressor.latency import LatencySpec, Timed, time_models
    from compressor.llamacpp_tools import run_tool
    from compressor.measure import fidelity as scored
    from compressor.models import load_pretrained
    from compressor.runtimes.llamacpp import LlamaCppLogits, LlamaCppRunner
    from compressor.teachers import TeacherSpec, load_teacher
    from compressor.teachers.gguf import file_type

    cpu = torch.device("cpu")
    spec = TeacherSpec.model_validate(f"gguf:{args.model}")
    ours = [our_stage(m, r, args.qat_steps, lr) for m, r in pairs for lr in (args.qat_lr if m == "qat" else [QAT_LR])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts, teacher, windows = build_on_wikitext("ladder", args.model, ours, args.windows, tmp)
        options = {"weights": "f32", "embeddings": "f32"}
        f32 = write_gguf(teacher.model, teacher.tokenizer, spec.folder(), tmp / "f32.gguf", options, "f32")
        calibration = tmp / "calibration.txt"
        calibration.write_text(Path(WIKITEXT["train"]).read_text())
        imatrix = tmp / "imatrix.gguf"
        print("llama-imatrix on the calibration text (64 x 512 tokens)", flush=True)
        run_tool(
            "llama-imatrix", "-m", str(f32), "-f", str(calibration), "-o", str(imatrix), "-c", "512", "--chunks", "64",
            "-t", str(THREADS),
        )  # fmt: skip
        files: dict[str, tuple[str, Path, dict]] = {}  # row id -> (the rung it is timed with, path, extra fields)
        for rung in rungs:
            for group, extra in (("llamacpp", ["--imatrix", str(imatrix)]), ("llamacpp_no_imatrix", [])):
                path = tmp / f"{group}-{rung}.gguf"
                run_tool("llama-quantize", *extra, str(f32), str(path), rung, str(THREADS))
                label = f"llama.cpp {rung}" + (" (imatrix)" if extra else "")
                files[f"{group}/{rung}"] = (rung, path, {"name": label})
        release = spec.impl.file()
        kind = file_type(release)
        files["release"] = (kind if kind in rungs else "release", release, {"name": f"the release file ({kind})"})
        for stage in ours:
            name = stage["name"]
            loaded = load_pretrained(str(artifacts[name]), cpu, dtype="auto")
            path = write_gguf(loaded.model, loaded.tokenizer, artifacts[name], tmp / f"{name}.gguf", {}, name)
            method = name.split("_", 1)[0]
            if method == "llamacpp":  # llama.cpp's rung again, its imatrix written by our calibration pass
                rung = stage["llamacpp"]["type"]
                files[f"llamacpp_our_imatrix/{rung}"] = (rung, path, {"name": f"llama.cpp {rung} (our imatrix)"})
                continue
            rung = (stage.get("qat") or stage["quantize"])["mix"]
            extra = {"name": f"ours {LABELS[method]} {rung}", "method": method, "mix": rung}
            if method == "qat":
                extra["name"] = f"ours {LABELS[method]} {rung}, lr {stage['qat']['lr']:g}"
                extra["qat"] = {k: stage["qat"][k] for k in ("steps", "batch_size", "lr", "loss")}
                info = json.loads((artifacts[name] / "stage.json").read_text())["info"]
                extra["qat"] |= {k: info.get(k) for k in ("first_loss", "final_loss", "train_seconds")}
            files[f"ours/{name}"] = (rung, path, extra)
        if "Q8_0" in rungs:  # the floor: Q8_0's weights in F32, llama.cpp's arithmetic without its 8-bit rounding
            q8 = TeacherSpec.model_validate(f"gguf:{files['llamacpp/Q8_0'][1]}")
            floor = load_teacher(q8, cpu)
            options = {"weights": "f32", "embeddings": "f32"}
            path = write_gguf(floor.model, floor.tokenizer, q8.folder(), tmp / "floor.gguf", options, "floor")
            files["floor"] = ("Q8_0", path, {"name": "llama.cpp Q8_0's weights as F32"})

        def row(path: Path, extra: dict) -> dict:
            from gguf import GGUFReader

            logits = LlamaCppLogits(path, n_ctx=513, threads=THREADS)
            got = scored(logits, teacher.model, windows, 1)
            logits.close()
            types: dict[str, int] = {}
            weights = 0
            for t in GGUFReader(path).tensors:
                if len(t.shape) == 2:
                    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
                    weights += int(t.n_elements)
            size = path.stat().st_size
            return {
                **extra,
                "bytes": size,
                "bits_per_weight": 8 * size / weights,
                "ppl": got["heldout_ppl"],
                "kl_to_float": got["teacher_kl"],
                "top1": got["top1_agreement"],
                "types": types,
            }

        rows = {}
        for key, (_, path, extra) in files.items():
            rows[key] = row(path, extra)
            print(key, {k: rows[key][k] for k in ("bytes", "ppl", "kl_to_float", "top1")}, flush=True)
            group, _, rung = key.partition("/")
            if group == "llamacpp_our_imatrix" and f"llamacpp/{rung}" in files:
                rows[key]["same_bytes_as_llama_imatrix"] = same_bytes(path, files[f"llamacpp/{rung}"][1])
        float_ppl = scored(teacher.model, None, windows, 1)["heldout_ppl"]

        latency = LatencySpec(
            prompt_tokens=32, new_tokens=48, batch_sizes=[1], warmup=1, repeats=args.rounds, threads=THREADS
        )
        sessions, control = {}, {}
        for rung in dict.fromkeys(r for r, _, _ in files.values()):
            paths = {k: p for k, (r, p, _) in files.items() if r == rung}
            if f"llamacpp/{rung}" in paths:  # the noise control: llama.cpp's file again, byte for byte
                paths["copy"] = tmp / f"copy-{rung}.gguf"
                shutil.copyfile(paths[f"llamacpp/{rung}"], paths["copy"])
            timed = [Timed(k, k, lambda p=p: LlamaCppRunner(p, THREADS, 128, 1 << 30)) for k, p in paths.items()]
            timing = time_models(timed, windows.flatten(), latency, cpu)
            for key, figures in timing["models"].items():
                if key != "copy":
                    rows[key].update(ms_per_token=figures["decode_ms_per_token"], ms_range=figures["decode_ms_range"])
            if "copy" in paths:
                copy_ms = timing["models"]["copy"]["decode_ms_per_token"]
                control[rung] = copy_ms / rows[f"llamacpp/{rung}"]["ms_per_token"]
                paths["copy"].unlink()
            sessions[rung] = timing["session"]

    out = {
        "model": what,
        "command": shlex.join(["python", "bench/ladder.py", *sys.argv[1:]]),
        "tokens": int(windows[:, 1:].numel()),
        "threads": THREADS,
        "float": {"ppl": float_ppl},
        "calibration": "64 x 512 tokens of WikiText-2 valid, for llama-imatrix and for our stages",
        "llamacpp": {k.split("/")[1]: r for k, r in rows.items() if k.startswith("llamacpp/")},
        "llamacpp_no_imatrix": {k.split("/")[1]: r for k, r in rows.items() if k.startswith("llamacpp_no_imatrix/")},
        "llamacpp_our_imatrix": {k.split("/")[1]: r for k, r in rows.items() if k.startswith("llamacpp_our_imatrix/")},
        "ours": [r for k, r in rows.items() if k.startswith("ours/")],
        "floor": rows.get("floor"),
        "release": rows["release"],
        "timing": {
            "order": "per rung: its files together in interleaved rounds, with a byte-identical copy of llama.cpp's "
            "imatrix file as the noise control",
            "copy_ms_ratio": control,
            "sessions": sessions,
        },
        "load_average": load_average(),
    }
    out["against_rungs"] = against_rungs(out)
    save(report, out, markdown(out))
    plot(out, REPORTS / f"{report}.png")
    print(markdown(out))


def same_bytes(a: Path, b: Path) -> float:
    """Share of the quantized matrices' bytes two GGUF files of one model hold alike."""
    import numpy as np
    from gguf import GGUFReader

    theirs = {t.name: t for t in GGUFReader(b).tensors}
    same = total = 0
    for t in GGUFReader(a).tensors:
        if len(t.shape) == 2 and t.tensor_type.name not in ("F32", "F16"):
            other = theirs[t.name]
            x, y = np.asarray(t.data).view(np.uint8).ravel(), np.asarray(other.data).view(np.uint8).ravel()
            same += int((x == y).sum()) if x.shape == y.shape else 0
            total += x.size
    return same / total


def markdown(out: dict) -> str:
    lines = [
        f"# llama.cpp's ladder and ours: {out['model']}",
        "",
        f"Regenerate: `{out['command']}` (2 CPU threads). Every file scored in llama.cpp on the same "
        f"{out['tokens']:,} WikiText-2 test tokens; KL and top-1 against the float model in torch "
        f"(perplexity {out['float']['ppl']:.2f}); decode timed a rung at a time, its files together in "
        "interleaved rounds (min over the rounds, range). "
        f"Calibration: {out['calibration']}.",
        "",
        "| file | bytes | bits/weight | ppl | Δ ppl | mean KL | top-1 | decode ms/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    every = [r for g in ("llamacpp", "llamacpp_no_imatrix", "llamacpp_our_imatrix") for r in out[g].values()]
    every += out["ours"]
    every += [out[k] for k in ("floor", "release") if out.get(k)]
    for r in sorted(every, key=lambda r: (-r["bytes"], r["kl_to_float"])):
        ms = f"{r['ms_per_token']:.1f} ({r['ms_range'][0]:.1f}–{r['ms_range'][1]:.1f})" if "ms_per_token" in r else ""
        lines.append(
            f"| {r['name']} | {r['bytes'] / 1e6:.1f} M | {r['bits_per_weight']:.2f} | {r['ppl']:.2f} | "
            f"{100 * (r['ppl'] / out['float']['ppl'] - 1):+.1f}% | {r['kl_to_float']:.4f} | {r['top1']:.3f} | {ms} |"
        )
    lines += [
        "",
        "Ours against each imatrix rung: the lowest-KL file of ours no bigger than it, KL as a share of the "
        "rung's (targets: ≤ 0.7× with GPTQ, ≤ 0.5× with QAT at 4.x bits and below; ≤ 1.0× above).",
        "",
        "| rung | ours | KL ratio | by method | decode ms, our slowest file of its types / its | its copy / it |",
        "|---|---|---|---|---|---|",
    ]
    for rung, b in out["against_rungs"].items():
        methods = ", ".join(f"{LABELS[m]} {x:.2f}×" for m, x in b["kl_ratio_by_method"].items())
        ms = f"{b['ms_ratio_same_types']:.2f}×" if "ms_ratio_same_types" in b else "none of ours"
        copy = f"{b['ms_ratio_copy']:.2f}×" if "ms_ratio_copy" in b else ""
        lines.append(f"| {rung} | {b['ours']} | {b['kl_ratio']:.2f}× | {methods} | {ms} | {copy} |")
    for rung, b in out["against_rungs"].items():
        if "release_kl" in b:
            r = out["llamacpp"][rung]
            lines += [
                "",
                f"{rung} holds the release file's own types, and the float model is that file dequantized: scored "
                f"as it is, the release has KL {b['release_kl']:.4f}, llama.cpp's arithmetic on these types with "
                f"no weight error at all, against llama.cpp's {rung} at {r['kl_to_float']:.4f} and {b['ours']} at "
                f"{b['kl_ratio'] * r['kl_to_float']:.4f}: files of these types that sit at that floor differ by the "
                "runtime's rounding of activations, not by their quantizer.",
            ]
    qat = [r for r in out["ours"] if r["method"] == "qat" and "final_loss" in r["qat"]]
    if qat:
        lines += [
            "",
            "QAT's training (its KD loss on its own batches; the first is GPTQ's solution's, before any step):",
            "",
        ]
        for r in sorted(qat, key=lambda r: (r["mix"], -r["qat"]["lr"])):
            q = r["qat"]
            start = "(not recorded)" if q["first_loss"] is None else f"{q['first_loss']:.4f}"
            lines.append(
                f"- {r['name']}: {q['steps']} steps of batch {q['batch_size']}, KD loss {start} → "
                f"{q['final_loss']:.4f} (the last tenth's mean), {q['train_seconds'] / 60:.0f} min; "
                f"held-out KL {r['kl_to_float']:.4f}"
            )
    if out["llamacpp_our_imatrix"]:
        lines += [
            "",
            "llama-quantize with the importance matrix our calibration pass writes (compressor/ggml/imatrix.py) "
            "against the one `llama-imatrix` computes on the same text:",
            "",
            "| rung | KL, llama-imatrix's | KL, ours | quantized bytes alike |",
            "|---|---|---|---|",
        ]
        for rung, r in out["llamacpp_our_imatrix"].items():
            theirs = out["llamacpp"].get(rung)
            if theirs:
                lines.append(
                    f"| {rung} | {theirs['kl_to_float']:.4f} | {r['kl_to_float']:.4f} | "
                    f"{100 * r['same_bytes_as_llama_imatrix']:.2f}% |"
                )
    lines += ["", "Types per file (matrices):", ""]
    for r in every:
        lines.append(f"- {r['name']}: " + ", ".join(f"{k} ×{v}" for k, v in sorted(r["types"].items())))
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = {
        "llama.cpp, imatrix": list(out["llamacpp"].values()),
        "llama.cpp, no imatrix": list(out["llamacpp_no_imatrix"].values()),
        "llama.cpp, our imatrix": list(out["llamacpp_our_imatrix"].values()),
        **{f"ours, {LABELS[m]}": [r for r in out["ours"] if r["method"] == m] for m in ("qat", "gptq", "rtn")},
    }
    for (label, rows), marker in zip(groups.items(), "osxP*D^"):
        if not rows:
            continue
        pts = sorted((r["bytes"] / 1e6, r["kl_to_float"]) for r in rows)
        frontier, best = [], float("inf")
        for x, y in pts:
            if y < best:
                frontier.append((x, y))
                best = y
        ax.scatter(*zip(*pts), marker=marker, label=label)
        ax.plot(*zip(*frontier), alpha=0.5)
    if out.get("floor"):
        ax.axhline(out["floor"]["kl_to_float"], color="grey", linestyle=":", label="floor: Q8_0's weights as F32")
    if out.get("release"):
        r = out["release"]
        ax.scatter([r["bytes"] / 1e6], [r["kl_to_float"]], marker="v", color="black", label=r["name"])
    qat = [r for r in out["ours"] if r["method"] == "qat"]
    for r in qat if len({r["qat"]["lr"] for r in qat}) > 1 else []:  # a sweep: which point is which lr
        point = (r["bytes"] / 1e6, r["kl_to_float"])
        ax.annotate(f"lr {r['qat']['lr']:g}", point, xytext=(6, -3), textcoords="offset points", fontsize=8)
    for r in list(out["llamacpp"].values()):
        ax.annotate(r["name"].replace("llama.cpp ", "").replace(" (imatrix)", ""), (r["bytes"] / 1e6, r["kl_to_float"]))
    ax.set_yscale("log")
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    lo, hi = ax.get_xlim()  # a single rung's files differ by bytes: show MB, not an offset
    middle, half = (lo + hi) / 2, max(hi - lo, 0.04 * (lo + hi) / 2) / 2
    ax.set_xlim(middle - half, middle + half)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL to the float model (log)")
    ax.set_title(out["model"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
