"""Accuracy vs bytes and accuracy vs decode latency for every measured model, with the Pareto
frontier drawn and the picks marked: the frontier at a glance."""

from __future__ import annotations

from pathlib import Path

from .picks import Floor, choose, label, lower_is_better, metric_value


def pareto(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (x, lower better) and quality (y)."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], None
    for i in order:
        q = sign * points[i][1]
        if best is None or q > best:
            front.append(i)
            best = q
    return front


def _key(stage: dict) -> str:
    return stage.get("key") or label(stage)


def floor_level(teacher: dict, floor: Floor) -> float | None:
    """The metric value at the floor, to draw it."""
    if floor.value is not None:
        return floor.value
    ref = metric_value(teacher, floor.metric)
    if ref is None:
        return None
    return ref / floor.retain if lower_is_better(floor.metric) else ref * floor.retain


def write_plots(stages: list[dict], floor: Floor, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = floor.metric
    high = not lower_is_better(metric)
    picked = choose(stages, floor)
    marks: dict[str, list[str]] = {}
    for kind in ("memory", "latency", "throughput"):
        if picked[kind]:
            marks.setdefault(_key(picked[kind]), []).append(kind)
    # an artifact shared by several orderings (a common prefix) is one point with all its names
    names: dict[str, list[str]] = {}
    unique = []
    for s in stages:
        if _key(s) not in names:
            unique.append(s)
        names.setdefault(_key(s), []).append(label(s))
    written = []
    for x_key, x_label, fname in (
        ("loaded_bytes", "memory once loaded (MiB)", "accuracy_vs_memory.png"),
        ("decode_ms_per_token", "decode ms/token at batch 1", "accuracy_vs_latency.png"),
    ):
        pts = [
            (s, s["metrics"][x_key] / (2**20 if x_key == "loaded_bytes" else 1), metric_value(s["metrics"], metric))
            for s in unique
            if s["metrics"].get(x_key) is not None and metric_value(s["metrics"], metric) is not None
        ]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        orderings = sorted({s.get("ordering") or "" for s, _, _ in pts})
        colors = {o: plt.cm.tab10(i % 10) for i, o in enumerate(orderings)}
        for s, x, y in pts:
            ax.scatter(x, y, color=colors[s.get("ordering") or ""], s=36, zorder=3)
            ax.annotate(" = ".join(names[_key(s)]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = [pts[i] for i in pareto([(x, y) for _, x, y in pts], high)]
        ax.plot(
            [x for _, x, _ in front],
            [y for _, _, y in front],
            "--",
            color="black",
            lw=1,
            drawstyle="steps-post",
            label="Pareto frontier",
        )
        floor_y = floor_level(stages[0]["metrics"], floor)
        if floor_y is not None:
            ax.axhline(floor_y, color="grey", lw=1, ls=":", label="accuracy floor")
        for s, x, y in pts:
            kinds = [k for k in marks.get(_key(s), []) if k != "throughput" or x_key == "decode_ms_per_token"]
            if kinds:
                ax.scatter(x, y, s=220, facecolors="none", edgecolors="red", lw=1.5, zorder=4)
                ax.annotate(
                    " + ".join(kinds) + " pick",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, -12),
                    color="red",
                    fontsize=8,
                )
        for o in orderings:
            if o:
                ax.scatter([], [], color=colors[o], label=o)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} ({'higher' if high else 'lower'} is better)")
        if not high:
            ax.invert_yaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / fname
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
