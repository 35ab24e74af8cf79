"""Which measured model to ship: the accuracy floor, and the memory-, latency- and
throughput-bound picks among the models that meet it, each explained by the cost equation
(params × bits/param × work/param)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# metrics where lower is better; everything else (accuracies, agreement) is higher-is-better
LOWER = ("heldout_ppl", "teacher_kl")
LOWER_SUFFIXES = ("perplexity", "bits_per_byte", "_stderr")


class Floor(BaseModel):
    """A model is eligible when `metric` keeps at least `retain` of the teacher's value (for a
    lower-is-better metric: teacher / value ≥ retain), or reaches the absolute `value`."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("heldout_ppl", description="heldout_ppl, top1_agreement, teacher_kl or '<task>/<metric>'")
    retain: float | None = Field(None, gt=0, le=1)
    value: float | None = None

    @model_validator(mode="after")
    def _one(self) -> "Floor":
        if self.retain is None and self.value is None:
            self.retain = 0.9
        if self.retain is not None and self.value is not None:
            raise ValueError("give retain (a fraction of the teacher's value) or value (absolute), not both")
        return self


def lower_is_better(metric: str) -> bool:
    return metric in LOWER or metric.endswith(LOWER_SUFFIXES)


def metric_value(metrics: dict, metric: str) -> float | None:
    value = metrics.get(metric, metrics.get("accuracy", {}).get(metric))
    return float(value) if isinstance(value, (int, float)) else None


def floor_check(floor: Floor, tasks: list[str]) -> str | None:
    """Why no measurement can produce the floor's metric, or None."""
    if floor.metric in ("heldout_ppl", "teacher_kl", "top1_agreement"):
        return None
    task = floor.metric.split("/")[0]
    if "/" not in floor.metric or task not in tasks:
        return (
            f"metric {floor.metric!r}: no measurement produces it; use heldout_ppl, top1_agreement, teacher_kl "
            f"or '<task>/<metric>' with a task of eval.tasks ({', '.join(tasks) or 'none'})"
        )
    return None


def meets(metrics: dict, teacher: dict, floor: Floor) -> bool:
    value = metric_value(metrics, floor.metric)
    if value is None:
        return False
    low = lower_is_better(floor.metric)
    if floor.value is not None:
        return value <= floor.value if low else value >= floor.value
    ref = metric_value(teacher, floor.metric)
    if ref is None:
        return False
    retained = (ref / value if value > 0 else float("inf")) if low else (value / ref if ref > 0 else 0.0)
    return retained >= floor.retain - 1e-12


def choose(stages: list[dict], floor: Floor) -> dict:
    """The eligible stages and the three picks (None when nothing qualifies or was timed)."""
    teacher = stages[0]["metrics"]
    eligible = [s for s in stages if meets(s["metrics"], teacher, floor)]

    def best(key, reverse=False):
        timed = [s for s in eligible if s["metrics"].get(key) is not None]
        if not timed:
            return None
        return sorted(timed, key=lambda s: (s["metrics"][key] * (-1 if reverse else 1), s["metrics"].get("bytes", 0)))[
            0
        ]

    return {
        "floor": floor.model_dump(exclude_none=True),
        "eligible": [label(s) for s in eligible],
        "memory": best("loaded_bytes"),
        "latency": best("decode_ms_per_token"),
        "throughput": best("tokens_per_s", reverse=True),
    }


def label(stage: dict) -> str:
    return f"{stage['ordering']}/{stage['name']}" if stage.get("ordering") else stage["name"]


def explain(kind: str, stage: dict, teacher: dict) -> str:
    """One sentence: why this pick wins for this bottleneck, with its numbers."""
    m = stage["metrics"]
    params, bits = m.get("params", 0), m.get("bits_per_param", 32)
    tm = teacher["metrics"]
    if kind == "memory":
        return (
            f"**Memory-bound: {label(stage)}** — memory is params × bits/param: {params:,} × {bits:.1f} bits = "
            f"{m['loaded_bytes'] / 2**20:.2f} MiB loaded ({m['loaded_bytes'] / tm['loaded_bytes']:.0%} of the "
            f"teacher's), the least among the models that meet the floor."
        )
    if kind == "latency":
        roof = m.get("roofline_ms_per_token")
        return (
            f"**Latency-bound (batch 1): {label(stage)}** — decoding one token reads every weight once, so "
            f"batch-1 decode is bandwidth-bound and fewer bytes read win unless the kernel's work/param "
            f"(dequantization) eats the saving: {m['decode_ms_per_token']:.2f} ms/token vs the teacher's "
            f"{tm['decode_ms_per_token']:.2f}"
            + (f", roofline {roof:.3f} ms ({m['kernel']})." if roof is not None else ".")
        )
    batch = m.get("tokens_per_s_batch")
    return (
        f"**Throughput-bound (batch {batch}): {label(stage)}** — at batch {batch} each weight read serves "
        f"{batch} tokens, so compute per parameter (work/param) matters more than bytes: "
        f"{m['tokens_per_s']:.0f} tokens/s vs the teacher's {tm['tokens_per_s']:.0f} ({m.get('kernel', '?')})."
    )


def summary(stages: list[dict], floor: Floor) -> list[str]:
    """Markdown lines: the floor, the eligible models and the explained picks."""
    picked = choose(stages, floor)
    f = floor
    rule = (
        f"{f.metric} {'≤' if lower_is_better(f.metric) else '≥'} {f.value}"
        if f.value is not None
        else f"{f.metric} keeps ≥ {f.retain:.0%} of the teacher's"
        + (" (teacher / model)" if lower_is_better(f.metric) else "")
    )
    lines = [f"Accuracy floor: {rule}. Eligible: {', '.join(picked['eligible']) or 'none'}.", ""]
    for kind in ("memory", "latency", "throughput"):
        stage = picked[kind]
        lines.append(
            f"- {explain(kind, stage, stages[0])}" if stage else f"- {kind}: no eligible model was measured for it"
        )
    return lines
