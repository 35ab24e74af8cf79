"""Measuring a model a decoder layer at a time (eval.layerwise, `compressor eval --layerwise`):
each layer's weights are read from the checkpoint for its forward pass and dropped after, and
every figure equals the whole model's."""

import json

import pytest
import torch
import yaml
from conftest import distill_recipe
from test_families import TYPES, tiny

from compressor.cli import main
from compressor.layerwise import streaming
from compressor.pipeline import run
from compressor.recipe import load_recipe

CPU = torch.device("cpu")
FIGURES = ("params", "bytes", "loaded_bytes", "heldout_ppl", "teacher_kl", "top1_agreement", "accuracy")


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_the_logits_are_the_loaded_models(model_type, tied, tmp_path):
    model = tiny(model_type, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # layers spread over shards
    streamed = streaming(tmp_path, CPU)
    layers = list(streamed.model.layers)
    ids = torch.randint(1, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())  # dropped after
    head, embed = streamed.get_output_embeddings(), streamed.get_input_embeddings()
    assert (head.weight is embed.weight) == tied


def _no_latency(recipe: dict, layerwise: bool) -> dict:
    recipe["eval"]["latency"] = {"enabled": False}
    recipe["eval"]["layerwise"] = layerwise
    return recipe


def test_a_run_measured_layer_by_layer_has_the_same_figures(tmp_path, tiny_teacher_folder):
    records = {}
    for layerwise in (False, True):
        path = tmp_path / f"{layerwise}.yaml"
        path.write_text(yaml.safe_dump(_no_latency(distill_recipe("streamed", steps=4), layerwise)))
        records[layerwise] = run(load_recipe(path), tmp_path / f"out-{layerwise}")
    whole, streamed = records[False]["stages"], records[True]["stages"]
    assert [s["key"] for s in whole] == [s["key"] for s in streamed]  # one artifact, measured twice
    for a, b in zip(whole, streamed):
        assert {k: a["metrics"][k] for k in FIGURES} == {k: b["metrics"][k] for k in FIGURES}
        assert "measured_within_bytes" not in a["metrics"] and b["metrics"]["measured_within_bytes"] > 0
    assert "Measured a decoder layer at a time" in (tmp_path / "out-True" / "report.md").read_text()


def test_layerwise_refuses_what_needs_the_model_in_memory(tmp_path, write_recipe, capsys):
    timed = distill_recipe("refused")
    timed["eval"]["layerwise"] = True
    assert main(["validate", str(write_recipe(timed))]) == 2
    assert "eval: layerwise: latency times a model held in memory" in capsys.readouterr().err
    drafting = _no_latency(distill_recipe("refused"), True)
    drafting["eval"]["speculative"] = {"enabled": True}
    assert main(["validate", str(write_recipe(drafting))]) == 2
    assert "draft" in capsys.readouterr().err


def test_eval_layerwise_measures_a_folder_as_loaded(tiny_teacher_folder, tmp_path, capsys):
    figures = {}
    for flags in ([], ["--layerwise"]):
        out = tmp_path / ("streamed" if flags else "whole")
        args = ["eval", str(tiny_teacher_folder), "--tasks", "stdlib_mc", "--limit", "8", "--seq-len", "64"]
        assert main([*args, "--teacher", f"hf:{tiny_teacher_folder}", "--out", str(out), *flags]) == 0
        figures[bool(flags)] = json.loads((out / "run.json").read_text())["stages"][0]["metrics"]
    assert {k: figures[True][k] for k in FIGURES} == {k: figures[False][k] for k in FIGURES}
    assert "decode_ms_per_token" in figures[False] and "decode_ms_per_token" not in figures[True]


def test_a_hub_id_cannot_be_read_a_layer_at_a_time(write_recipe, capsys):
    measured = _no_latency(distill_recipe("hub"), True)
    measured["teacher"] = "hf:someone/some-model"
    assert main(["validate", str(write_recipe(measured))]) == 2
    assert "teacher: eval.layerwise reads the model from its folder, and a hub id has none" in capsys.readouterr().err
    quantized = distill_recipe("hub")
    quantized["teacher"] = "hf:someone/some-model"
    quantized["stages"] = [{"quantize": {"method": "rtn", "type": "Q8_0", "layerwise": True}}]
    assert main(["validate", str(write_recipe(quantized))]) == 2
    assert "teacher: stages[0].quantize.layerwise reads the model" in capsys.readouterr().err
