"""Randomly broken recipes: every one is refused with a single line and exit 2, or is still a valid
recipe; never a traceback, and `run` writes nothing for a refused one.

The stress version: `FUZZ_RECIPES=100 python -m pytest -q tests/test_fuzz.py`.
"""

import copy
import os
import random

import pytest
import yaml
from conftest import REPO

from compressor.cli import main

SHIPPED = [REPO / "stacks" / "quickstart.yaml", REPO / "stacks" / "orderings.yaml"]
COUNT = int(os.environ.get("FUZZ_RECIPES", "30"))
GARBAGE = [-1, 0, 1e12, -0.5, "", "??", [], {}, None, True, [1, 2], {"x": 1}, "builtin:nope", 3.7]


def _paths(node, prefix=()):
    """Every (path, value) in a nested dict/list."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _parent(root, path):
    for part in path[:-1]:
        root = root[part]
    return root


def mutate(text: str, rng: random.Random) -> bytes:
    """One random mistake of the kinds users make (or files that are not recipes at all)."""
    kind = rng.choice(["drop", "rename", "retype", "range", "truncate", "garbage", "duplicate-stage"])
    if kind == "truncate":
        return text.encode()[: rng.randrange(1, len(text))]
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    recipe = yaml.safe_load(text)
    paths = [p for p, _ in _paths(recipe) if p]
    path = rng.choice(paths)
    parent, key = _parent(recipe, path), path[-1]
    if kind == "drop":
        del parent[key]
    elif kind == "rename":
        if isinstance(parent, dict):
            parent[f"{key}_typo"] = parent.pop(key)
        else:
            parent[key] = {"not_a_stage": parent[key]}
    elif kind == "retype":
        parent[key] = rng.choice(GARBAGE)
    elif kind == "range":
        numbers = [p for p, v in _paths(recipe) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            path = rng.choice(numbers)
            _parent(recipe, path)[path[-1]] = rng.choice([-1, 0, -1e9, 1e9, 1.5, 2**40])
    else:
        recipe["stages"].append(copy.deepcopy(rng.choice(recipe["stages"])))
    return yaml.safe_dump(recipe, sort_keys=False).encode()


@pytest.mark.parametrize("seed", range(COUNT))
def test_a_broken_recipe_is_one_line_and_exit_2_or_still_valid(seed, tmp_path, capsys):
    rng = random.Random(seed)
    source = SHIPPED[seed % len(SHIPPED)]
    path = tmp_path / "stacks" / source.name
    path.parent.mkdir()
    path.write_bytes(mutate(source.read_text(), rng))
    rc = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if rc == 0:
        return  # the mutation left a valid recipe (an optional key dropped, a value still in range)
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), captured.err
    out = tmp_path / "out"
    command = "compare" if source.name == "orderings.yaml" else "run"
    assert main([command, str(path), "--out", str(out)]) == 2
    assert not out.exists()
