"""Deployed as llama.cpp runs it: our integer codes as GGUF vs llama.cpp's own quantizer, against
torch fp32 of the same float model, side by side in one run on one machine.

    python bench/deploy.py [--model smollm2-135m-instruct|gemma3-270m] [--windows 8] [--rounds 9]
                           [--qat-steps N] [--qat-lr LR] [--fidelity-only]

The float model is SmolLM2-135M-Instruct (`gguf:smollm2-135m-instruct`, its Q4_1 release
dequantized; writes reports/deploy.{json,md}) or Gemma 3 270M (`gguf:gemma3-270m`, its Q4_K_M
release dequantized; writes reports/deploy_gemma3.{json,md}, every window starting with BOS as
the family needs). Rows:
- torch_fp32: the float model in transformers;
- llamacpp_q8_0 / llamacpp_q4_0: the float model written as F32 GGUF, then quantized by
  llama.cpp itself (`llama_model_quantize`, round to nearest);
- ours_q8_0 / ours_q4_0: `quantize` stages (GPTQ, INT8 per row / INT4 per 32 columns) exported
  with their own integers (`compressor export --format gguf`);
- ours_qat_q4_0: a `qat` stage on the INT4 grid, started from GPTQ's solution (`init: gptq`) and
  distilled from the float model, exported alike.
Every GGUF keeps the token embeddings in Q8_0 (llama.cpp's quantizer is told the same), so files
differ only in their Linear weights. Perplexity, KL to the float model and top-1 agreement use
the same WikiText-2 test token ids for every row; decode ms/token is batch 1 greedy after a
32-token prompt, all models timed together in interleaved rounds at 2 threads (min over the
rounds, range beside it). The roofline fraction is (bytes read per token / measured copy
bandwidth) / measured ms; the compute bound is 2 FLOP per weight at the measured fp32 matrix
throughput of these threads, a rough stand-in for llama.cpp's int8 dot products: which one binds
is the larger. Scores are made a slice of positions at a time (Gemma's 262k-vocabulary logits
would not fit whole).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _reports import REPORTS, build_on_wikitext, load_average, prepare, save

THREADS = 2
CALIBRATION = {"calibration": {"samples": 64, "batch_size": 4}}
# teacher name -> (what it is, the report it writes, QAT steps and lr by default). A Gemma 3 270M KD step
# costs ~4x SmolLM2's on 2 cores (its 262k-vocabulary head is most of the model), and one AdamW step at
# SmolLM2's 2e-4 wrecks it (held-out KL 0.45 -> 3.98 for the pruned model of stacks/gemma3.yaml; 5e-6: 0.41)
MODELS = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (GGUF Q4_1 release, dequantized to fp32)", "deploy", 80, 2.0e-4),
    "gemma3-270m": (
        "Gemma 3 270M (GGUF Q4_K_M release, dequantized to fp32; Gemma Terms of Use)",
        "deploy_gemma3",
        20,
        5.0e-6,
    ),
}


def stages(qat_steps: int, qat_lr: float) -> list[dict]:
    return [
        {"name": "q4", "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, **CALIBRATION}},
        {"name": "q8", "quantize": {"method": "gptq", "bits": 8, "group_size": None, "act_order": True, **CALIBRATION}},
        {
            "name": "qat4",
            "qat": {
                "bits": 4,
                "group_size": 32,
                "init": "gptq",
                **CALIBRATION,
                "steps": qat_steps,
                "batch_size": 4,
                "lr": qat_lr,
                "warmup": 0.1,
                "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0},
                "checkpoint_every": 10,
            },
        },
    ]


def llamacpp_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's own round-to-nearest quantizer, token embeddings kept Q8_0 like ours."""
    import llama_cpp

    from compressor.runtimes.llamacpp import mute

    mute()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst.name}")
    return dst


