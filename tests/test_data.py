import json

import pytest
import torch

from compressor import UserError
from compressor.data import Batches, TextSource, load_documents, pack, split_heldout, stdlib_documents, tokenize_stream


class _Tok:
    """A tokenizer stand-in: one id per character, optional BOS."""

    def __init__(self, bos=None, eos=0):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, docs, add_special_tokens=True):
        prefix = [self.bos_token_id] if self.bos_token_id is not None and add_special_tokens else []
        return {"input_ids": [prefix + [ord(c) for c in d] for d in docs]}


def test_stdlib_split_is_disjoint_and_nonempty():
    train, held = stdlib_documents("train"), stdlib_documents("heldout")
    assert len(train) > 5 * len(held) > 0
    assert not set(train) & set(held)


def test_eos_ends_documents_without_bos_and_bos_starts_them_with_it():
    assert tokenize_stream(["ab", "c"], _Tok()).tolist() == [97, 98, 0, 99, 0]
    assert tokenize_stream(["ab", "c"], _Tok(bos=1)).tolist() == [1, 97, 98, 1, 99]


def test_pack_drops_the_remainder_and_refuses_too_little():
    blocks = pack(["abcdefg"], _Tok(), 3)
    assert blocks.tolist() == [[97, 98, 99], [100, 101, 102]]
    with pytest.raises(UserError, match="fewer than one block"):
        pack(["a"], _Tok(), 10)


def test_batches_are_a_function_of_seed_and_step_only():
    blocks = torch.arange(50).view(10, 5)
    a, b = Batches(blocks, 4, seed=3), Batches(blocks, 4, seed=3)
    assert torch.equal(a(7)["input_ids"], b(7)["input_ids"])  # b never saw steps 0..6
    assert not torch.equal(a(7)["input_ids"], Batches(blocks, 4, seed=4)(7)["input_ids"])
    # one epoch covers every block exactly once, and named rows stay aligned
    seen = torch.cat([a(i)["input_ids"] for i in range(5)])[:10]
    assert sorted(seen[:, 0].tolist()) == list(range(0, 50, 5))
    paired = Batches({"input_ids": blocks, "labels": blocks + 100}, 3, seed=0)(2)
    assert torch.equal(paired["labels"], paired["input_ids"] + 100)


def test_text_sources_txt_jsonl_json(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\nthree")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "p"}, {"body": "q"}]))
    assert load_documents(TextSource(source=str(tmp_path / "a.txt"))) == ["one", "two", "\nthree"]
    assert load_documents(TextSource(source=str(tmp_path / "b.jsonl"))) == ["x", "y"]
    assert load_documents(TextSource(source=str(tmp_path / "c.json"), field="body")) == ["p", "q"]
    with pytest.raises(UserError, match="'text' string field"):
        load_documents(TextSource(source=str(tmp_path / "c.json")))
    assert split_heldout(list("abcdefghijklmnopqrstuvwxyz"), 0.1) == (list("abcdefghijklmnopqrstuvwx"), list("yz"))


def test_identity_follows_file_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = TextSource(source=str(f)).identity()
    f.write_text("two")
    assert TextSource(source=str(f)).identity() != first
