"""Which measured model to ship: the accuracy floor, and the memory-, latency- and
throughput-bound picks among the models that meet it, each explained by the cost equation
(params × bits/param × work/param).

Which way a metric improves is what the measurement recorded beside it (`higher_is_better`:
lm-eval's declaration for its metrics, ours for held-out perplexity, KL and agreement), never a
guess from its name. A latency or throughput pick claims a win only when the winner was faster
in every interleaved timing round and by more than the spread of the rounds (`latency.faster`);
otherwise the leaders tie within noise and the fewest bytes breaks the tie.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import UserError
from .latency import faster

OWN_METRICS = ("heldout_ppl", "heldout_bpb", "teacher_kl", "top1_agreement")


class Floor(BaseModel):
    """A model is eligible when `metric` keeps at least `retain` of the teacher's value (for a
    lower-is-better metric: teacher / value ≥ retain), or reaches the absolute `value`."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("heldout_ppl", description=f"{', '.join(OWN_METRICS)} or '<task>/<metric>'")
    retain: float | None = Field(None, gt=0, le=1)
    value: float | None = None

    @model_validator(mode="after")
    def _one(self) -> "Floor":
        if self.retain is None and self.value is None:
            self.retain = 0.9
        if self.retain is not None and self.value is not None:
            raise ValueError("give retain (a fraction of the teacher's value) or value (absolute), not both")
        return self


def higher_is_better(stages: list[dict], metric: str) -> bool:
    """The direction the measurement recorded for `metric`."""
    for s in stages:
        direction = s["metrics"].get("higher_is_better", {}).get(metric)
        if direction is not None:
            return bool(direction)
    raise UserError(
        f"metric {metric!r}: no measurement recorded which way it improves (a run.json written before "
        "metric directions were recorded: rerun the recipe to re-measure)"
    )


def metric_value(metrics: dict, metric: str) -> float | None:
    value = metrics.get(metric, metrics.get("accuracy", {}).get(metric))
    return float(value) if isinstance(value, (int, float)) else None


def floor_check(floor: Floor, tasks: list[str]) -> str | None:
    """Why no measurement can produce the floor's metric, or None."""
    if floor.metric in OWN_METRICS:
        return None
    task = floor.metric.split("/")[0]
    if "/" not in floor.metric or task not in tasks:
        return (
            f"metric {floor.metric!r}: no measurement produces it; use {', '.join(OWN_METRICS)} "
            f"or '<task>/<metric>' with a task of eval.tasks ({', '.join(tasks) or 'none'})"
        )
    return None


def meets(metrics: dict, teacher: dict, floor: Floor, higher: bool) -> bool:
    value = metric_value(metrics, floor.metric)
    if value is None:
        return False
    if floor.value is not None:
        return value >= floor.value if higher else value <= floor.value
    ref = metric_value(teacher, floor.metric)
    if ref is None:
        return False
    retained = (value / ref if ref > 0 else 0.0) if higher else (ref / value if value > 0 else float("inf"))
    return retained >= floor.retain - 1e-12


def _timed_pick(eligible: list[dict], key: str, samples_key: str, higher: bool) -> tuple[dict | None, list[dict]]:
    """The fastest eligible model by `key`, and the ones it does not beat beyond noise; among a
    tie the fewest loaded bytes wins."""
    timed = [s for s in eligible if s["metrics"].get(key) is not None]
    if higher:  # throughput compares like with like: the rows timed at the largest batch
        batch = max((s["metrics"].get("tokens_per_s_batch") or 1 for s in timed), default=1)
        timed = [s for s in timed if (s["metrics"].get("tokens_per_s_batch") or 1) == batch]
    if not timed:
        return None, []
    sign = -1 if higher else 1
    ranked = sorted(timed, key=lambda s: (sign * s["metrics"][key], s["metrics"].get("loaded_bytes", 0)))
    leader = ranked[0]

    def times(s):  # per-round seconds-like samples, lower is better
        samples = s["metrics"].get(samples_key) or [s["metrics"][key]]
        return [1 / x for x in samples] if higher else samples

    tied = [s for s in ranked[1:] if not faster(times(leader), times(s))]
    if not tied:
        return leader, []
    group = [leader, *tied]
    winner = min(group, key=lambda s: (s["metrics"].get("loaded_bytes", 0), sign * s["metrics"][key]))
    return winner, [s for s in group if s is not winner]


