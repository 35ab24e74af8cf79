"""A recipe end to end on the tiny built-in teacher: the run.json contract, the cache, resume
after kill -9, corrupt artifacts, the output-folder lock."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, distill_recipe

from compressor import UserError
from compressor.cli import main
from compressor.models import count_params
from compressor.pipeline import run
from compressor.recipe import load_recipe
from compressor.record import Metrics, RunRecord, StageRecord
from compressor.report import _fmt
from compressor.storage import Store, locked

TIMED = ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_mem_bytes", "roofline_ms_per_token")


def _figures(record):
    """What must be reproducible: everything but timings."""
    keep = ("params", "bytes", "accuracy", "teacher_kl", "top1_agreement", "heldout_ppl")
    return [{k: s["metrics"][k] for k in keep} for s in record["stages"]]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_teacher_folder):
    folder = tmp_path_factory.mktemp("run")
    path = folder / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(distill_recipe("contract", steps=6)))
    record = run(load_recipe(path), folder / "out")
    return path, folder / "out", record


def test_run_json_follows_the_output_contract(first_run):
    _, out, record = first_run
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert RunRecord.__required_keys__ <= set(on_disk)
    assert {"torch", "transformers", "lm_eval", "accelerate", "torchao", "python"} <= set(on_disk["versions"])
    assert on_disk["machine"]["threads"] == torch.get_num_threads() and on_disk["machine"]["cores"] >= 1
    assert [s["kind"] for s in on_disk["stages"]] == ["teacher", "distill"]
    for stage in on_disk["stages"]:
        assert StageRecord.__required_keys__ <= set(stage)
        assert Metrics.__required_keys__ <= set(stage["metrics"])
        for key in (*TIMED, "teacher_kl", "top1_agreement"):
            assert stage["metrics"][key] is not None, key
        assert set(stage["metrics"]["higher_is_better"]) == {
            "heldout_ppl",
            "heldout_bpb",
            "teacher_kl",
            "top1_agreement",
        } | set(stage["metrics"]["accuracy"])
        assert 0 <= stage["metrics"]["accuracy"]["stdlib_mc/acc"] <= 1
    teacher, student = on_disk["stages"]
    assert teacher["metrics"]["teacher_kl"] == 0 and teacher["metrics"]["top1_agreement"] == 1
    assert student["metrics"]["teacher_kl"] > 0 and student["metrics"]["params"] < teacher["metrics"]["params"]
    assert student["info"]["student_layers"] == 1
    assert abs(teacher["metrics"]["bits_per_param"] - 32) < 0.5  # fp32 safetensors
    report = (out / "report.md").read_text()
    assert "| distill |" in report
    assert f"loss {_fmt(student['info']['first_loss'])} at the start" in report, report


def test_same_recipe_and_seed_in_a_fresh_store_gives_identical_figures(first_run, tmp_path):
    """Reproducibility: nothing shared with the first run but the recipe and its seed."""
    path, _, record = first_run
    again = run(load_recipe(path), tmp_path / "again", Store(tmp_path / "fresh-store"))
    assert not any(s["cached"] for s in again["stages"][1:])
    assert _figures(again) == _figures(record)


def test_rerun_is_all_cached_with_identical_figures(first_run):
    path, out, record = first_run
    again = run(load_recipe(path), out)
    assert all(s["cached"] for s in again["stages"])
    assert _figures(again) == _figures(record)
    assert again["timing"] == record["timing"]  # the same models on the same machine: the timing is reused


def test_a_corrupt_artifact_is_detected_and_rebuilt(first_run, tmp_path, capsys):
    path, _, record = first_run
    store = Store(tmp_path / "store")  # its own copy: the module's run stays intact for the other tests
    run(load_recipe(path), tmp_path / "first", store)
    weights = store.path(record["stages"][1]["key"]) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    again = run(load_recipe(path), tmp_path / "again", store)
    assert "corrupt" in capsys.readouterr().err
    assert again["stages"][1]["cached"] is False
    assert _figures(again) == _figures(record)


def test_a_second_run_into_the_same_folder_is_refused(first_run):
    path, out, _ = first_run
    with locked(out / ".lock", "test holder"):
        with pytest.raises(UserError, match="in use by pid"):
            run(load_recipe(path), out)


def test_a_base_model_starts_the_chain_while_the_teacher_stays_row_0(tmp_path, write_recipe, tiny_teacher_folder):
    from compressor.models import keep_layers, load_pretrained

    teacher = load_pretrained(str(tiny_teacher_folder), torch.device("cpu"))
    keep_layers(teacher.model, [0]).save_pretrained(tmp_path / "base")
    teacher.tokenizer.save_pretrained(tmp_path / "base")
    recipe = distill_recipe("based", steps=2, base=f"hf:{tmp_path / 'base'}")
    recipe["stages"][0]["distill"]["student"] = {}
    record = run(load_recipe(write_recipe(recipe)), tmp_path / "out", Store(tmp_path / "store"))
    row0, student = record["stages"]
    assert row0["name"] == "teacher" and row0["source"] == "builtin:tiny-stdlib"
    assert row0["metrics"]["params"] == count_params(teacher.model) and row0["metrics"]["teacher_kl"] == 0
    assert student["info"]["input_params"] == student["metrics"]["params"] < row0["metrics"]["params"]


def test_two_recipes_with_a_common_prefix_share_the_artifact(first_run, tmp_path, write_recipe):
    _, _, record = first_run
    longer = distill_recipe("longer", steps=6)
    longer["stages"].append({"name": "again", "distill": {"steps": 2, "batch_size": 2}})
    second = run(load_recipe(write_recipe(longer)), tmp_path / "out")
    assert second["stages"][1]["key"] == record["stages"][1]["key"]
    assert second["stages"][1]["cached"] is True
    assert second["stages"][2]["cached"] is False


@pytest.mark.slow
def test_kill_9_mid_stage_resumes_to_the_same_figures(tmp_path, write_recipe, tiny_teacher_folder):
    recipe = distill_recipe("killed", steps=40)
    recipe["stages"][0]["distill"]["checkpoint_every"] = 5
    path = write_recipe(recipe)
    reference = run(load_recipe(path), tmp_path / "reference", Store(tmp_path / "store-a"))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "compressor",
        "run",
        str(path),
        "--out",
        str(tmp_path / "killed"),
        "--store",
        str(tmp_path / "store-b"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "store-b" / ".partial" / reference["stages"][1]["key"] / "checkpoint" / "progress.json"
    deadline, step = time.time() + 240, 0
    while time.time() < deadline and step < 20 and proc.poll() is None:
        time.sleep(0.05)
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, ValueError):
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 20 <= step < 40, step  # killed mid-stage, after a checkpoint
    assert not (tmp_path / "killed" / "run.json").exists()
    code = main(["run", str(path), "--out", str(tmp_path / "killed"), "--store", str(tmp_path / "store-b")])
    assert code == 0
    resumed = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert resumed["stages"][1]["info"]["resumed_at"] > 0
    assert _figures(resumed) == _figures(reference)


def test_eval_measures_an_artifact_folder_and_report_rerenders(first_run, tmp_path, capsys):
    _, out, record = first_run
    artifact = record["stages"][1]["artifact"]
    code = main(
        [
            "eval",
            artifact,
            "--tasks",
            "stdlib_mc",
            "--limit",
            "8",
            "--seq-len",
            "64",
            "--teacher",
            artifact,
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    measured = json.loads((tmp_path / "ev" / "run.json").read_text())["stages"][0]["metrics"]
    assert measured["params"] == record["stages"][1]["metrics"]["params"]
    assert abs(measured["teacher_kl"]) < 1e-6 and measured["top1_agreement"] == 1.0  # against itself
    assert "stdlib_mc/acc" in measured["accuracy"]
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "| distill |" in (out / "report.md").read_text()
    assert main(["eval", artifact, "--tasks", "nope_task", "--out", str(tmp_path / "ev2")]) == 2
    assert "unknown task 'nope_task'" in capsys.readouterr().err


def test_the_docs_state_the_run_json_contract_the_code_writes():
    """docs/measurement.md's run.json contract names exactly the required keys of compressor.record."""
    page = (REPO / "docs" / "measurement.md").read_text()
    block = page[page.index("`run.json` (the contract scripts read") :]
    block = block.split("\n\n")[0]
    for schema in (RunRecord, StageRecord, Metrics):
        for key in schema.__required_keys__:
            assert f'"{key}"' in block, f"docs/measurement.md's run.json contract lacks {key!r} ({schema.__name__})"
