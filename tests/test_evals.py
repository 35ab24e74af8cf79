"""Benchmark tasks over local files: the published formats are parsed as documented, and every
task scores what the stock lm-eval task defines, checked against log-likelihoods computed here
by hand with a tiny model (prompts written out literally, so a wrong prompt or choice order
shows). The data folder is written by the tests in the shared folder's layout."""

import bz2
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from compressor import UserError
from compressor.evaldata import hellaswag_rows, parse_item, text_documents, user_task_name, wikitext_pages
from compressor.measure import EvalSpec
from compressor.models import load_pretrained
from compressor.tasks import evaluate, local_task_names, materialize, problem

QUESTION = "Please choose the correct answer to the question: "


def mc_item(question, choices, gold, word="answer", preamble=QUESTION, sep=" "):
    marks = sep.join(f"{word.capitalize()}{i + 1}: {c}" for i, c in enumerate(choices))
    keys = "/".join(f"{word}{i + 1}" for i in range(len(choices)))
    return {
        "instruction": f"{preamble}{question}\n\n{marks}\n\nAnswer format: {keys}",
        "input": "",
        "output": f"the correct answer is {word}{gold + 1}",
        "answer": f"{word}{gold + 1}",
    }


def test_the_prompt_format_parses_into_question_choices_and_gold():
    item = parse_item(mc_item("Which is a fruit?", ["a rock", "an apple: red", "a car"], 1), "x")
    assert (item.question, item.choices, item.gold) == ("Which is a fruit?", ["a rock", "an apple: red", "a car"], 1)
    piqa = parse_item(mc_item("Open a jar", ["twist the lid ", "Solution: hit it"], 0, "solution", sep="\n\n"), "x")
    assert piqa.choices == ["twist the lid", "Solution: hit it"] and piqa.gold == 0
    wino = mc_item("Tom beat Bob so _ won.", ["Tom", "Bob"], 0, "option", "Please choose ... sentence: ")
    wino["instruction"] = wino["instruction"].replace("\n\nAnswer format", " Answer format")
    assert parse_item(wino, "x").choices == ["Tom", "Bob"]
    for broken, why in [
        ({"instruction": "no format line"}, "Answer format"),
        (dict(mc_item("q", ["a", "b"], 0), answer="answer3"), "not one of"),
        ({"instruction": "Q: q\n\nAnswer1: a\n\nAnswer format: answer1/answer2"}, "Answer2"),
        (["not", "an", "object"], "expected an object"),
    ]:
        with pytest.raises(Exception, match=why):
            parse_item(broken, "file.json item 0")


def test_text_wikitext_and_hellaswag_files_convert_as_documented(tmp_path):
    docs = text_documents("a" * 3000 + "\n\n" + "b" * 1500 + "\n\n\n" + "c" * 10 + "\n\n  \n\n")
    assert [len(d["text"]) for d in docs] == [4502, 10]
    wiki = tmp_path / "wt.txt"
    wiki.write_text(" \n = One = \n \n Text of one .\n = = Part = = \n More .\n = Two = \n Text two .\n")
    pages = wikitext_pages(wiki)
    assert [p["page"].splitlines()[0] for p in pages] == [" = One = ", " = Two = "]
    assert " = = Part = = " in pages[0]["page"] and len(pages) == 2
    hs = tmp_path / "hs.txt.bz2"
    hs.write_bytes(bz2.compress(b"Cooking: A man cuts. he\n2\na\nb\nc\nd\n"))
    assert hellaswag_rows(hs) == [
        {"activity_label": "Cooking", "ctx_a": "A man cuts. he", "ctx_b": "", "endings": list("abcd"), "label": "2"}
    ]