def choose(stages: list[dict], floor: Floor) -> dict:
    """The eligible stages, the three picks (None when nothing qualifies or was timed), and for
    latency and throughput the models a pick tied with within noise."""
    teacher = stages[0]["metrics"]
    higher = higher_is_better(stages, floor.metric)
    eligible = [s for s in stages if meets(s["metrics"], teacher, floor, higher)]
    memory = min(eligible, key=lambda s: s["metrics"].get("loaded_bytes", 0)) if eligible else None
    latency, latency_ties = _timed_pick(eligible, "decode_ms_per_token", "decode_ms_samples", higher=False)
    throughput, throughput_ties = _timed_pick(eligible, "tokens_per_s", "tokens_per_s_samples", higher=True)
    return {
        "floor": floor.model_dump(exclude_none=True),
        "higher_is_better": higher,
        "eligible": [label(s) for s in eligible],
        "memory": memory,
        "latency": latency,
        "throughput": throughput,
        "ties": {"latency": [label(s) for s in latency_ties], "throughput": [label(s) for s in throughput_ties]},
    }


def label(stage: dict) -> str:
    name = f"{stage['ordering']}/{stage['name']}" if stage.get("ordering") else stage["name"]
    runtime = stage.get("runtime", "torch")
    return name if runtime == "torch" else f"{name} @{runtime}"


def _tie(names: list[str], what: str) -> str:
    if not names:
        return ""
    return (
        f" It ties within noise on {what} with {', '.join(names)} (none was faster in every interleaved round "
        "by more than the rounds' spread); the fewest bytes breaks the tie."
    )


def explain(kind: str, stage: dict, teacher: dict, ties: list[str] = ()) -> str:
    """One sentence (two with a tie): why this pick wins for this bottleneck, with its numbers."""
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
        lo, hi = m.get("decode_ms_range", [m["decode_ms_per_token"]] * 2)
        tlo, thi = tm.get("decode_ms_range", [tm.get("decode_ms_per_token", 0)] * 2)
        return (
            f"**Latency-bound (batch 1): {label(stage)}** — decoding one token reads every weight once, so "
            f"batch-1 decode is bandwidth-bound and fewer bytes read win unless the kernel's work/param "
            f"(dequantization) eats the saving: {lo:.2f} ms/token (rounds {lo:.2f}–{hi:.2f}) vs the teacher's "
            f"{tlo:.2f} ({tlo:.2f}–{thi:.2f})"
            + (f", roofline {roof:.3f} ms ({m['kernel']})." if roof is not None else ".")
            + _tie(list(ties), "decode speed")
        )
    batch = m.get("tokens_per_s_batch")
    return (
        f"**Throughput-bound (batch {batch}): {label(stage)}** — at batch {batch} each weight read serves "
        f"{batch} tokens, so compute per parameter (work/param) matters more than bytes: "
        f"{m['tokens_per_s']:.0f} tokens/s vs the teacher's {tm['tokens_per_s']:.0f} ({m.get('kernel', '?')})."
        + _tie(list(ties), "throughput")
    )


def summary(stages: list[dict], floor: Floor) -> list[str]:
    """Markdown lines: the floor, the eligible models and the explained picks."""
    picked = choose(stages, floor)
    f, high = floor, picked["higher_is_better"]
    rule = (
        f"{f.metric} {'≥' if high else '≤'} {f.value}"
        if f.value is not None
        else f"{f.metric} keeps ≥ {f.retain:.0%} of the teacher's" + ("" if high else " (teacher / model)")
    )
    lines = [f"Accuracy floor: {rule}. Eligible: {', '.join(picked['eligible']) or 'none'}.", ""]
    for kind in ("memory", "latency", "throughput"):
        stage = picked[kind]
        lines.append(
            f"- {explain(kind, stage, stages[0], picked['ties'].get(kind, []))}"
            if stage
            else f"- {kind}: no eligible model was measured for it"
        )
    return lines
