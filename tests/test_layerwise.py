"""Layer-by-layer GPTQ: the model's parameters stay on the meta device and each decoder layer is
read from the checkpoint, quantized, written and dropped; the integers and the written weights
are the whole-model path's, bit for bit, in every family."""

from types import SimpleNamespace

import pytest
import torch
from test_families import TYPES, tiny

from compressor.data import Calibration
from compressor.gptq_model import DAMP, run_gptq
from compressor.layerwise import Checkpoint, Streamed, skeleton

CPU = torch.device("cpu")


def settings(lm_head: bool = False):
    calibration = Calibration(samples=6, batch_size=4)  # a last batch shorter than the others
    return SimpleNamespace(bits=4, group_size=32, lm_head=lm_head, act_order=True, damp=DAMP, calibration=calibration)


def both_ways(model, tmp_path, cfg, types=None, shard: str | None = None):
    source, out = tmp_path / "source", tmp_path / "out"
    model.save_pretrained(source, **({"max_shard_size": shard} if shard else {}))
    blocks = torch.randint(1, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    meta = skeleton(source)
    assert all(p.device.type == "meta" for p in meta.parameters())
    stream = Streamed(meta, Checkpoint(source), out, CPU)
    assert run_gptq(meta, cfg, blocks, CPU, types, stream=stream) == {}  # the integers went to disk
    stream.finish()
    streamed = stream.codes()
    assert all(p.device.type == "meta" for p in meta.parameters())  # nothing stayed loaded
    whole = run_gptq(model, cfg, blocks, CPU, types)
    return whole, streamed, out


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    fields = ("q", "d", "dmin", "sc", "mn")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields if getattr(a, f) is not None)


@pytest.mark.parametrize("model_type", TYPES)
def test_the_integers_and_weights_are_the_whole_models(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(model_type)
    whole, streamed, out = both_ways(model, tmp_path, settings(lm_head=not model.config.tie_word_embeddings))
    assert whole.keys() == streamed.keys() and all(same(whole[k], streamed[k]) for k in whole)
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    expected = model.state_dict()  # the whole path left the dequantized weights in the model
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_gguf_types_from_a_sharded_checkpoint(tmp_path):
    model = tiny("llama")
    types = {n: "Q4_0" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    whole, streamed, out = both_ways(model, tmp_path, settings(), types, shard="100KB")
    assert (
        len(set(Checkpoint(tmp_path / "source").files.values())) > 1 and (out / "model.safetensors.index.json").exists()
    )
    assert whole.keys() == streamed.keys() == types.keys() and all(same(whole[k], streamed[k]) for k in whole)