# --- scoring against a hand computation --------------------------------------------------------


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def loglikelihood(model, tok, context, continuation):
    """lm-eval's definition: trailing spaces of the context move to the continuation, the pair
    is encoded whole and the context's tokens split off; sum of log-probs, and greedy match."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx, whole = encode(tok, context), encode(tok, context + continuation)
    cont = whole[len(ctx) :]
    logp = model(torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0, -len(cont) :]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@torch.no_grad()
def rolling_loglikelihood(model, tok, text, max_len, prefix):
    """Every token of `text` scored once, in disjoint windows of max_len, the first after `prefix`."""
    tokens = encode(tok, text)
    full, total = [prefix] + tokens, 0.0
    for start in range(0, len(tokens), max_len):
        end = min(start + max_len, len(tokens))
        first = max(0, end - max_len)
        logp = model(torch.tensor([full[first:end]])).logits.log_softmax(-1)[0]
        total += sum(logp[j - first, tokens[j]].item() for j in range(start, end))
    return total, len(tokens)


def choose(model, tok, context, choices, gold_rule):
    """Per choice log-likelihoods; the gold index follows `gold_rule` (so that the expected
    accuracy is known); returns (gold, acc, acc_norm) of the item."""
    lls = [loglikelihood(model, tok, ctx, cont)[0] for ctx, cont in (context(c) for c in choices)]
    best = max(range(len(lls)), key=lls.__getitem__)
    best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(context(choices[i])[1].lstrip(" ")))
    gold = best if gold_rule else (best + 1) % len(choices)
    return gold, float(best == gold), float(best_norm == gold)


@pytest.fixture(scope="module")
def tiny(tiny_teacher_folder):
    loaded = load_pretrained(str(tiny_teacher_folder), torch.device("cpu"))
    return loaded.model, loaded.tokenizer


QUESTIONS = [
    ("What do cats drink?", ["milk", "stones", "the sky"]),
    ("Where is the sun?", ["in the sky", "under the bed"]),
    ("What is two plus two?", ["four", "seven", "a tree", "blue"]),
    ("Which one is hot?", ["fire", "ice"]),
]


def test_every_task_scores_what_the_stock_task_defines(tiny, tmp_path):
    model, tok = tiny
    max_len = model.config.max_position_embeddings
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    data, want = tmp_path / "data", {}
    (data / "mc").mkdir(parents=True)
    rules = [True, False, True, True]  # gold = the model's choice on 3 of 4 items: acc 0.75

    def write_mc(name, word, context, sep=" ", preamble=QUESTION):
        items, accs, norms = [], [], []
        for (question, choices), rule in zip(QUESTIONS, rules):
            choices = choices[:2] if word != "answer" else choices
            gold, acc, norm = choose(model, tok, lambda c, q=question: context(q, c), choices, rule)
            items.append(mc_item(question, choices, gold, word, preamble, sep))
            accs.append(acc)
            norms.append(norm)
        (data / "mc" / f"{name}.test.json").write_text(json.dumps(items))
        return sum(accs) / len(accs), sum(norms) / len(norms)

    def arc(q, c):
        return f"Question: {q}\nAnswer:", f" {c}"

    for name in ("ARC-Easy", "ARC-Challenge"):
        task = "arc_easy_local" if name == "ARC-Easy" else "arc_challenge_local"
        want[f"{task}/acc"], want[f"{task}/acc_norm"] = write_mc(name, "answer", arc)
    want["piqa_local/acc"], want["piqa_local/acc_norm"] = write_mc("piqa", "solution", arc, sep="\n\n")

    sentences = [
        ("Tom gave Ann a gift because _ was kind.", ["Tom", "Ann"]),
        ("The cup broke since _ fell.", ["it", "he"]),
    ]
    wino, accs = [], []
    for i, (sentence, options) in enumerate(sentences):
        cut = sentence.index("_")
        gold, acc, _ = choose(
            model, tok, lambda o, s=sentence, c=cut: (s[:c] + o, " " + s[c + 1 :].strip()), options, i == 0
        )
        wino.append(mc_item(sentence, options, gold, "option", "Please choose ... sentence: "))
        accs.append(acc)
    (data / "mc" / "winogrande.test.json").write_text(json.dumps(wino))
    want["winogrande_local/acc"] = sum(accs) / len(accs)

    lines, accs, norms = [], [], []
    for (question, choices), rule in zip(QUESTIONS, rules):
        endings = (choices * 4)[:4]
        endings = [f"{e} {i}" for i, e in enumerate(endings)]
        gold, acc, norm = choose(model, tok, lambda e, q=question: (f"Quiz: {q}", f" {e}"), endings, rule)
        lines += [f"Quiz: {question}", str(gold)] + endings
        accs.append(acc)
        norms.append(norm)
    (data / "hellaswag").mkdir()
    (data / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress("\n".join(lines).encode() + b"\n"))
    want["hellaswag_local/acc"], want["hellaswag_local/acc_norm"] = sum(accs) / 4, sum(norms) / 4

    texts = ["the cat sat on the mat", "a dog ran to the park and back", "one two three four five six"]
    scored = [loglikelihood(model, tok, " ".join(t.split()[:-1]), " " + t.split()[-1]) for t in texts]
    (data / "lambada").mkdir()
    (data / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    want["lambada_openai_local/acc"] = sum(g for _, g in scored) / 3
    want["lambada_openai_local/perplexity"] = math.exp(-sum(ll for ll, _ in scored) / 3)

    story = "\n\n".join(f"Once upon a time a fox number {i} found a red ball and played all day." for i in range(60))
    (data / "tinystories").mkdir()
    (data / "tinystories" / "tinystories_val.txt").write_text(story)
    docs = [d["text"] for d in text_documents(story)]
    assert len(docs) == 2
    rolled = [rolling_loglikelihood(model, tok, d, max_len, prefix) for d in docs]
    nll, tokens = -sum(ll for ll, _ in rolled), sum(n for _, n in rolled)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    assert tokens > 2 * max_len  # several windows per document
    want["tinystories_local/token_perplexity"] = math.exp(nll / tokens)
    want["tinystories_local/word_perplexity"] = math.exp(nll / words)
    want["tinystories_local/bits_per_byte"] = nll / sum(len(d.encode()) for d in docs) / math.log(2)

    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    wiki = " = Cats = \n \n Cats like milk . They sleep @-@ a lot .\n = Dogs = \n \n Dogs run , bark and play .\n"
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wt2_tokens.test.txt").write_text(wiki)
    pages = [p["page"] for p in wikitext_pages(data / "wikitext2" / "wt2_tokens.test.txt")]
    rolled = [rolling_loglikelihood(model, tok, wikitext_detokenizer({"page": p}), max_len, prefix) for p in pages]
    nll = -sum(ll for ll, _ in rolled)
    want["wikitext_local/word_perplexity"] = math.exp(nll / sum(len(re.split(r"\s+", p)) for p in pages))
    want["wikitext_local/token_perplexity"] = math.exp(nll / sum(n for _, n in rolled))

    tasks = sorted({k.split("/")[0] for k in want})
    got, higher = evaluate(model, tok, EvalSpec(tasks=tasks, data_dir=str(data), batch_size=1))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key
    # which way each metric improves is lm-eval's own declaration (and ours for token perplexity)
    assert higher["arc_easy_local/acc"] and higher["hellaswag_local/acc_norm"] and higher["lambada_openai_local/acc"]
    assert not higher["wikitext_local/word_perplexity"] and not higher["lambada_openai_local/perplexity"]
    assert not higher["tinystories_local/token_perplexity"] and not higher["tinystories_local/bits_per_byte"]
    assert set(higher) == set(got)


def test_a_users_own_files_are_tasks_by_naming_them(tiny, tmp_path, write_recipe):
    """One step, no Python: name `mc:FILE.json` / `ppl:FILE.txt` among the recipe's tasks."""
    model, tok = tiny
    items = [mc_item(q, c, 0) for q, c in QUESTIONS]
    (tmp_path / "My Quiz.json").write_text(json.dumps(items))
    (tmp_path / "notes.txt").write_text("First note about cats.\n\nSecond note about dogs.\n")
    assert user_task_name("mc:My Quiz.json") == "mc_my_quiz"
    spec = EvalSpec.model_validate(
        {"tasks": ["mc:My Quiz.json", "ppl:notes.txt"], "batch_size": 1}, context={"base": tmp_path}
    )
    got, _ = evaluate(model, tok, spec)
    accs = [choose(model, tok, lambda c, q=q: (f"Question: {q}\nAnswer:", f" {c}"), c, True) for q, c in QUESTIONS]
    assert got["mc_my_quiz/acc"] == sum(a[0] == 0 for a in accs) / len(accs)
    text = "First note about cats.\n\nSecond note about dogs.\n"
    ll, n = rolling_loglikelihood(model, tok, text, model.config.max_position_embeddings, tok.eos_token_id)
    assert got["ppl_notes/token_perplexity"] == pytest.approx(math.exp(-ll / n), rel=1e-4)


