"""The exporter contract, and the model card every format writes beside its files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass
class Export:
    """One export job: the run record, which stage, its artifact folder, format options."""

    record: dict
    index: int
    artifact: Path
    options: dict = field(default_factory=dict)

    @property
    def stage(self) -> dict:
        return self.record["stages"][self.index]


class Exporter(ABC):
    name: ClassVar[str]
    options: ClassVar[dict[str, tuple[str, ...]]] = {}  # --KEY VALUE flags it reads; the first is the default

    def check(self, job: Export) -> None:
        """Raise UserError (one line) when this stage cannot be written in this format."""
        return None

    @abstractmethod
    def write(self, job: Export, out: Path) -> None:
        """Write the export into the (temporary) folder `out`."""


def model_card(job: Export, usage: list[str], requirements: list[str], seen: list[str] = ()) -> str:
    """README.md: what the model is, how to load it (with the exact packages), what was measured."""
    from ..report import table

    record, upto = job.record, job.index
    chain = record["stages"][: upto + 1]
    stage = chain[-1]
    built = [s for s in chain if s.get("runtime", "torch") == "torch"]  # one row per stage (a run may add llama.cpp's)
    recipe = Path(record.get("recipe_path") or "")
    lines = [
        f"# {record['recipe']} — {stage['name']}",
        "",
        f"Made by `compressor` from `{chain[0].get('source', 'the teacher')}` through: "
        + " → ".join(f"{s['name']} ({s['kind']})" for s in built),
        "",
        *[f"> {note}" for note in record.get("notes", [])],
        "",
        "## Use",
        "",
        "```bash",
        "pip install " + " ".join(requirements),
        "```",
        "",
        *usage,
        "",
        f"Kernel as loaded on the measuring machine ({record.get('device', '?')}): "
        f"{stage['metrics'].get('kernel', 'unknown')}.",
        "",
    ]
    if seen:
        lines += ["What loading prints, and why it is harmless:", "", *[f"- {s}" for s in seen], ""]
    lines += [
        "## Measured (teacher and every stage up to this one)",
        "",
        table(chain),
        "",
        "## Stage details",
        "",
        *[f"- {s['name']}: {s.get('info', {})}" for s in built[1:]],
        "",
    ]
    if recipe.is_file():
        lines += ["## Recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]
    lines += [f"Versions: {record.get('versions', {})}", ""]
    return "\n".join(lines)
