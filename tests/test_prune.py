"""Structured pruning: exact slicing, GQA-aware heads, importance, rounding, reload, recovery."""

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data, recipe, save_with_tokenizer, tiny_llama

from compressor.cli import main
from compressor.models import load_pretrained
from compressor.pipeline import run
from compressor.recipe import load_recipe
from compressor.slicing import keep_heads, keep_hidden, keep_mlp_channels
from compressor.stages import StageContext
from compressor.stages import prune as prune_stage
from compressor.stages.prune import Prune
from compressor.teachers import TeacherSpec, load_teacher

CPU = torch.device("cpu")
IDS = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload_is_exact_and_generates(model, folder):
    save_with_tokenizer(model, folder)
    reloaded = load_pretrained(str(folder), CPU, dtype="auto").model
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    with torch.no_grad():
        out = reloaded.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = IDS[:1, :4]
        for _ in range(5):
            seq = torch.cat([seq, reloaded(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    return reloaded


def test_mlp_channels_equal_zeroing_them(tmp_path):
    model, reference = tiny_llama(seed=1), tiny_llama(seed=1)
    keep = [torch.tensor([0, 5, 9, 100, 127, 64]) for _ in range(3)]
    keep_mlp_channels(model, keep)
    with torch.no_grad():
        for layer, k in zip(reference.model.layers, keep):
            drop = torch.ones(128, dtype=torch.bool)
            drop[k] = False
            layer.mlp.gate_proj.weight[drop] = 0  # silu(0) * up = 0: the channel contributes nothing
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    assert model.config.intermediate_size == 6
    _reload_is_exact_and_generates(model, tmp_path)


@pytest.mark.parametrize("mode", ["groups", "within"])
def test_heads_equal_zeroing_their_output_and_keep_gqa_valid(mode, tmp_path):
    model, reference = (tiny_llama(seed=2, heads=8, kv_heads=4, hidden=96) for _ in range(2))
    hd = 12
    if mode == "groups":  # drop KV group 1 (q heads 2, 3) in every layer
        keep_kv, keep_q = [torch.tensor([0, 2, 3])] * 3, [torch.tensor([0, 1, 4, 5, 6, 7])] * 3
    else:  # one query head per group
        keep_kv, keep_q = [torch.arange(4)] * 3, [torch.tensor([1, 2, 5, 7])] * 3
    keep_heads(model, keep_kv, keep_q)
    with torch.no_grad():
        for layer, q in zip(reference.model.layers, keep_q):
            for h in set(range(8)) - set(q.tolist()):
                layer.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    cfg = model.config
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim == hd
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == ((6, 3) if mode == "groups" else (4, 4))
    _reload_is_exact_and_generates(model, tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_channels_slice_every_reader_and_writer(tie, tmp_path):
    model = tiny_llama(seed=3, tie=tie)
    keep_hidden(model, torch.arange(0, 64, 2))
    assert model.config.hidden_size == 32 and model.config.head_dim == 16
    assert model.get_input_embeddings().weight.shape == (512, 32)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    reloaded = _reload_is_exact_and_generates(model, tmp_path)
    assert reloaded.config.hidden_size == 32


def test_plan_rounds_gqa_and_refuses_what_cannot_exist():
    shape = {
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    zero = dict.fromkeys(("layers", "heads", "mlp", "hidden"), 0.0)
    # 6 query heads cannot divide hidden 256 (a transformers config rule), so 25% rounds to 50%
    out, notes = prune_stage.plan(shape, {**zero, "heads": 0.25}, "groups", 1)
    assert (out["num_attention_heads"], out["num_key_value_heads"]) == (4, 2)
    assert "50% removed for 25% asked" in notes[0] and "feasible counts [2, 4, 8]" in notes[0]
    out, notes = prune_stage.plan({**shape, "hidden_size": 384}, {**zero, "heads": 0.25}, "groups", 1)
    assert (out["num_attention_heads"], out["num_key_value_heads"]) == (6, 3)
    out, notes = prune_stage.plan(shape, {**zero, "heads": 0.25}, "within", 1)
    assert out["num_attention_heads"] == 4 and "2 of 2 query heads" not in notes[0]
    # pruning hidden too: any head count, and the hidden width becomes a multiple of it
    out, _ = prune_stage.plan({**shape, "num_attention_heads": 8}, {**zero, "heads": 0.25, "hidden": 0.1}, "groups", 1)
    assert out["num_attention_heads"] == 6 and out["hidden_size"] % 6 == 0
    with pytest.raises(ValueError, match="prunes whole groups"):
        prune_stage.plan(shape, {**zero, "heads": 0.8}, "within", 1)
    with pytest.raises(ValueError, match="leaves none"):
        prune_stage.plan(shape, {**zero, "layers": 0.99}, "groups", 1)
    out, _ = prune_stage.plan(shape, {**zero, "mlp": 0.5, "hidden": 0.3}, "groups", 128)
    assert out["intermediate_size"] == 256 and out["hidden_size"] == 128


def _ctx(config, tmp_path, teacher=None, blocks=None, source=None):
    if blocks is None:
        blocks = torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(1))
    return StageContext(
        name="prune",
        config=config,
        device=CPU,
        seed=0,
        scratch=tmp_path,
        cache=tmp_path,
        load_teacher=lambda: teacher,
        train_blocks=lambda n: blocks,
        seq_len=blocks.shape[1],
        cache_key="k",
        source=source,
    )


@pytest.mark.parametrize(
    "method,norm", [("magnitude", "l1"), ("magnitude", "l2"), ("taylor", "l2"), ("activation", "l2")]
)
def test_every_importance_prunes_the_dead_channels_first(method, norm, tmp_path):
    model = tiny_llama(seed=4, layers=2)
    with torch.no_grad():  # channels 0..63 of every layer are dead (all their weights zero)
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:64] = 0
            layer.mlp.up_proj.weight[:64] = 0
            layer.mlp.down_proj.weight[:, :64] = 0
    cfg = prune_stage.Config(
        targets={"mlp": 0.5}, method=method, norm=norm, calibration={"samples": 4, "batch_size": 2}
    )
    before = _logits(model)
    pruned = Prune().apply(model, None, _ctx(cfg, tmp_path))
    assert pruned.config.intermediate_size == 64
    torch.testing.assert_close(_logits(pruned), before, rtol=1e-5, atol=1e-5)  # only dead channels went


def test_depth_pruning_drops_the_block_that_changes_its_input_least(tmp_path):
    model = tiny_llama(seed=5, layers=3)
    with torch.no_grad():  # layer 1 becomes an identity: its residual branches write nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    cfg = prune_stage.Config(targets={"layers": 0.34}, method="magnitude", calibration={"samples": 4})
    ctx = _ctx(cfg, tmp_path)
    before = _logits(model)
    pruned = Prune().apply(model, None, ctx)
    assert pruned.config.num_hidden_layers == 2 and "dropped [1]" in ctx.info["rounding"][-1]
    torch.testing.assert_close(_logits(pruned), before, rtol=1e-5, atol=1e-5)


def test_target_params_solves_the_auto_fraction(tmp_path):
    model = tiny_llama(seed=6, layers=2, inter=256)
    goal = 90_000
    cfg = prune_stage.Config(targets={"mlp": "auto", "heads": 0.5}, target_params=goal, method="magnitude")
    ctx = _ctx(cfg, tmp_path)
    pruned = Prune().apply(model, None, ctx)
    params = sum(p.numel() for p in pruned.parameters())
    assert params <= goal and params > 0.95 * goal and ctx.info["params_after"] == params


@needs_shared_data
def test_every_target_on_stories260k_reloads_exactly(tmp_path):
    teacher = load_teacher(
        TeacherSpec.model_validate(f"llama2c:{SHARED_DATA / 'stories260K' / 'stories260K.bin'}"), CPU
    )
    cfg = prune_stage.Config(
        targets={"layers": 0.2, "heads": 0.25, "mlp": 0.5, "hidden": 0.25},
        gqa="groups",
        method="activation",
        calibration={"samples": 4, "batch_size": 2},
    )
    blocks = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = _ctx(cfg, tmp_path, teacher, blocks)
    pruned = Prune().apply(teacher.model, teacher.tokenizer, ctx)
    c = pruned.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size) == (
        4,
        6,
        3,
        86,
        48,
    )
    pruned.save_pretrained(tmp_path / "m")
    teacher.tokenizer.save_pretrained(tmp_path / "m")
    reloaded = load_pretrained(str(tmp_path / "m"), CPU, dtype="auto").model
    ids = blocks[:2]
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), rtol=0, atol=0)


