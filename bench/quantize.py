"""Quantization: quality of every method × bits, RTN vs GPTQ, PTQ vs QAT, and decode speed.

    python bench/quantize.py [--teachers builtin,stories260k] [--skip-quality] [--skip-speed]

Quality: for each teacher, one recipe per method (teacher -> quantize or qat) through the
pipeline; held-out perplexity and KL to the fp32 model. QAT trains QAT_STEPS × batch 8 blocks;
GPTQ calibrates on the same number of blocks (equal data).
Speed: a ~100M-parameter Llama shape with random weights, decode ms/token at batch 1 and
tokens/s at batch 8, fp32 vs each CPU kernel, 2 threads, side by side in one process, with the
memory-bandwidth roofline. `torch quantize_dynamic` is timed as a reference kernel: it is not a
from_pretrained format (re-applied at load), so the pipeline does not store it.
Writes reports/quantize.json and reports/quantize.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import yaml
from _reports import LLAMA_100M, REPORTS, SHARED, available, prepare, save

QAT_STEPS = 60
SPEED_SHAPE = LLAMA_100M

TEACHERS = {
    "builtin": {
        "teacher": "builtin:tiny-stdlib",
        "data": {"train": "builtin:stdlib-text", "seq_len": 256},
        "group": 64,
        "bnb4": True,
    },
    # hidden 64 and intermediate 172 = 4 × 43: no group size ≥ 8 divides both, so one scale per
    # row; bnb 4-bit needs widths divisible by 64 and cannot run
    "stories260k": {
        "teacher": f"llama2c:{SHARED / 'stories260K' / 'stories260K.bin'}",
        "data": {"train": str(SHARED / "tinystories" / "tinystories_val.txt"), "seq_len": 256},
        "group": None,
        "bnb4": False,
    },
}


def methods(setup: dict) -> dict[str, dict]:
    g = setup["group"]
    calib = {"samples": QAT_STEPS * 8, "batch_size": 8}
    out = {
        "int8_rtn": {"quantize": {"method": "rtn", "bits": 8, "group_size": None}},
        "int8_gptq": {"quantize": {"method": "gptq", "bits": 8, "group_size": None, "calibration": calib}},
        "int8_dynamic_rtn": {"quantize": {"method": "rtn", "bits": 8, "group_size": None, "activations": "int8"}},
        "int8_bnb": {"quantize": {"method": "bnb", "bits": 8, "group_size": None}},
        "int4_rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": g}},
        "int4_gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": g, "calibration": calib}},
        "int4_gptq_act_order": {
            "quantize": {"method": "gptq", "bits": 4, "group_size": g, "act_order": True, "calibration": calib}
        },
        "int4_qat": {
            "qat": {
                "bits": 4,
                "group_size": g,
                "steps": QAT_STEPS,
                "batch_size": 8,
                "lr": 5.0e-4,
                "warmup": 0.1,
                "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0},
                "checkpoint_every": 1000,
            }
        },
    }
    if setup["bnb4"]:
        out["int4_bnb_nf4"] = {"quantize": {"method": "bnb", "bits": 4, "format": "nf4"}}
    return out


def quality(name: str, setup: dict) -> dict:
    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage in methods(setup).items():
            recipe = {
                "name": f"quantize-{name}",
                "seed": 0,
                "teacher": setup["teacher"],
                "data": setup["data"],
                "stages": [stage],
                "eval": {"tasks": [], "latency": {"enabled": False}, "fidelity": {"samples": 64, "batch_size": 8}},
            }
            path = Path(tmp) / "r.yaml"
            path.write_text(yaml.safe_dump(recipe))
            teacher, stage_rec = run(load_recipe(path), Path(tmp) / "out")["stages"]
            m = stage_rec["metrics"]
            rows["fp32"] = {"ppl": teacher["metrics"]["heldout_ppl"], "kl": 0.0, "bits_per_param": 32.0}
            rows[label] = {
                "ppl": m["heldout_ppl"],
                "kl": m["teacher_kl"],
                "bits_per_param": m["bits_per_param"],
                "bytes": m["bytes"],
                "kernel": m["kernel"],
                "seconds": stage_rec.get("build_seconds"),
            }
            print(f"{name} {label}: ppl {m['heldout_ppl']:.3f} KL {m['teacher_kl']:.5f}", flush=True)
    return rows


def speed() -> dict:
    """Decode speed of a ~100M-parameter Llama shape, fp32 vs every CPU kernel we can load, all
    timed together in interleaved rounds (min over the rounds, with their range)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.latency import LatencySpec, Timed, TorchRunner, bytes_per_decoded_token, time_models
    from compressor.quantized import bnb_config, kernel, requantize, rtn_codes, torchao_config
    from compressor.stages.quantize import Config

    torch.manual_seed(0)
    cfg = LlamaConfig(**SPEED_SHAPE, max_position_embeddings=512, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in base.parameters())
    spec = LatencySpec(prompt_tokens=64, new_tokens=32, batch_sizes=[1, 8], warmup=1, repeats=5, threads=2)
    prompt = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def dynamic_qint8(model):
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def _torchao(model, folder, c):
        return requantize(copy.deepcopy(model), folder, torchao_config(c), cpu, rtn_codes(model, c))

    variants = {
        "fp32": lambda d: copy.deepcopy(base),
        "int8_torchao_weight_only": lambda d: _torchao(base, d, Config(method="rtn", bits=8, group_size=None)),
        "int8_torchao_dynamic": lambda d: _torchao(
            base, d, Config(method="rtn", bits=8, group_size=None, activations="int8")
        ),
        "int8_bnb": lambda d: requantize(
            copy.deepcopy(base), d, bnb_config(Config(method="bnb", bits=8, group_size=None)), cpu
        ),
        "int8_torch_quantize_dynamic (reference, not stored)": lambda d: dynamic_qint8(copy.deepcopy(base)),
        "int4_torchao_g64": lambda d: _torchao(base, d, Config(method="rtn", bits=4, group_size=64)),
        "int4_bnb_nf4": lambda d: requantize(copy.deepcopy(base), d, bnb_config(Config(method="bnb", bits=4)), cpu),
    }
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models = {label: make(Path(tmp) / str(i)) for i, (label, make) in enumerate(variants.items())}
        timing = time_models([Timed(k, k, lambda m=m: TorchRunner(m, 0)) for k, m in models.items()], prompt, spec, cpu)
    out = {"device": "cpu (2 threads)", "params": params, "timing": timing["session"], "runs": {}}
    for label, model in models.items():
        t = timing["models"][label]
        read = bytes_per_decoded_token(model, 64 + 16)
        if "reference" in label:  # its packed int8 weights are not parameters: same bytes as int8 rows
            read = bytes_per_decoded_token(models["int8_torchao_weight_only"], 64 + 16)
        out["runs"][label] = {
            "kernel": kernel(model) if "reference" not in label else "torch dynamic qint8 (fbgemm)",
            "ms_per_token": t["decode_ms_per_token"],
            "ms_per_token_range": t["decode_ms_range"],
            "tokens_per_s_batch8": t["tokens_per_s_by_batch"]["8"],
            "bytes_per_token": read,
            "roofline_ms_per_token": 1e3 * read / (t["bandwidth_gb_s"] * 1e9),
        }
        print(label, out["runs"][label], flush=True)
    out["bandwidth_gb_s"] = timing["models"]["fp32"]["bandwidth_gb_s"]
    runs = out["runs"]
    fp32 = runs["fp32"]["ms_per_token"]
    for r in runs.values():
        r["speedup"] = fp32 / r["ms_per_token"]
        r["roofline_fraction"] = r["roofline_ms_per_token"] / r["ms_per_token"]

    def best(prefix):
        label = min((k for k in runs if k.startswith(prefix)), key=lambda k: runs[k]["ms_per_token"])
        return {"method": label, **runs[label]}

    out.update(
        fp32_ms_per_token=fp32,
        best_int8=best("int8"),
        best_int4=best("int4"),
        roofline_fraction_fp32=runs["fp32"]["roofline_fraction"],
        roofline_fraction_int8=best("int8")["roofline_fraction"],
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teachers", default="builtin,stories260k")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    prepare()

    path = REPORTS / "quantize.json"  # a partial rerun (--skip-speed) keeps the other figures
    report = json.loads(path.read_text()) if path.is_file() else {}
    if not args.skip_quality:
        for name, setup in available(args.teachers, TEACHERS):
            rows = quality(name, setup)
            fp32 = rows["fp32"]["ppl"]
            gap = lambda k: rows[k]["ppl"] - fp32  # noqa: E731
            report[name] = {
                "fp32_ppl": fp32,
                "int8_ppl": min(rows[k]["ppl"] for k in rows if k.startswith("int8")),
                "int4_rtn_ppl": rows["int4_rtn"]["ppl"],
                "int4_gptq_ppl": rows["int4_gptq"]["ppl"],
                "qat_int4_ppl": rows["int4_qat"]["ppl"],
                "int4_gptq_change": gap("int4_gptq") / fp32,
                "qat_closes_of_rtn_gap": 1 - gap("int4_qat") / gap("int4_rtn"),
                "qat_closes_of_gptq_gap": 1 - gap("int4_qat") / gap("int4_gptq"),
                "group_size": TEACHERS[name]["group"],
                "equal_data_blocks": QAT_STEPS * 8,
                "runs": rows,
            }
    if not args.skip_speed:
        report["speed"] = speed()
    save("quantize", report, markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Quantization",
        "",
        "Regenerate: `python bench/quantize.py` (2 CPU threads). Held-out token perplexity; KL(fp32 ‖ quantized)"
        " per token on held-out text; bits/param = bytes on disk × 8 / parameters (embeddings stay fp32).",
        "",
    ]
    for name, row in report.items():
        if name == "speed":
            continue
        lines += [
            f"## {name} (group size {row['group_size'] or 'per channel'})",
            "",
            "| method | held-out ppl | Δ vs fp32 | KL to fp32 | bits/param | kernel |",
            "|---|---|---|---|---|---|",
        ]
        fp32 = row["fp32_ppl"]
        for label, r in row["runs"].items():
            lines.append(
                f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp32 - 1):+.2f}% | {r['kl']:.5f} | "
                f"{r['bits_per_param']:.2f} | {r.get('kernel', 'dense float32')} |"
            )
        lines += [
            "",
            f"QAT ({QAT_STEPS} steps × 8 blocks) vs GPTQ calibrated on the same {row['equal_data_blocks']} blocks: "
            f"QAT closes {100 * row['qat_closes_of_rtn_gap']:.0f}% of RTN INT4's gap and "
            f"{100 * row['qat_closes_of_gptq_gap']:.0f}% of GPTQ INT4's.",
            "",
        ]
    if "speed" in report:
        s = report["speed"]
        lines += [
            f"## Decode speed: {s['params'] / 1e6:.0f}M-parameter Llama shape, {s['device']}",
            "",
            f"Measured copy bandwidth {s['bandwidth_gb_s']:.1f} GB/s. Roofline = bytes read per token / bandwidth.",
            "",
            "| kernel | ms/token @1 | × fp32 | tokens/s @8 | roofline ms/token | fraction of roofline |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in s["runs"].items():
            lines.append(
                f"| {label}: {r['kernel']} | {r['ms_per_token']:.1f} | {r['speedup']:.2f} | "
                f"{r['tokens_per_s_batch8']:.1f} | {r['roofline_ms_per_token']:.1f} | {r['roofline_fraction']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
