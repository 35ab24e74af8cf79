"""Chain-of-thought distillation data: several rationales per problem from the teacher, kept
only when the final answer they reach matches the reference (rejection sampling, as in STaR and
distilling step-by-step), then the student is trained on problem + kept rationale.

Problems are `{"question", "answer"}` rows of a .jsonl file, or `builtin:arithmetic`
(deterministic two-operand sums, differences and products).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from . import UserError
from .storage import recipe_path


def arithmetic(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b, op = rng.randrange(2, 100), rng.randrange(2, 100), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value)})
    return rows


class CoT(BaseModel):
    model_config = ConfigDict(extra="forbid")

    problems: str = Field("builtin:arithmetic", description='builtin:arithmetic or a .jsonl of {"question", "answer"}')
    count: int = Field(64, ge=1, description="problems used")
    samples: int = Field(4, ge=1, le=64, description="rationales generated per problem")
    template: str = Field("Question: {question}\nAnswer: Let's think step by step.", description="the prompt")
    answer_regex: str = Field(r"answer is\s*\$?(-?[\d,]*\.?\d+)", description="finds the final answer (group 1)")
    keep: Literal["all", "first", "shortest"] = Field("all", description="which correct rationales per problem")
    new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)

    @field_validator("problems", mode="after")
    @classmethod
    def _file(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("builtin:"):
            if value != "builtin:arithmetic":
                raise ValueError(f"unknown built-in problems {value!r}; built-in: builtin:arithmetic")
            return value
        path = recipe_path(value, info)
        if not Path(path).is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _coherent(self) -> "CoT":
        if "{question}" not in self.template:
            raise ValueError("template: must contain {question}")
        try:
            re.compile(self.answer_regex)
        except re.error as exc:
            raise ValueError(f"answer_regex: not a regular expression ({exc})") from None
        return self

    def load(self, seed: int) -> list[dict]:
        if self.problems == "builtin:arithmetic":
            return arithmetic(self.count, seed)
        rows = []
        for i, line in enumerate(Path(self.problems).read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.problems} line {i + 1}: expected {{'question': ..., 'answer': ...}}") from None
        return rows[: self.count]


def normalize(answer: str) -> str:
    return answer.strip().rstrip(".").replace(",", "").replace("$", "").strip().lower()


def final_answer(text: str, pattern: str) -> str | None:
    """The last match of the answer pattern (group 1 if it has one)."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return normalize(last.group(1) if last.re.groups else last.group(0))


def keep(rationales: list[str], reference: str, cfg: CoT) -> list[str]:
    """The rationales that reach the reference answer, by the keep rule."""
    good = [r for r in rationales if final_answer(r, cfg.answer_regex) == normalize(reference)]
    if cfg.keep == "first":
        return good[:1]
    if cfg.keep == "shortest":
        return sorted(good, key=len)[:1]
    return good
