"""A client no one here wrote runs our GPTQ export: transformers -> optimum -> GPTQModel (the
maintained loader of the GPTQ checkpoint format) loads a stage written by
`compressor export --format gptq` and computes what our own artifact computes.

    python bench/gptqmodel_cpu.py RUN_DIR [--stage NAME] [--venv /tmp/gptq-venv] [--windows 2]

GPTQModel 7.6.0 (7.7 needs torch >= 2.14.1) builds from source here in ~2 min and pulls optimum,
datasets and friends, so it runs in a venv of its own (made once). Measured on the same
WikiText-2 test windows (512 tokens each): perplexity of each side, KL(ours || GPTQModel) and
top-1 agreement per token; four prompts continued greedily for 32 tokens by each; bytes and
bits per linear weight of the folder. Not part of CI. Writes reports/gptqmodel_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from _reports import PROMPTS, SHARED, client_venv, greedy, load_average, prepare, save

CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM

folder, windows, prompts, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu")
kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
with torch.inference_mode():
    logits = torch.cat([model(torch.tensor([w])).logits[0].float() for w in windows])
    rows = [model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist() for p in prompts]
torch.save(logits.half(), out)
print("RESULT " + json.dumps({"kernels": kernels, "greedy": rows}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--stage")
    p.add_argument("--venv", default="/tmp/gptq-venv")
    p.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows of 512 tokens")
    args = p.parse_args()
    prepare()
    import torch
    from safetensors import safe_open

    from compressor.exporters import export
    from compressor.exporters.gptq import LOADERS
    from compressor.models import load_pretrained

    requirements = ["torch==2.13.0", "transformers==5.24.0", *LOADERS, "accelerate"]
    python = client_venv(Path(args.venv), requirements)
    record = json.loads((Path(args.run_dir) / "run.json").read_text())
    stage = next(s for s in record["stages"] if s["name"] == (args.stage or record["stages"][-1]["name"]))
    out = {"stage": stage["name"], "requirements": requirements}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(Path(args.run_dir), Path(tmp) / "gptq", stage["name"], fmt="gptq")
        per_word = 32 // json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
        parts = ("qweight", "qzeros", "scales", "g_idx")
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[-1] in parts)
            weights = sum(per_word * f.get_tensor(k).numel() for k in f.keys() if k.endswith(".qweight"))
        ours = load_pretrained(stage["artifact"], torch.device("cpu"), dtype="auto")
        text = (SHARED / "wikitext2" / "wt2_tokens.test.txt").read_text()
        ids = ours.tokenizer(text[:20000]).input_ids[: 512 * args.windows]
        windows = [ids[i : i + 512] for i in range(0, len(ids), 512)]
        prompts = [ours.tokenizer(t).input_ids for t in PROMPTS]
        logits_file = Path(tmp) / "logits.pt"
        child = subprocess.run(
            [str(python), "-c", CHILD, str(folder), json.dumps(windows), json.dumps(prompts), str(logits_file)],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "2"},
        )
        result = next((line for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            out.update(loaded=False, refused=(child.stdout + child.stderr).strip().splitlines()[-4:])
        else:
            theirs = json.loads(result[7:])
            with torch.inference_mode():
                a = torch.cat([ours.model(torch.tensor([w])).logits[0].float() for w in windows])
            b = torch.load(logits_file, weights_only=True).float()
            target = torch.cat([torch.tensor(w[1:]) for w in windows])
            pos = torch.cat(
                [torch.arange(len(w) - 1) + sum(len(v) for v in windows[:i]) for i, w in enumerate(windows)]
            )
            la, lb = a[pos].log_softmax(-1), b[pos].log_softmax(-1)
            mine = greedy(ours, prompts, 32)
            out.update(
                loaded=True,
                kernels=theirs["kernels"],
                heldout_tokens=len(target),
                ppl_ours=float(la.gather(1, target[:, None]).mean().neg().exp()),
                ppl_gptqmodel=float(lb.gather(1, target[:, None]).mean().neg().exp()),
                kl_ours_to_gptqmodel=float((la.exp() * (la - lb)).sum(-1).mean()),
                top1_agreement=float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
                greedy_tokens=sum(len(m) for m in mine),
                greedy_equal_tokens=sum(x == y for m, t in zip(mine, theirs["greedy"]) for x, y in zip(m, t)),
            )
        out.update(
            linear_bytes=stored,
            linear_weights=weights,
            linear_bits_per_param=round(8 * stored / weights, 3),
            folder_bytes=sum(f.stat().st_size for f in folder.iterdir()),
        )
    out["load_average"] = load_average()
    save("gptqmodel_cpu", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
