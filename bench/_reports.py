"""Where every benchmark writes its figures: reports/<name>.json, and reports/<name>.md when it has a table."""

from __future__ import annotations

import json
from pathlib import Path

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def save(name: str, figures: dict, markdown: str | None = None) -> Path:
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    if markdown is not None:
        (REPORTS / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return REPORTS / f"{name}.json"
