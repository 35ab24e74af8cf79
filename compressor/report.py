"""report.md from run.json alone, so `compressor report DIR` can re-render it any time.

Four tables (size, speed, accuracy, fidelity) instead of one wide one, each followed by what
its numbers need to be read right; then what each stage did (pruning's rounding, training),
the picks and the plots.
"""

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


def _range(value, bounds) -> str:
    """A timing with the range of its rounds: `5.67 (5.51–6.12)`."""
    if value is None:
        return "–"
    return f"{_fmt(value)} ({_fmt(bounds[0])}–{_fmt(bounds[1])})" if bounds else _fmt(value)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def size_table(stages: list[dict]) -> str:
    rows = []
    for s in stages:
        m = s["metrics"]
        rows.append(
            [
                label(s),
                s["kind"],
                _fmt(m.get("params")),
                _mib(m.get("bytes")),
                _fmt(m.get("bits_per_param")),
                _mib(m.get("loaded_bytes")),
                m.get("kernel", "–"),
                _fmt(s.get("build_seconds")),
                _fmt(s.get("measure_seconds")),
                _fmt(s.get("cached")),
            ]
        )
    head = ["stage", "kind", "params", "MiB on disk", "bits/param", "MiB loaded", "kernel"]
    return _table(head + ["build s", "measure s", "cached"], rows)


def speed_table(stages: list[dict]) -> str:
    rows = []
    for s in stages:
        m = s["metrics"]
        tps = m.get("tokens_per_s")
        samples = m.get("tokens_per_s_samples") or []
        rows.append(
            [
                label(s),
                _range(m.get("prefill_ms"), m.get("prefill_ms_range")),
                _range(m.get("decode_ms_per_token"), m.get("decode_ms_range")),
                _fmt(m.get("roofline_ms_per_token")),
                (f"{tps:,.0f} ({min(samples):,.0f}–{max(samples):,.0f})" if samples else _fmt(tps))
                + (f" @{m.get('tokens_per_s_batch')}" if tps is not None else ""),
                _mib(m.get("peak_mem_bytes")),
            ]
        )
    head = ["stage", "prefill ms", "decode ms/tok", "roofline ms/tok", "tok/s @B", "peak MiB"]
    return _table(head, rows)


def accuracy_table(stages: list[dict]) -> str:
    tasks = sorted({k for s in stages for k in s["metrics"].get("accuracy", {})})
    rows = [
        [label(s), _fmt(s["metrics"].get("heldout_ppl")), _fmt(s["metrics"].get("heldout_bpb"))]
        + [_fmt(s["metrics"].get("accuracy", {}).get(t)) for t in tasks]
        for s in stages
    ]
    return _table(["stage", "held-out ppl", "bits/byte", *tasks], rows)


def fidelity_table(stages: list[dict]) -> str:
    drafts = any(s["metrics"].get("speculative") for s in stages)
    rows = []
    for s in stages:
        m = s["metrics"]
        spec = m.get("speculative") or {}
        row = [label(s), _fmt(m.get("teacher_kl")), _fmt(m.get("top1_agreement"))]
        if drafts:
            row += [_fmt(spec.get(k)) for k in ("acceptance_rate", "tokens_per_teacher_pass", "speedup")]
        rows.append(row)
    head = ["stage", "KL to teacher", "top-1 agree"]
    return _table(head + (["draft acceptance", "tokens / teacher pass", "draft speed-up"] if drafts else []), rows)


def table(stages: list[dict]) -> str:
    """Every table, for places that show one block (the exported model card)."""
    return "\n\n".join(f(stages) for f in (size_table, speed_table, accuracy_table, fidelity_table))


def stage_notes(stages: list[dict]) -> list[str]:
    """What each stage did that its numbers do not show: pruning's rounding, training, answers."""
    notes = []
    for s in stages:
        if s.get("runtime", "torch") != "torch":
            continue  # a runtime row is the same stage deployed: its notes stand on the torch row
        info = s.get("info") or {}
        if info.get("rounding"):
            notes.append(f"- **{label(s)}** (prune, {info.get('method')}): " + "; ".join(info["rounding"]) + ".")
        if "cot_kept" in info:
            notes.append(
                f"- **{label(s)}**: chain of thought kept {info['cot_kept']} of {info['cot_generated']} "
                f"rationales (right final answer; {info['cot_problems_solved']} of {info['cot_problems']} problems)."
            )
        elif "teacher_answers" in info:
            notes.append(f"- **{label(s)}**: trained on {info['teacher_answers']} answers of the black-box teacher.")
        if "steps" in info and "final_loss" in info:
            start = f"loss {_fmt(info['first_loss'])} at the start, " if info.get("first_loss") is not None else ""
            if info.get("resumed_at"):
                start = f"resumed at step {info['resumed_at']}, "
            notes.append(
                f"- **{label(s)}** ({s['kind']}): {info['steps']} steps, {start}final loss {_fmt(info['final_loss'])}, "
                f"{_fmt(info.get('train_seconds'))} s of training."
            )
        if "teacher_cache" in info:
            c = info["teacher_cache"]
            made = (
                f"captured {c['captured_rows']} in {c['capture_seconds']:.0f} s" if c["captured_rows"] else "all read"
            )
            drawn = c.get("tail_samples", 0)  # runs before the draws have none
            slots = f"top-{c['k'] - drawn} and {drawn} drawn from the tail" if drawn else f"top-{c['k']}"
            notes.append(
                f"- **{label(s)}**: trained from the teacher-logit cache ({slots}, "
                f"{c['bytes_per_token']:.0f} bytes per token): {c['rows']} rows, {made}; "
                f"{c['teacher_forwards_saved']} teacher forwards saved."
            )
    return notes


