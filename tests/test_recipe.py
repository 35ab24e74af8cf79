"""Broken recipes: one line naming file and field, exit code 2, no traceback, nothing written."""

import copy
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, distill_recipe

from compressor.cli import main
from compressor.recipe import load_recipe


def _mutate(path: str, value):
    recipe = distill_recipe()
    node = recipe
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is DROP:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return recipe


DROP = object()

# (what is wrong, recipe text or dict, words the message must contain)
BROKEN = [
    ("unknown top-level key", _mutate("sedd", 1), ["sedd", "unknown key", "allowed"]),
    ("wrong type", _mutate("seed", "abc"), ["seed", "integer"]),
    ("out of range", _mutate("stages.0.distill.steps", 0), ["stages[0].distill.steps", "greater than or equal to 1"]),
    (
        "unknown stage kind",
        _mutate("stages.0", {"distil": {}}),
        ["stages[0]", "unknown stage kind 'distil'", "distill"],
    ),
    ("two kinds in one stage", _mutate("stages.0", {"distill": {}, "prune": {}}), ["stages[0]", "exactly one"]),
    ("unknown stage key", _mutate("stages.0.distill.stepz", 3), ["stages[0].distill.stepz", "unknown key", "steps"]),
    ("bad divergence", _mutate("stages.0.distill.loss.divergence", "kl"), ["loss.divergence", "forward_kl"]),
    ("temperature <= 0", _mutate("stages.0.distill.loss.temperature", 0), ["loss.temperature", "greater than 0"]),
    ("alpha > 1", _mutate("stages.0.distill.loss.alpha", 1.5), ["loss.alpha", "less than or equal to 1"]),
    (
        "layer index out of range",
        _mutate("stages.0.distill.student", {"keep_layers": [0, 7]}),
        ["stages[0].distill", "keep_layers", "[0, 1]"],
    ),
    (
        "two student shapes",
        _mutate("stages.0.distill.student", {"keep_layers": [0], "num_layers": 1}),
        ["student", "one of"],
    ),
    ("missing teacher file", _mutate("teacher", "llama2c:nowhere/model.bin"), ["teacher", "not found"]),
    ("unknown teacher kind", _mutate("teacher", "pytorch:x"), ["teacher", "builtin:<name>"]),
    ("missing data file", _mutate("data.train", "nowhere.txt"), ["data.train", "not found"]),
    ("bad data suffix", _mutate("data.train", "recipe.yaml"), ["data.train", ".txt"]),
    ("no stages", _mutate("stages", []), ["stages", "at least 1"]),
    ("missing teacher", _mutate("teacher", DROP), ["teacher", "missing"]),
    ("unknown eval task", _mutate("eval.tasks", ["no_such_task_xyz"]), ["eval.tasks", "no_such_task_xyz"]),
    ("missing task dir", _mutate("eval.task_dirs", ["no/such/dir"]), ["task_dirs", "not found"]),
    ("bad device", _mutate("device", "tpu"), ["device"]),
    ("bad name", _mutate("name", "has space"), ["name"]),
    ("broken YAML", "name: x\nstages: [\n  - distill: {steps: 3\n", ["line", "broken YAML"]),
    ("not a mapping", "- just\n- a list\n", ["must be a mapping"]),
    ("binary garbage", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not a"]),
]


@pytest.mark.parametrize("what,recipe,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_is_one_line_exit_2_nothing_written(what, recipe, words, tmp_path, capsys, compressor_home):
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    before = sorted(p.name for p in compressor_home.rglob("*"))
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}"), err
    for word in words:
        assert word in err, f"{what}: {word!r} not in {err!r}"
    assert not out.exists()
    assert sorted(p.name for p in compressor_home.rglob("*")) == before


def test_a_broken_recipe_from_the_shell_has_no_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_mutate("stages.0.distill.lr", -1)))
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: stages[0].distill.lr: must be greater than 0, got -1"
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_the_shipped_quickstart_validates():
    recipe = load_recipe(REPO / "stacks" / "quickstart.yaml")
    assert recipe.stages[0].kind == "distill"


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, write_recipe):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    recipe = copy.deepcopy(distill_recipe())
    recipe["data"]["train"] = "texts/a.txt"
    loaded = load_recipe(write_recipe(recipe))
    assert loaded.spec.data.train.source == str(tmp_path / "texts" / "a.txt")
