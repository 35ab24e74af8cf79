"""report.md from run.json alone, so `compressor report DIR` can re-render it any time."""

from __future__ import annotations

from pathlib import Path

from .picks import Floor, label, summary
from .plots import write_plots
from .storage import read_json


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}" if abs(value) >= 100 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def table(stages: list[dict]) -> str:
    tasks = sorted({k for s in stages for k in s["metrics"].get("accuracy", {})})
    drafts = any(s["metrics"].get("speculative") for s in stages)
    head = [
        "stage",
        "kind",
        "params",
        "MiB on disk",
        "bits/param",
        "MiB loaded",
        "kernel",
        "prefill ms",
        "decode ms/tok",
        "roofline ms/tok",
        "tok/s @B",
        "peak MiB",
        "held-out ppl",
        "KL to teacher",
        "top-1 agree",
        *(["draft acceptance", "draft speed-up"] if drafts else []),
        *tasks,
        "seconds",
        "cached",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stages:
        m = s["metrics"]
        tps = m.get("tokens_per_s")
        cells = [
            label(s),
            s["kind"],
            _fmt(m.get("params")),
            _mib(m.get("bytes")),
            _fmt(m.get("bits_per_param")),
            _mib(m.get("loaded_bytes")),
            m.get("kernel", "–"),
            _fmt(m.get("prefill_ms")),
            _fmt(m.get("decode_ms_per_token")),
            _fmt(m.get("roofline_ms_per_token")),
            f"{_fmt(tps)} @{m.get('tokens_per_s_batch')}" if tps is not None else "–",
            _mib(m.get("peak_mem_bytes")),
            _fmt(m.get("heldout_ppl")),
            _fmt(m.get("teacher_kl")),
            _fmt(m.get("top1_agreement")),
            *([_fmt((m.get("speculative") or {}).get(k)) for k in ("acceptance_rate", "speedup")] if drafts else []),
            *[_fmt(m.get("accuracy", {}).get(t)) for t in tasks],
            _fmt(s.get("build_seconds") or s.get("seconds")),
            _fmt(s.get("cached")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def data_notes(stages: list[dict]) -> list[str]:
    """What the teacher's text answers gave each stage that trained on them."""
    notes = []
    for s in stages:
        info = s.get("info") or {}
        if "cot_kept" in info:
            notes.append(
                f"- **{label(s)}**: chain of thought kept {info['cot_kept']} of {info['cot_generated']} "
                f"rationales (right final answer; {info['cot_problems_solved']} of {info['cot_problems']} problems)."
            )
        elif "teacher_answers" in info:
            notes.append(f"- **{label(s)}**: trained on {info['teacher_answers']} answers of the black-box teacher.")
    return notes + [""] if notes else []


def render(record: dict, plots: list[Path] = ()) -> str:
    machine = record.get("machine", {})
    first = record["stages"][0]["metrics"] if record["stages"] else {}
    lines = [
        f"# {record.get('recipe') or 'evaluation'}",
        "",
        f"Device {record.get('device')} ({machine.get('gpu') or machine.get('cpu')}), "
        f"{first.get('threads', '?')} thread(s) while timing, seed {record.get('seed')}, {record.get('created')}.",
        "",
        table(record["stages"]),
        "",
        *data_notes(record["stages"]),
        *(summary(record["stages"], Floor(**record["pick"])) + [""] if "pick" in record else []),
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "- **held-out ppl** and `*/token_perplexity` are per model token (what papers quote); "
        "lm-eval's `*/word_perplexity` and `*/byte_perplexity` are per word and per byte.",
        "- **decode ms/tok** is at batch 1; **roofline** is the bytes read per decoded token divided by "
        f"the measured memory bandwidth ({_fmt(first.get('bandwidth_gb_s'))} GB/s), the physical floor.",
        "- **peak MiB** is "
        + (first.get("peak_mem_kind") or "peak memory")
        + " during generation at the largest batch.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()),
    ]
    return "\n".join(lines) + "\n"


def write_report(record: dict, out: Path) -> Path:
    path = out / "report.md"
    plots = write_plots(record["stages"], Floor(**record["pick"]), out) if "pick" in record else []
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(record, plots), encoding="utf-8")
    tmp.replace(path)
    return path


def rerender(out: Path) -> Path:
    return write_report(read_json(out / "run.json"), out)
