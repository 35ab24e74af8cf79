"""FSDP across two CPU processes (gloo) trains what one process trains, and resumes after a kill."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import distill_recipe
from safetensors.torch import load_file

from compressor import UserError
from compressor.cli import main
from compressor.pipeline import run
from compressor.recipe import load_recipe
from compressor.sharding import sharded
from compressor.storage import Store
from compressor.train import TrainConfig, _load_checkpoint, train

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fsdp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fsdp_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_fsdp_processes_train_what_one_does_hold_half_each_and_resume_after_a_kill(tmp_path):
    bench = _bench()
    result = bench.compare("tiny", steps=4, folder=tmp_path)
    assert result["max_rel_loss_diff"] < 1e-4, result
    assert result["max_rel_weight_diff"] < 1e-3, result
    assert result["params_per_process_fraction"] == pytest.approx(0.5, abs=0.02)
    assert result["teacher_params_per_process_fraction"] == pytest.approx(0.5, abs=0.02)
    assert result["losses_one_process"][-1] < result["losses_one_process"][0]  # it trained

    whole = json.loads((tmp_path / "two" / "result.json").read_text())
    assert bench.launch(2, "tiny", 4, tmp_path / "killed", crash_at=3) is None
    progress = json.loads((tmp_path / "killed" / "checkpoint" / "progress.json").read_text())
    assert progress == {"step": 2, "sharded": True}
    resumed = bench.launch(2, "tiny", 4, tmp_path / "killed")
    assert resumed["losses"] == whole["losses"][2:]
    a, b = (load_file(str(tmp_path / name / "student.safetensors")) for name in ("two", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_is_left_alone(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # asked for, but there is nobody to shard with
    model = torch.nn.Linear(2, 2)
    with sharded([model, None], torch.device("cpu")) as (replica, nothing):
        assert replica is model and nothing is None


def test_checkpoint_of_the_other_mode_is_refused(tmp_path):
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(steps=2, checkpoint_every=1, batch_size=1, lr=1e-2)

    def loss_fn(m, batch, step):
        return m(batch["input_ids"].float()).pow(2).mean(), {}

    def batches(i):
        return {"input_ids": torch.ones(1, 4)}

    class Crash(Exception):
        pass

    def crashing(m, batch, step):
        if step == 1:
            raise Crash
        return loss_fn(m, batch, step)

    with pytest.raises(Crash):
        train(
            model, crashing, batches, cfg, device=torch.device("cpu"), seed=0, description="t", checkpoint_dir=tmp_path
        )
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(UserError, match="written without FSDP; resume it the same way"):
        _load_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, None, sharded=True)


@pytest.mark.parametrize("engine", ["--use_fsdp", "--multi_gpu"])  # FSDP, DDP (accelerate's torchrun launcher)
def test_a_launched_run_leaves_what_one_process_leaves(engine, tmp_path, write_recipe, tiny_teacher_folder):
    """`accelerate launch -m compressor run`: the main process measures and writes, the other
    trains beside it; the artifact and the figures are the one-process run's."""
    recipe = distill_recipe("launched", steps=4)  # distill, then a stage that does not train, then QAT
    recipe["stages"].append({"prune": {"targets": {"mlp": 0.5}, "method": "magnitude"}})
    qat = {"bits": 4, "group_size": 32, "steps": 4, "batch_size": 4, "loss": {"temperature": 1.0, "alpha": 0.5}}
    recipe["stages"].append({"qat": qat})
    path = write_recipe(recipe)
    one = run(load_recipe(path), tmp_path / "one", Store(tmp_path / "store-one"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", engine]
    command += ["--main_process_port", str(29600 + os.getpid() % 1000), "-m", "compressor", "run", str(path)]
    command += ["--out", str(tmp_path / "two"), "--store", str(tmp_path / "store-two")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("recipe launched:") == 1  # one process speaks
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    for a, b in zip(one["stages"][1:], two["stages"][1:]):
        assert a["key"] == b["key"] and not b["cached"]
        if a["kind"] != "prune":
            assert b["info"]["final_loss"] == pytest.approx(a["info"]["final_loss"], rel=1e-4)
        assert b["metrics"]["heldout_ppl"] == pytest.approx(a["metrics"]["heldout_ppl"], rel=1e-4)
        wa, wb = (load_file(str(Path(s["artifact"]) / "model.safetensors")) for s in (a, b))
        assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-5) for k in wa)
    listing = [sorted(p.name for p in (tmp_path / store).iterdir()) for store in ("store-one", "store-two")]
    assert listing[0] == listing[1]  # the follower wrote nothing of its own


def test_only_run_spans_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", "a.yaml", "b.yaml"]) == 2
    assert "compressor compare runs in one process" in capsys.readouterr().err


def test_a_launch_does_not_build_the_builtin_teacher(monkeypatch, compressor_home):
    from conftest import TINY_BUILD

    from compressor.teachers.builtin import BuiltinBuild, ensure_teacher

    monkeypatch.setenv("WORLD_SIZE", "2")
    build = BuiltinBuild.model_validate({**TINY_BUILD, "seed": 12345})  # not built yet
    with pytest.raises(UserError, match="is built by one process: build it first"):
        ensure_teacher("tiny-stdlib", build)