def test_a_users_task_folder_reads_data_beside_its_yaml(tiny, tmp_path):
    """The other no-Python step: a YAML beside a JSONL file, relative path made absolute."""
    model, tok = tiny
    rows = [
        {"q": "def f(x):", "choices": ["return x", "import x"], "label": 0},
        {"q": "for i in", "choices": ["range(3):", "while:", "pass"], "label": 2},
        {"q": "class A", "choices": ["(object):", "= 1"], "label": 1},
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.yaml").write_text(
        "task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mine.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    assert "my_mc" in local_task_names((tmp_path,))
    got, _ = evaluate(model, tok, EvalSpec(tasks=["my_mc"], task_dirs=[str(tmp_path)], batch_size=2))
    correct = 0
    for row in rows:
        lls = [loglikelihood(model, tok, row["q"], " " + c)[0] for c in row["choices"]]
        correct += max(range(len(lls)), key=lls.__getitem__) == row["label"]
    assert got["my_mc/acc"] == pytest.approx(correct / len(rows))
    assert str(tmp_path / "mine.jsonl") in next(materialize((tmp_path,)).rglob("mine.yaml")).read_text()


def test_an_answer_longer_than_the_scoring_context_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny
    long_choice = " ".join(["a very long answer"] * 20)
    (tmp_path / "long.json").write_text(json.dumps([mc_item("Why?", [long_choice, "no"], 0)]))
    spec = EvalSpec(tasks=[f"mc:{tmp_path / 'long.json'}"], max_length=16)
    with pytest.raises(UserError, match="longer than the scoring context of 16 .*eval.max_length"):
        evaluate(model, tok, spec)


def test_missing_data_and_broken_user_files_are_one_line_errors(tmp_path):
    assert "hellaswag/hellaswag_val_full.txt.bz2 under" in problem(["hellaswag_local"], (), str(tmp_path))
    assert problem(["mc:" + str(tmp_path / "absent.json")]) == f"mc:{tmp_path / 'absent.json'}: file not found"
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "What? Answer1: a", "answer": "answer1"}]))
    assert "Answer format" in problem([f"mc:{tmp_path / 'bad.json'}"])
    assert "unknown task 'nope'" in problem(["stdlib_mc", "nope"])
    out = subprocess.run(
        [sys.executable, "-m", "compressor", "eval", "x", "--tasks", "arc_easy_local", "--data-dir", str(tmp_path)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "mc/ARC-Easy.test.json" in out.stderr and not (tmp_path / "out").exists()


def test_each_task_is_scored_on_its_own_limit(tiny, monkeypatch):
    import lm_eval

    calls = []
    real = lm_eval.simple_evaluate

    def spy(**kwargs):
        calls.append((tuple(kwargs["tasks"]), kwargs["limit"]))
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    model, tok = tiny
    spec = EvalSpec(tasks=["stdlib_mc", "stdlib_ppl"], limit={"default": 6, "stdlib_ppl": 2}, batch_size=4)
    got, _ = evaluate(model, tok, spec)
    assert sorted(calls) == [(("stdlib_mc",), 6), (("stdlib_ppl",), 2)]
    assert {"stdlib_mc/acc", "stdlib_ppl/token_perplexity"} <= set(got)
    with pytest.raises(ValueError, match="not among eval.tasks"):
        EvalSpec(tasks=["stdlib_mc"], limit={"default": 6, "arc_easy_local": 2})
