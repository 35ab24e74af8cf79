"""The accuracy floor, the three picks, the Pareto frontier and the plots, from run.json alone."""

import json

import pytest
from conftest import distill_recipe

from compressor import UserError
from compressor.cli import main
from compressor.picks import Floor, choose, higher_is_better, meets, summary
from compressor.plots import label_spots, pareto
from compressor.report import rerender


def _stage(name, ppl, loaded, ms, tps, acc=0.9, kernel="dense float32", spread=0.0):
    return {
        "name": name,
        "kind": "x",
        "metrics": {
            "higher_is_better": {"heldout_ppl": False, "stdlib_mc/acc": True},
            "decode_ms_samples": [ms, ms * (1 + spread), ms * (1 + 2 * spread)],
            "tokens_per_s_samples": [tps, tps / (1 + spread), tps / (1 + 2 * spread)],
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
    ppl, acc = higher_is_better(STAGES, "heldout_ppl"), higher_is_better(STAGES, "stdlib_mc/acc")
    assert (ppl, acc) == (False, True)  # as the measurement recorded them
    assert meets(STAGES[2]["metrics"], teacher, Floor(metric="heldout_ppl", retain=0.9), ppl)  # 10 / 10.6 = 0.94
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="heldout_ppl", retain=0.9), ppl)  # 0.77
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="stdlib_mc/acc", retain=0.8), acc)
    assert meets(STAGES[3]["metrics"], teacher, Floor(metric="stdlib_mc/acc", value=0.7), acc)
    assert not meets(STAGES[3]["metrics"], teacher, Floor(metric="heldout_ppl", value=12.0), ppl)


def test_a_metric_without_a_recorded_direction_is_one_clear_error():
    bare = [{**s, "metrics": {k: v for k, v in s["metrics"].items() if k != "higher_is_better"}} for s in STAGES]
    with pytest.raises(UserError, match="rerun the recipe"):
        choose(bare, Floor(metric="heldout_ppl", retain=0.9))


def test_timings_within_noise_tie_and_the_fewest_bytes_breaks_the_tie():
    # student decodes at 6.0 and int8 at 6.1 ms/token with 20% spread between rounds: no win
    noisy = [
        STAGES[0],
        _stage("student", 10.5, 2000, 6.0, 700, spread=0.1),
        _stage("int8", 10.6, 1000, 6.1, 690, spread=0.1),
    ]
    picked = choose(noisy, Floor(metric="heldout_ppl", retain=0.9))
    assert picked["latency"]["name"] == "int8" and picked["ties"]["latency"] == ["student"]
    assert picked["throughput"]["name"] == "int8" and picked["ties"]["throughput"] == ["student"]
    # quiet rounds, 40% apart: the faster one wins outright
    quiet = [STAGES[0], _stage("student", 10.5, 2000, 6.0, 700), _stage("int8", 10.6, 1000, 8.5, 500)]
    picked = choose(quiet, Floor(metric="heldout_ppl", retain=0.9))
    assert picked["latency"]["name"] == "student" and picked["ties"]["latency"] == []
    assert "ties within noise" in " ".join(summary(noisy, Floor(metric="heldout_ppl", retain=0.9)))


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


def test_a_runtime_row_does_not_repeat_its_stages_notes_and_q4_0_is_explained():
    from compressor.report import size_notes, stage_notes

    torch_row = {**_stage("prune", 11.0, 2000, 6.0, 700), "runtime": "torch", "info": {"rounding": ["mlp: keep 8"]}}
    gguf_row = {**_stage("prune", 11.0, 900, 3.0, 900, kernel="llama.cpp Q4_0 ×7"), "runtime": "llama.cpp"}
    gguf_row["info"] = torch_row["info"]
    assert len(stage_notes([torch_row, gguf_row])) == 1
    assert any("4.5 bits per Linear weight" in line for line in size_notes([torch_row, gguf_row]))
    assert not any("4.5 bits" in line for line in size_notes([torch_row]))


def test_points_on_one_spot_share_one_label():
    # a stage and the same codes in another runtime often land on one spot: "7, 11", not two overprinted
    spots = label_spots([(1, 100.0, 0.46), (7, 189.0, 0.424), (11, 189.5, 0.424), (3, 386.6, 0.424)])
    assert [label for _, label in spots] == ["1", "7, 11", "3"]
