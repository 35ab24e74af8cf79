"""GPU figures in one prepared run (bench/gpu.sh sets up the lent machine, then calls this).

    python bench/gpu.py [--device cuda] [--quick]

1. the GPU-marked tests (`pytest -m gpu`);
2. decode at batch 1 and tokens/s at batch 8 of a ~100M-parameter Llama shape: bf16 vs torchao
   INT8 weight-only vs torchao INT4 weight-only (tinygemm's tile-packed layout, in PyTorch's CUDA
   build: no extra kernel package), every model timed together in interleaved rounds (min over
   the rounds, range beside it);
3. an export of ours loaded with GPU kernels: a GPTQ INT4 stage written as compressed-tensors,
   loaded by transformers onto the GPU, its greedy tokens against the same stage on the CPU;
4. the quickstart on CUDA (fewer steps), its figures.
Each part records what ran, what failed and why, and its seconds; writes reports/gpu.json.
`--device cpu --quick` runs the same code on the CPU at toy sizes (parts 2-4), to check it here.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _reports import LLAMA_100M, ROOT, load_average, prepare, save

SHAPE = LLAMA_100M
TOY = {
    **SHAPE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def part(report: dict, name: str, fn) -> None:
    """Run one part; record its figures or the error, and its seconds."""
    start = time.time()
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as exc:  # a part that fails must not cost the others their figures
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    report[name]["seconds"] = round(time.time() - start, 1)
    print(name, json.dumps({k: v for k, v in report[name].items() if k != "trace"})[:600], flush=True)


def gpu_tests() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    return {"returncode": result.returncode, "summary": tail}


def kernels(device, quick: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.latency import LatencySpec, Timed, TorchRunner, time_models

    shape = TOY if quick else SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True)).eval()
    models, skipped = {"bf16" if device.type == "cuda" else "fp32": base.to(device, dtype)}, {}
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    for label, config in (
        ("int8_weight_only", Int8WeightOnlyConfig()),
        ("int4_weight_only", Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")),
    ):
        try:
            m = copy.deepcopy(base)
            quantize_(m, config, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
            models[label] = m
        except Exception as exc:  # e.g. no CPU kernel for torchao INT4
            skipped[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
    spec = LatencySpec(prompt_tokens=64, new_tokens=32, batch_sizes=[1, 8], warmup=2, repeats=5)
    prompt = torch.randint(0, shape["vocab_size"], (64,), generator=torch.Generator().manual_seed(0))
    timing = time_models([Timed(k, k, lambda m=m: TorchRunner(m, 0)) for k, m in models.items()], prompt, spec, device)
    rows = {
        k: {
            "decode_ms_per_token": f["decode_ms_per_token"],
            "decode_ms_range": f["decode_ms_range"],
            "tokens_per_s_batch8": f["tokens_per_s_by_batch"]["8"],
            "roofline_ms_per_token": f["roofline_ms_per_token"],
            "bandwidth_gb_s": f["bandwidth_gb_s"],
        }
        for k, f in timing["models"].items()
    }
    params = sum(p.numel() for p in base.parameters())
    return {"params": params, "rows": rows, "skipped": skipped, "timing": timing["session"]}


def exports(device, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.exporters import export
    from compressor.models import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = quickstart_run(tmp, "cpu", steps=4 if quick else 20, gptq_group=32)
        record = json.loads((run_dir / "run.json").read_text())
        export(run_dir, tmp / "ct", fmt="compressed-tensors")
        gpu = AutoModelForCausalLM.from_pretrained(tmp / "ct", dtype=torch.float16 if device.type == "cuda" else None)
        gpu = gpu.to(device).eval()
        cpu = load_pretrained(record["stages"][-1]["artifact"], torch.device("cpu"), dtype="auto").model
        ids = torch.tensor([[5, 9, 33, 2, 17, 80, 4, 4, 100, 200, 7, 8]])
        with torch.no_grad():
            a = gpu.generate(ids.to(device), max_new_tokens=32, do_sample=False, pad_token_id=0)[0].cpu()
            b = cpu.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0]
        same = sum(int(x == y) for x, y in zip(a.tolist(), b.tolist())) / len(b)
        q = gpu.model.layers[0].self_attn.q_proj
        return {
            "format": "compressed-tensors pack-quantized W4A16 (GPTQ INT4, group 32)",
            "module": type(q).__name__,
            "parameters": [n for n, _ in q.named_parameters()],
            "greedy_tokens_equal_to_cpu": same,
        }


def quickstart_run(tmp: Path, device: str, steps: int, gptq_group: int = 64) -> Path:
    import yaml

    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    recipe = yaml.safe_load((ROOT / "stacks" / "quickstart.yaml").read_text())
    recipe["device"] = device
    for stage in recipe["stages"]:
        body = next(iter(stage.values()))
        if "steps" in body:
            body["steps"] = steps
        if "group_size" in body:
            body["group_size"] = gptq_group
    recipe["eval"].update(limit=50, speculative={"enabled": False})
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run(load_recipe(path), tmp / f"run-{device}")
    return tmp / f"run-{device}"


def quickstart(device, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = quickstart_run(Path(tmp), str(device), steps=4 if quick else 20)
        record = json.loads((run_dir / "run.json").read_text())
    keep = ("params", "loaded_bytes", "kernel", "heldout_ppl", "decode_ms_per_token", "tokens_per_s", "accuracy")
    return {
        "device": record["device"],
        "stages": [{"name": s["name"], **{k: s["metrics"].get(k) for k in keep}} for s in record["stages"]],
    }


def versions(names) -> dict:
    """The packages the figures came from (the machine's image, not this checkout's pins)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes (a check of the script, not figures)")
    p.add_argument("--out", default=None, help="also copy the report here")
    args = p.parse_args()
    prepare(threads=8)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on the GPU machine, or --device cpu --quick to check the script")
        sys.exit(2)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(("torch", "transformers", "torchao", "compressed-tensors", "lm_eval")),
        "quick": args.quick,
        "load_average_before": load_average(),
    }
    if device.type == "cuda":
        part(report, "gpu_tests", gpu_tests)
    part(report, "kernels", lambda: kernels(device, args.quick))
    part(report, "exports", lambda: exports(device, args.quick))
    part(report, "quickstart", lambda: quickstart(device, args.quick))
    report["load_average_after"] = load_average()
    if not args.quick:
        save("gpu", report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
