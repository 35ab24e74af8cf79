"""`compressor compare`: orderings share their common prefix, and the report picks among all."""

import copy

import pytest
import yaml
from conftest import FAST_EVAL, REPO, TINY_TEACHER, needs_shared_data

from compressor.cli import main
from compressor.recipe import load_orderings, load_recipe
from compressor.storage import read_json


def _orderings(**extra) -> dict:
    recipe = {
        "name": "cmp",
        "seed": 0,
        "teacher": copy.deepcopy(TINY_TEACHER),
        "data": {"seq_len": 64},
        "stages": [
            {"name": "distill", "distill": {"student": {"num_layers": 1}, "steps": 4, "batch_size": 4}},
            {"name": "prune", "prune": {"targets": {"mlp": 0.5}, "calibration": {"samples": 4}}},
            {"name": "ptq", "quantize": {"method": "rtn", "bits": 8, "group_size": None}},
        ],
        "orderings": {"distill-ptq": ["distill", "ptq"], "distill-prune-ptq": ["distill", "prune", "ptq"]},
        "pick": {"metric": "stdlib_mc/acc", "retain": 0.5},
        "eval": copy.deepcopy(FAST_EVAL),
    }
    recipe.update(extra)
    return recipe


def test_compare_shares_the_prefix_and_picks_among_every_ordering(tmp_path, write_recipe, tiny_teacher_folder):
    path = write_recipe(_orderings())
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 0
    record = read_json(tmp_path / "out" / "run.json")
    labels = [(s.get("ordering"), s["name"], s["cached"]) for s in record["stages"]]
    assert labels[0][:2] == (None, "teacher")  # its measurement may be cached by another test's run
    assert labels[1:] == [
        ("distill-ptq", "distill", False),
        ("distill-ptq", "ptq", False),
        ("distill-prune-ptq", "distill", True),  # the shared prefix is built once
        ("distill-prune-ptq", "prune", False),
        ("distill-prune-ptq", "ptq", False),
    ]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Memory-bound: " in report and "**Latency-bound (batch 1): " in report
    assert "distill-prune-ptq/ptq" in report and (tmp_path / "out" / "accuracy_vs_memory.png").is_file()
    assert main(["report", str(tmp_path / "out")]) == 0  # re-rendered from run.json alone


def test_bad_orderings_are_refused(write_recipe, capsys):
    bad = _orderings(orderings={"a": ["distill", "nope"]})
    assert main(["validate", str(write_recipe(bad))]) == 2
    assert "orderings.a: unknown stage 'nope'; stages: distill, prune, ptq" in capsys.readouterr().err
    after_quant = _orderings(orderings={"a": ["ptq", "prune"]})
    assert main(["validate", str(write_recipe(after_quant))]) == 2
    err = capsys.readouterr().err
    assert "orderings.a: stages[1].prune: cannot follow stages[0].quantize" in err
    one = write_recipe(_orderings(orderings=None), "one.yaml")
    same = write_recipe(_orderings(orderings=None), "same.yaml")
    assert main(["compare", str(one), str(same)]) == 2
    assert "two recipes or orderings with the same name" in capsys.readouterr().err


def test_the_shipped_orderings_recipe_validates():
    variants = load_orderings(REPO / "stacks" / "orderings.yaml")
    assert [label for label, _ in variants] == [
        "distill-prune-recover-ptq",
        "prune-recover-ptq",
        "prune-qat",
        "distill-ptq",
    ]
    assert yaml.safe_load((REPO / "stacks" / "orderings.yaml").read_text())["pick"]["retain"] == 0.8


@needs_shared_data
def test_the_shipped_stories_recipe_validates():
    assert [s.kind for s in load_recipe(REPO / "stacks" / "stories260k.yaml").stages] == [
        "distill",
        "prune",
        "recover",
        "quantize",
    ]


@pytest.mark.parametrize("name", ["gpu-1b", "gpu-8b-fsdp"])
def test_the_gpu_templates_parse_without_a_hub(name):
    recipe = load_recipe(REPO / "stacks" / f"{name}.yaml", check_tasks=False)  # hub tasks and model not here
    assert recipe.spec.device == "cuda" and recipe.stages[-1].config.method == "gptq"