def compute_flops(threads: int) -> float:
    """Peak fp32 multiply-add throughput of these threads: a cache-resident 512³ matrix product
    (a decode's matrix-vector products are bound by memory well before this)."""
    import torch

    from compressor.latency import threads as fixed

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with fixed(threads):
        for _ in range(5):
            a @ b
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * 512**3 / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=list(MODELS), default="smollm2-135m-instruct")
    p.add_argument("--windows", type=int, default=8, help="512-token WikiText-2 test windows scored")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--qat-steps", type=int, default=None, help="default: 80 for SmolLM2, 20 for Gemma 3")
    p.add_argument("--qat-lr", type=float, default=None, help="default: 2e-4 for SmolLM2, 5e-6 for Gemma 3")
    p.add_argument("--generate", type=int, default=64, help="greedy tokens per prompt (4 prompts)")
    p.add_argument(
        "--fidelity-only",
        action="store_true",
        help="measure only the greedy fidelity figures and merge them into the existing report",
    )
    args = p.parse_args()
    what, report, default_steps, default_lr = MODELS[args.model]
    args.qat_steps = default_steps if args.qat_steps is None else args.qat_steps
    args.qat_lr = default_lr if args.qat_lr is None else args.qat_lr
    prepare(THREADS)
    import torch

    from compressor.exporters.gguf import write_gguf
    from compressor.latency import LatencySpec, Timed, TorchRunner, time_models
    from compressor.measure import fidelity as scored
    from compressor.models import load_pretrained
    from compressor.runtimes.llamacpp import LlamaCppLogits, LlamaCppRunner, gguf_kernel
    from compressor.teachers import TeacherSpec

    cpu = torch.device("cpu")
    spec = TeacherSpec.model_validate(f"gguf:{args.model}")
    built = stages(args.qat_steps, args.qat_lr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts, teacher, windows = build_on_wikitext("deploy", args.model, built, args.windows, tmp)
        files = {
            f"float_{kind}": write_gguf(
                teacher.model,
                teacher.tokenizer,
                spec.folder(),
                tmp / f"{kind}.gguf",
                {"weights": kind, "embeddings": kind},
                kind,
            )
            for kind in ("f32", "f16")
        }
        ours = (("ours_q8_0", "q8"), ("ours_q4_0", "q4"), ("ours_qat_q4_0", "qat4"))
        if args.fidelity_only:
            ours = ours[:1]
        else:
            files["llamacpp_q8_0"] = llamacpp_quantize(files["float_f32"], tmp / "lc-q8.gguf", "q8_0")
            files["llamacpp_q4_0"] = llamacpp_quantize(files["float_f32"], tmp / "lc-q4.gguf", "q4_0")
        for row, ordering in ours:
            loaded = load_pretrained(str(artifacts[ordering]), cpu, dtype="auto")
            if row == "ours_q8_0":
                ours8 = loaded.model  # kept for the greedy fidelity check below
            files[row] = write_gguf(
                loaded.model,
                loaded.tokenizer,
                artifacts[ordering],
                tmp / f"{row}.gguf",
                {"weights": "auto", "embeddings": "q8_0"},
                row,
            )
        fidelity = greedy_fidelity(
            ours8,
            teacher.model,
            files,
            [w[:32].tolist() for w in windows[:4]],
            args.generate,
            teacher.tokenizer.eos_token_id,
        )
        if args.fidelity_only:
            out = json.loads((REPORTS / f"{report}.json").read_text())
            out.update(fidelity)
            out["fidelity_measured_apart"] = {"date": time.strftime("%Y-%m-%d"), "load_average": load_average()}
            save(report, out, markdown(out, args.model))
            print(markdown(out, args.model))
            return

        def quality(logits) -> dict:
            """Perplexity, KL to the float model and top-1 agreement on the same token ids for every row."""
            got = scored(logits, teacher.model, windows, 1)
            return {
                "ppl": got["heldout_ppl"],
                "kl_to_float": got["teacher_kl"],
                "top1_agreement": got["top1_agreement"],
                "tokens": got["heldout_tokens"],
            }

        out = {"model": what, "threads": THREADS}
        qat = next(s["qat"] for s in built if "qat" in s)
        out["qat"] = {k: qat[k] for k in ("init", "steps", "batch_size", "lr", "loss")}
        float_bytes = sum(p.numel() * p.element_size() for p in teacher.model.parameters())
        out["torch_fp32"] = {**quality(teacher.model), "bytes": float_bytes}
        out["heldout_check"] = independent_check(teacher, windows, out["torch_fp32"]["ppl"])
        for row, path in files.items():
            logits = LlamaCppLogits(path, n_ctx=513, threads=THREADS)
            out[row] = {**quality(logits), "bytes": path.stat().st_size, "kernel": gguf_kernel(path)}
            logits.close()
            print(row, out[row], flush=True)

        # speed: every row timed together, interleaved
        latency = LatencySpec(
            prompt_tokens=32, new_tokens=48, batch_sizes=[1], warmup=1, repeats=args.rounds, threads=THREADS
        )
        timed = [Timed("torch_fp32", "torch fp32", lambda: TorchRunner(teacher.model, teacher.tokenizer.eos_token_id))]
        timed += [
            Timed(r, r, lambda p=p: LlamaCppRunner(p, THREADS, 128, 1 << 30))
            for r, p in files.items()
            if r != "float_f32"
        ]
        timing = time_models(timed, windows.flatten(), latency, cpu)
        out["timing"] = timing["session"]
        bandwidth = timing["models"]["torch_fp32"]["bandwidth_gb_s"] * 1e9
        flops = compute_flops(THREADS)
        out["bandwidth_gb_s"] = bandwidth / 1e9
        out["compute_gflop_s"] = flops / 1e9
        params = sum(p.numel() for p in teacher.model.parameters())
        for row, figures in timing["models"].items():
            ms = figures["decode_ms_per_token"]
            memory_ms = 1e3 * figures["bytes_per_token"] / bandwidth
            compute_ms = 1e3 * 2 * params / flops
            out[row].update(
                ms_per_token=ms,
                ms_range=figures["decode_ms_range"],
                bytes_per_token=figures["bytes_per_token"],
                roofline_ms_per_token=memory_ms,
                compute_bound_ms_per_token=compute_ms,
                binds="memory" if memory_ms >= compute_ms else "compute",
                roofline_fraction=max(memory_ms, compute_ms) / ms,
                speedup_vs_torch_fp32=timing["models"]["torch_fp32"]["decode_ms_per_token"] / ms,
            )

        # size: our INT4 Linear weights
        from gguf import GGUFReader

        q4 = [t for t in GGUFReader(files["ours_q4_0"]).tensors if t.tensor_type.name == "Q4_0"]
        out["int4_linear_bits_per_param"] = 8 * sum(int(t.n_bytes) for t in q4) / sum(int(t.n_elements) for t in q4)
        out["total_bits_per_param_ours_q4_0"] = 8 * out["ours_q4_0"]["bytes"] / params
        out["embeddings"] = "Q8_0 in every quantized GGUF row (round to nearest, llama.cpp's rule); float_f16 keeps F16"

        out.update(fidelity)
        out["load_average"] = load_average()
    for name in ("float_f16", "ours_q4_0", "ours_q8_0", "ours_qat_q4_0", "llamacpp_q4_0", "llamacpp_q8_0"):
        if name in out:
            out[name]["ppl_increase"] = out[name]["ppl"] / out["torch_fp32"]["ppl"] - 1
    save(report, out, markdown(out, args.model))
    print(markdown(out, args.model))


def independent_check(teacher, windows, ours: float) -> dict:
    """The float model's perplexity on the windows three ways: ours (the torch_fp32 row's, from our
    bounded scorer), transformers' own loss (labels = inputs), and (for a family that needs BOS) the
    same windows without their BOS."""
    import math

    import torch

    from compressor.families import sequence_bos
    from compressor.measure import fidelity

    with torch.no_grad():
        losses = [teacher.model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    out = {
        "ours": ours,
        "transformers_loss": math.exp(sum(losses) / len(losses)),
        "tokens": int(windows[:, 1:].numel()),
    }
    bos = sequence_bos(teacher.model.config, teacher.tokenizer)
    if bos is not None:  # the same text from its second token: what a BOS-less block scores
        out["without_bos"] = fidelity(teacher.model, None, windows[:, 1:], 1)["heldout_ppl"]
    return out


def greedy_fidelity(ours8, float_model, files: dict, prompts: list[list[int]], n: int, eos: int) -> dict:
    """Fidelity of the Q8_0 export: our torch INT8 artifact vs llama.cpp running its GGUF; control: the
    float model in torch vs its F32 GGUF in llama.cpp (what the two runtimes' arithmetic alone does)."""
    return {
        **greedy_match(ours8, files["ours_q8_0"], prompts, n, eos, "q8_0", self_free=True),
        **greedy_match(float_model, files["float_f32"], prompts, n, eos, "f32"),
    }


def greedy_match(
    model, gguf: Path, prompts: list[list[int]], n: int, eos: int, label: str, self_free: bool = False
) -> dict:
    """Greedy continuations of `model` in torch and of `gguf` in llama.cpp, compared three ways:
    position by position, up to their first difference, and step by step (each runtime fed the
    other's path so far: does it choose the token the other chose?). Free-running paths part for good
    at the first near-tie, so only the step-by-step figure counts how often the two disagree; the
    median log-probability gap of the disagreements says how near those ties were. llama.cpp is also
    checked against itself: its greedy path (one token per call) re-scored by its batched prompt path,
    another kernel on a quantized file, and with `self_free` also run free on that batched path (the
    whole sequence re-evaluated as one batch at every step). Both runtimes generate the full `n` tokens
    under one rule: end-of-text is never chosen (transformers' `min_new_tokens` masks it; llama.cpp's
    loop below and the step-by-step scores mask it too)."""
    import torch

    from compressor.runtimes.llamacpp import LlamaCppLogits, LlamaCppRunner

    runner = LlamaCppRunner(gguf, THREADS, 512, 1 << 30)
    scorer = LlamaCppLogits(gguf, n_ctx=max(map(len, prompts)) + n, threads=THREADS)
    matched = prefix = total = steps = self_steps = self_matched = 0
    gaps: list[float] = []
    for prompt in prompts:
        with torch.no_grad():
            mine = model.generate(
                torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos
            )[0, len(prompt) :].tolist()
        theirs = greedy(runner, prompt, n, eos)
        matched += sum(a == b for a, b in zip(mine, theirs))
        prefix += next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        total += len(mine)
        start = len(prompt) - 1
        with torch.no_grad():
            torch_on_theirs = model(input_ids=torch.tensor([prompt + theirs[:-1]])).logits[0, start:].float()
        llamacpp_on_mine = scorer(torch.tensor([prompt + mine[:-1]]))[0, start:]
        llamacpp_on_theirs = scorer(torch.tensor([prompt + theirs[:-1]]))[0, start:]
        llamacpp_on_theirs[:, eos] = float("-inf")
        self_steps += int((llamacpp_on_theirs.argmax(-1) == torch.tensor(theirs)).sum())
        if self_free:
            batched = greedy_batched(scorer, prompt, n, eos)
            self_matched += sum(a == b for a, b in zip(batched, theirs))
        for logits, path in ((torch_on_theirs, theirs), (llamacpp_on_mine, mine)):
            chosen = torch.tensor(path)[:, None]
            logits[:, eos] = float("-inf")
            lp = logits.log_softmax(-1)
            gap = lp.max(-1).values - lp.gather(-1, chosen)[:, 0]
            steps += int((lp.argmax(-1) == chosen[:, 0]).sum())
            gaps += gap[gap > 0].tolist()
    runner.close()
    scorer.close()
    return {
        f"{label}_greedy_match": matched / total,
        f"{label}_greedy_prefix_match": prefix / total,
        f"{label}_greedy_step_agreement": steps / (2 * total),
        f"{label}_greedy_disagreement_gap": statistics.median(gaps) if gaps else 0.0,
        f"{label}_llamacpp_self_agreement": self_steps / total,
        **({f"{label}_llamacpp_self_match": self_matched / total} if self_free else {}),
        "greedy_tokens": total,
    }


def greedy(runner, prompt: list[int], n: int, eos: int) -> list[int]:
    """llama.cpp's greedy continuation of `prompt`, `n` tokens, end-of-text masked as in torch."""
    import llama_cpp
    import numpy as np

    runner.prefill(prompt)
    tokens = []
    vocab = runner.llm.n_vocab()
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(runner.llm.ctx, -1), shape=(vocab,)).copy()
        logits[eos] = -np.inf
        tokens.append(int(logits.argmax()))
        runner.llm.eval([tokens[-1]])
    return tokens


def greedy_batched(scorer, prompt: list[int], n: int, eos: int) -> list[int]:
    """llama.cpp's greedy continuation with every step's logits from its batched path: the whole
    sequence so far evaluated afresh as one batch (no KV cache carried over)."""
    import torch

    tokens: list[int] = []
    for _ in range(n):
        scorer.llm.reset()
        logits = scorer(torch.tensor([prompt + tokens]))[0, -1]
        logits[eos] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens


def disagreements(out: dict, label: str) -> int:
    return round(2 * out["greedy_tokens"] * (1 - out[f"{label}_greedy_step_agreement"]))


def markdown(out: dict, model: str) -> str:
    qat = out["qat"]
    command = "python bench/deploy.py" + ("" if model == "smollm2-135m-instruct" else f" --model {model}")
    rows = ["torch_fp32", "float_f16", "llamacpp_q8_0", "ours_q8_0", "llamacpp_q4_0", "ours_q4_0", "ours_qat_q4_0"]
    rows = [r for r in rows if r in out]
    lines = [
        "# Deployed in llama.cpp: our codes vs llama.cpp's own quantizer",
        "",
        f"Regenerate: `{command}` ({out['threads']} threads, {out['model']}). Same WikiText-2 test "
        f"ids for every row ({out['torch_fp32']['tokens']} tokens); decode at batch 1, "
        f"{out['timing']['rounds']} interleaved rounds, load average {out['load_average'][0]} at the end. "
        "Embeddings Q8_0 in every "
        + (
            "quantized GGUF row (float_f16: the float model as F16, embeddings too)."
            if "float_f16" in out
            else "GGUF row."
        ),
        "",
        "| row | bytes | decode ms/tok (range) | × torch fp32 | ppl | Δ ppl | KL to float | top-1 | binds "
        "| roofline fraction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        r = out[name]
        lo, hi = r.get("ms_range", [r.get("ms_per_token")] * 2)
        lines.append(
            f"| {name} | {r['bytes']:,} | {r['ms_per_token']:.2f} "
            f"({lo:.2f}–{hi:.2f}) | {r.get('speedup_vs_torch_fp32', 1):.1f} | {r['ppl']:.2f} | "
            f"{100 * r.get('ppl_increase', 0):+.2f}% | {r['kl_to_float']:.4f} | {r['top1_agreement']:.3f} | "
            f"{r.get('binds', '–')} | {r.get('roofline_fraction', 0):.2f} |"
        )
    lines.append("")
    if check := out.get("heldout_check"):  # absent from reports made before it was measured
        without = check.get("without_bos")
        lines.append(
            f"- Float model's perplexity on these windows, scored independently: ours {check['ours']:.3f}, "
            f"transformers' own loss {check['transformers_loss']:.3f}"
            + (f"; without the BOS that starts each window {without:.1f} (the family needs it)." if without else ".")
        )
    lines += [
        f"- ours_qat_q4_0: QAT started from GPTQ's codes, {qat['steps']} steps × {qat['batch_size']} × 512 "
        f"WikiText-2 valid tokens at lr {qat['lr']:g}, {qat['loss']['divergence']} to the float model at "
        f"T = {qat['loss']['temperature']:g} (weight {qat['loss']['alpha']:g}).",
        f"- INT4 Linear weights: {out['int4_linear_bits_per_param']:.2f} bits/param; the whole Q4_0 file "
        f"{out['total_bits_per_param_ours_q4_0']:.2f} bits/param with Q8_0 embeddings.",
        "- Greedy output of our Q8_0 GGUF in llama.cpp vs our INT8 artifact in torch: "
        f"{100 * out['q8_0_greedy_match']:.1f}% of {out['greedy_tokens']} tokens equal position by position "
        f"({100 * out['q8_0_greedy_prefix_match']:.1f}% before the first difference). Control, the float model in "
        f"torch vs its F32 GGUF in llama.cpp: {100 * out['f32_greedy_match']:.1f}% "
        f"({100 * out['f32_greedy_prefix_match']:.1f}% before the first difference): what the two runtimes' "
        "arithmetic alone does to greedy paths on this text.",
        "- Step by step (each runtime fed the other's greedy path so far, both directions; "
        f"{2 * out['greedy_tokens']} choices): the Q8_0 pair choose the same next token "
        f"{100 * out['q8_0_greedy_step_agreement']:.1f}% of the time "
        f"({disagreements(out, 'q8_0')} disagreements, median log-probability gap "
        f"{out['q8_0_greedy_disagreement_gap']:.3f} between the token a runtime chose and the other's), the float "
        f"control {100 * out['f32_greedy_step_agreement']:.1f}% ({disagreements(out, 'f32')}, median gap "
        f"{out['f32_greedy_disagreement_gap']:.3f}). A free-running path parts for good at its first "
        "disagreement, so the position-by-position figure measures where that first one falls.",
        "- llama.cpp against itself: its greedy path (decoded one token per call) re-scored by its own batched "
        f"prompt path chooses the same tokens {100 * out['q8_0_llamacpp_self_agreement']:.1f}% of the time for the "
        f"Q8_0 file, {100 * out['f32_llamacpp_self_agreement']:.1f}% for the F32 file; run free on each path, its "
        f"two Q8_0 greedy paths are equal on {100 * out['q8_0_llamacpp_self_match']:.1f}% of the tokens. On the "
        "quantized file llama.cpp's own two kernel paths tip near-ties apart about as often as it and torch do."
        + (
            f" (Greedy figures measured apart on {out['fidelity_measured_apart']['date']}, load average "
            f"{out['fidelity_measured_apart']['load_average'][0]}: `{command} --fidelity-only`.)"
            if "fidelity_measured_apart" in out
            else ""
        ),
        f"- Memory bandwidth {out['bandwidth_gb_s']:.1f} GB/s (copy), fp32 matrix-vector "
        f"{out['compute_gflop_s']:.1f} GFLOP/s at these threads: the roofline fraction is the binding bound over "
        "the measured time.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