def _prune_recipe(**prune_fields):
    calibration = {"samples": 4, "batch_size": 2}
    prune = {"targets": {"mlp": 0.5, "heads": 0.5}, "method": "taylor", "calibration": calibration, **prune_fields}
    return recipe({"prune": prune}, {"recover": {"steps": 4, "batch_size": 2}}, name="prune")


def test_prune_and_recover_from_a_recipe_on_the_builtin_teacher(tmp_path, write_recipe, tiny_teacher_folder):
    record = run(load_recipe(write_recipe(_prune_recipe())), tmp_path / "out")
    teacher, pruned, recovered = record["stages"]
    assert pruned["info"]["params_after"] < pruned["info"]["params_before"]
    assert pruned["metrics"]["params"] == recovered["metrics"]["params"] == pruned["info"]["params_after"]
    assert any("KV groups" in note for note in pruned["info"]["rounding"])
    assert recovered["info"]["teacher"] == "original" and recovered["metrics"]["teacher_kl"] > 0


@pytest.mark.parametrize(
    "fields,recover,words",
    [
        ({"targets": {"mlp": 1.0}}, {}, ["targets.mlp", "[0, 1)"]),
        ({"targets": {"heads": 0.9}, "gqa": "within"}, {}, ["prunes whole groups"]),
        ({"targets": {"layers": 0.9}}, {}, ["leaves none"]),
        ({"targets": {"mlp": "auto"}}, {}, ["give target_params"]),
        ({"targets": {"mlp": "auto"}, "target_params": 10}, {}, ["cannot be reached"]),
        ({"targets": {"mlp": 0.5}, "method": "fisher"}, {}, ["prune.method"]),
        ({"targets": {"mlp": 0.5}}, {"teacher": "none", "hidden": {"layer_map": {0: 0}}}, ["cannot use hidden"]),
    ],
)
def test_bad_pruning_is_refused_at_validation(fields, recover, words, write_recipe, capsys):
    bad = _prune_recipe(**fields)
    bad["stages"][1]["recover"].update(recover)
    assert main(["validate", str(write_recipe(bad))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err, err
