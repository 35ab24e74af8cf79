import pytest
import torch
from conftest import tiny_llama

from compressor import UserError
from compressor.data import Batches
from compressor.train import TrainConfig, train

CPU = torch.device("cpu")


class Crash(Exception):
    pass


def _ce(model, batch, step):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, {}


def test_resume_after_a_crash_ends_with_identical_weights(tmp_path):
    blocks = torch.randint(0, 512, (40, 16))
    cfg = TrainConfig(steps=10, batch_size=4, lr=1e-2, checkpoint_every=3, warmup=0.2)
    straight = tiny_llama(seed=1)
    done = train(straight, _ce, Batches(blocks, 4, seed=0), cfg, device=CPU, seed=0, description="straight")
    with torch.no_grad():  # the summary's first loss is the untrained model's, on the first batch
        start = _ce(tiny_llama(seed=1), Batches(blocks, 4, seed=0)(0), 0)[0].item()
    assert done["first_loss"] == pytest.approx(start, rel=1e-5)

    def crashing(model, ids, step):
        if step == 7:
            raise Crash
        return _ce(model, ids, step)

    resumed = tiny_llama(seed=1)
    with pytest.raises(Crash):
        train(
            resumed,
            crashing,
            Batches(blocks, 4, seed=0),
            cfg,
            device=CPU,
            seed=0,
            description="a",
            checkpoint_dir=tmp_path,
        )
    assert (tmp_path / "checkpoint" / "progress.json").is_file()
    fresh = tiny_llama(seed=1)  # a new process would start from the initial weights
    summary = train(
        fresh, _ce, Batches(blocks, 4, seed=0), cfg, device=CPU, seed=0, description="b", checkpoint_dir=tmp_path
    )
    assert summary["resumed_at"] == 6 and summary["first_loss"] != pytest.approx(start)  # step 6's, not the start's
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_non_finite_loss_stops_with_a_clear_message():
    model = tiny_llama()
    blocks = torch.randint(0, 512, (8, 8))

    def nan_at_two(m, ids, step):
        loss, logs = _ce(m, ids, step)
        return (loss * float("nan") if step == 2 else loss), logs

    with pytest.raises(UserError, match="loss became nan at step 2; lower lr") as err:
        train(
            model,
            nan_at_two,
            Batches(blocks, 2, 0),
            TrainConfig(steps=5, batch_size=2),
            device=CPU,
            seed=0,
            description="distill",
        )
    assert err.value.code == 1


def test_grad_accumulation_matches_one_big_batch():
    blocks = torch.randint(0, 512, (16, 8))
    big, small = tiny_llama(seed=2), tiny_llama(seed=2)
    train(
        big,
        _ce,
        Batches(blocks, 4, 0),
        TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup=0),
        device=CPU,
        seed=0,
        description="big",
    )
    # two micro-batches of 2 that together are the same 4 rows
    halves = lambda i: {"input_ids": Batches(blocks, 4, 0)(i // 2)["input_ids"][(i % 2) * 2 : (i % 2) * 2 + 2]}  # noqa: E731
    train(
        small,
        _ce,
        halves,
        TrainConfig(steps=2, batch_size=2, grad_accum=2, lr=1e-2, warmup=0),
        device=CPU,
        seed=0,
        description="accum",
    )
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
