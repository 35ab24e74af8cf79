"""The accuracy floor, the three picks, the Pareto frontier and the plots, from run.json alone."""

import json

from conftest import distill_recipe

from compressor.cli import main
from compressor.picks import Floor, choose, meets
from compressor.plots import pareto
from compressor.report import rerender


def _stage(name, ppl, loaded, ms, tps, acc=0.9, kernel="dense float32"):
    return {
        "name": name,
        "kind": "x",
        "metrics": {
            "params": 1000,
            "bits_per_param": 8 * loaded / 1000,
            "bytes": loaded,
            "loaded_bytes": loaded,
            "decode_ms_per_token": ms,
            "roofline_ms_per_token": ms / 10,
            "tokens_per_s": tps,
            "tokens_per_s_batch": 8,
            "heldout_ppl": ppl,
            "kernel": kernel,
            "accuracy": {"stdlib_mc/acc": acc},
        },
    }


STAGES = [
    _stage("teacher", 10.0, 4000, 10.0, 400),
    _stage("student", 10.5, 2000, 6.0, 700),
    _stage("int8", 10.6, 1000, 8.0, 500, kernel="torchao int8"),
    _stage("int4", 13.0, 600, 7.0, 300, acc=0.7),  # cheapest, but below the floor
]


def test_floor_for_lower_and_higher_is_better_metrics():
    teacher = STAGES[0]["metrics"]
    assert meets(STAGES[2]["metrics"], teacher, Floor(metric="heldout_ppl", retain=0.9))  # 10 / 10.6 = 0.94
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="heldout_ppl", retain=0.9))  # 0.77
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="stdlib_mc/acc", retain=0.8))
    assert meets(STAGES[3]["metrics"], teacher, Floor(metric="stdlib_mc/acc", value=0.7))
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="heldout_ppl", value=12.0))


def test_picks_are_the_cheapest_eligible_model_for_each_bottleneck():
    picked = choose(STAGES, Floor(metric="heldout_ppl", retain=0.9))
    assert picked["eligible"] == ["teacher", "student", "int8"]
    assert picked["memory"]["name"] == "int8"
    assert picked["latency"]["name"] == "student"
    assert picked["throughput"]["name"] == "student"


def test_pareto_frontier():
    pts = [(1, 5), (2, 7), (3, 6), (4, 9), (2, 4)]
    assert pareto(pts, higher_is_better=True) == [0, 1, 3]
    assert pareto([(1, 13), (2, 10.5), (3, 10.6), (4, 10)], higher_is_better=False) == [0, 1, 3]


def test_report_explains_the_picks_and_draws_the_frontier(tmp_path):
    record = {"recipe": "r", "stages": STAGES, "pick": {"metric": "heldout_ppl", "retain": 0.9}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    report = rerender(tmp_path).read_text()
    assert "**Memory-bound: int8**" in report and "**Latency-bound (batch 1): student**" in report
    assert "Eligible: teacher, student, int8." in report
    for png in ("accuracy_vs_memory.png", "accuracy_vs_latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report


def test_a_floor_metric_no_task_produces_is_refused(write_recipe, capsys):
    recipe = distill_recipe(pick={"metric": "hellaswag/acc", "retain": 0.9})
    assert main(["validate", str(write_recipe(recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert "pick.metric" in err and "no measurement produces it" in err and len(err.splitlines()) == 1