def size_notes(stages: list[dict]) -> list[str]:
    lines = [
        "- **bits/param** is bytes on disk × 8 ÷ parameters, everything included: embeddings and the "
        "output head stay in float unless a stage quantizes them, and the torchao format stores each INT4 "
        "code in a byte of its own (plus its scales), so an INT4 stage shows far more than 4 bits/param there."
    ]
    int4 = [s for s in stages if "int4" in (s["metrics"].get("kernel") or "")]
    if int4:
        s = int4[0]
        lines.append(
            f"  Here: {label(s)} is {_fmt(s['metrics'].get('bits_per_param'))} bits/param with "
            f"{s['metrics'].get('kernel')}."
        )
    if any("Q4_0" in (s["metrics"].get("kernel") or "") for s in stages):
        lines.append(
            "  As GGUF Q4_0 (the `@llama.cpp` rows) the same codes take 4.5 bits per Linear weight: 16 bytes "
            "of nibbles and one fp16 scale per 32 weights; the token embeddings' format is in the kernel column."
        )
    return lines


def speed_notes(record: dict) -> list[str]:
    stages = record["stages"]
    first = stages[0]["metrics"] if stages else {}
    timing = record.get("timing") or {}
    lines = []
    if timing:
        lines.append(
            f"- Every model was timed in {timing.get('rounds')} interleaved rounds ({timing.get('order')}); each "
            f"figure is the {timing.get('estimator', 'minimum')} with the range of the rounds in brackets. "
            f"{timing.get('threads')} thread(s) on {timing.get('cores')} cores; load average "
            f"{timing.get('load_average_before', ['?'])[0]} before, {timing.get('load_average_after', ['?'])[0]} "
            "after. A pick claims a win only when it was faster in every round by more than the spread."
        )
    lines += [
        "- **decode ms/tok** is at batch 1; **roofline** is the bytes read per decoded token divided by the "
        f"measured memory bandwidth ({_fmt(first.get('bandwidth_gb_s'))} GB/s), the physical floor.",
        "- **peak MiB**: " + (first.get("peak_mem_kind") or "peak memory during generation") + ".",
    ]
    return lines


def accuracy_notes(record: dict) -> list[str]:
    first = record["stages"][0]["metrics"] if record["stages"] else {}
    streamed = [s["metrics"].get("measured_within_bytes") or 0 for s in record["stages"]]
    layerwise = (
        [
            "- **Measured a decoder layer at a time** (eval.layerwise): every batch read each model's layers from "
            "its checkpoint one by one, embeddings and head held throughout, so accuracy and fidelity were measured "
            f"within about {max(streamed) / 2**20:,.0f} MiB (estimated: a layer, the tables, a batch's activations), "
            "whatever the model's size; the same figures as the model loaded whole. No latency was timed."
        ]
        if any(streamed)
        else []
    )
    return layerwise + [
        f"- **held-out ppl** is token perplexity on {_fmt(first.get('heldout_tokens'))} tokens of the recipe's "
        "held-out text (the first eval.fidelity.samples blocks): the same definition everywhere in this "
        "report, and the one papers quote. `*/token_perplexity` is the same quantity over a task's documents; "
        "lm-eval's `*/word_perplexity` and `*/byte_perplexity` are per word and per byte. (The built-in "
        "teacher's build log scores 256 held-out blocks, a different sample: a different number.) **bits/byte** "
        "is the same loss per UTF-8 byte of that text, in bits: it does not depend on the tokenizer, so a teacher "
        "with a tokenizer of its own is comparable on it.",
    ]


def fidelity_notes(stages: list[dict]) -> list[str]:
    lines = [
        "- **KL to teacher** is the mean KL(teacher ‖ model) per token on the held-out text; **top-1 agree** "
        "is how often both predict the same next token, what a draft's acceptance depends on."
    ]
    drafts = [s for s in stages if (s["metrics"].get("speculative") or {}).get("speedup") is not None]
    if drafts:
        slow = [s for s in drafts if s["metrics"]["speculative"]["speedup"] < 1]
        lines.append(
            "- **draft speed-up** is the teacher's own generation time over assisted generation with the model "
            "drafting. Speculative decoding pays off when a teacher pass costs much more than a draft pass "
            "and the teacher is memory-bound; "
            + (
                f"here {', '.join(label(s) for s in slow)} slow it down: the teacher is small and its "
                "passes cost little more than the draft's, so checking drafts adds work instead of saving it."
                if slow
                else "here every draft speeds the teacher up."
            )
        )
    return lines


def render(record: dict, plots: list[Path] = ()) -> str:
    machine = record.get("machine", {})
    stages = record["stages"]
    lines = [
        f"# {record.get('recipe') or 'evaluation'}",
        "",
        f"Device {record.get('device')} ({machine.get('gpu') or machine.get('cpu')}), seed {record.get('seed')}, "
        f"{record.get('created')}.",
        "",
        *[f"> {note}" for note in record.get("notes", [])],
        *([""] if record.get("notes") else []),
        "## Size",
        "",
        size_table(stages),
        "",
        *size_notes(stages),
        "",
        "## Speed",
        "",
        speed_table(stages),
        "",
        *speed_notes(record),
        "",
        "## Accuracy",
        "",
        accuracy_table(stages),
        "",
        *accuracy_notes(record),
        "",
        "## Fidelity to the teacher",
        "",
        fidelity_table(stages),
        "",
        *fidelity_notes(stages),
        "",
    ]
    notes = stage_notes(stages)
    if notes:
        lines += ["## What each stage did", "", *notes, ""]
    if "pick" in record:
        lines += ["## Which model to ship", "", *summary(stages, Floor(**record["pick"])), ""]
    lines += [*[f"![{p.stem}]({p.name})" for p in plots], ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()))
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
