"""Accuracy vs memory and accuracy vs decode latency for every measured model, with the Pareto
frontier drawn and the picks marked: the frontier at a glance.

Points are numbered and named in a key beside the axes (names printed at the points overlap
as soon as two models sit close); decode latency is drawn with its range over the timing rounds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .picks import Floor, choose, higher_is_better, label, metric_value


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


def floor_level(teacher: dict, floor: Floor, higher: bool) -> float | None:
    """The metric value at the floor, to draw it."""
    if floor.value is not None:
        return floor.value
    ref = metric_value(teacher, floor.metric)
    if ref is None:
        return None
    return ref * floor.retain if higher else ref / floor.retain


KEY_WIDTH = 90  # characters per line of the key beside the axes

AXES = (
    ("loaded_bytes", "memory once loaded (MiB)", "accuracy_vs_memory.png", 2**20),
    ("decode_ms_per_token", "decode ms/token at batch 1 (min over rounds; bar: range)", "accuracy_vs_latency.png", 1),
)


def write_plots(stages: list[dict], floor: Floor, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = floor.metric
    high = higher_is_better(stages, metric)
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
    number = {_key(s): i + 1 for i, s in enumerate(unique)}
    written = []
    for x_key, x_label, fname, scale in AXES:
        pts = [
            (s, s["metrics"][x_key] / scale, metric_value(s["metrics"], metric))
            for s in unique
            if s["metrics"].get(x_key) is not None and metric_value(s["metrics"], metric) is not None
        ]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
        orderings = sorted({s.get("ordering") or "" for s, _, _ in pts})
        colors = {o: plt.cm.tab10(i % 10) for i, o in enumerate(orderings)}
        front = [pts[i] for i in pareto([(x, y) for _, x, y in pts], high)]
        ax.step(
            [x for _, x, _ in front],
            [y for _, _, y in front],
            where="post",
            color="tab:orange",
            lw=2.5,
            alpha=0.8,
            zorder=2,
            label="Pareto frontier (nothing cheaper is as accurate)",
        )
        for s, x, y in pts:
            color = colors[s.get("ordering") or ""]
            if x_key == "decode_ms_per_token" and s["metrics"].get("decode_ms_range"):
                lo, hi = s["metrics"]["decode_ms_range"]
                ax.plot([lo, hi], [y, y], color=color, lw=1, alpha=0.6, zorder=2)
            ax.scatter(x, y, color=color, s=40, zorder=3)
        for (x, y), numbers in label_spots([(number[_key(s)], x, y) for s, x, y in pts]):
            ax.annotate(numbers, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, zorder=5)
        floor_y = floor_level(stages[0]["metrics"], floor, high)
        if floor_y is not None:
            ax.axhline(floor_y, color="grey", lw=1, ls=":", label="accuracy floor")
        shown_pick = False
        for s, x, y in pts:
            kinds = [k for k in marks.get(_key(s), []) if k != "throughput" or x_key == "decode_ms_per_token"]
            if kinds:
                ax.scatter(
                    x,
                    y,
                    s=260,
                    facecolors="none",
                    edgecolors="red",
                    lw=1.5,
                    zorder=4,
                    label=None if shown_pick else "pick (ringed; which in the key)",
                )
                shown_pick = True
        for o in orderings:
            if o:
                ax.scatter([], [], color=colors[o], label=o)
        key_lines = []
        for s, _, _ in pts:
            kinds = [k for k in marks.get(_key(s), []) if k != "throughput" or x_key == "decode_ms_per_token"]
            pick = f"  ← {' + '.join(kinds)} pick" if kinds else ""
            line = f"{number[_key(s)]}: {' = '.join(names[_key(s)])}{pick}"  # a shared prefix: many names
            key_lines.append(textwrap.fill(line, KEY_WIDTH, subsequent_indent="    ", break_on_hyphens=False))
        ax.text(
            1.02,
            1.0,
            "\n".join(key_lines),
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7,
            family="monospace",
        )
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} ({'higher' if high else 'lower'} is better)")
        if not high:
            ax.invert_yaxis()
        ax.grid(alpha=0.3)
        # beside the axes, under the key: inside, it hid points wherever "best" found no room
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.02, 0.0), borderaxespad=0)
        path = out / fname  # saved with bbox_inches="tight": the canvas grows to hold the key beside the axes
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def label_spots(points: list[tuple[int, float, float]]) -> list[tuple[tuple[float, float], str]]:
    """One label per spot: points closer than 1% of both axis spans (e.g. a stage and the same
    codes through another runtime with equal accuracy) share one "7, 11" instead of overprinting."""
    xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
    dx, dy = 0.01 * (max(xs) - min(xs) or 1), 0.01 * (max(ys) - min(ys) or 1)
    spots: list[tuple[tuple[float, float], list[int]]] = []
    for n, x, y in points:
        spot = next((sp for sp in spots if abs(sp[0][0] - x) <= dx and abs(sp[0][1] - y) <= dy), None)
        if spot:
            spot[1].append(n)
        else:
            spots.append(((x, y), [n]))
    return [(xy, ", ".join(map(str, ns))) for xy, ns in spots]
