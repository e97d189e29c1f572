"""The embedded torch engine in-process: batching, sampling, stops, limits, cancellation, shutdown.

Real parts only: the tiny random Llama with SmolLM2's tokenizer (fast) and SmolLM2 itself for EOS and
chat; references are transformers' own ``generate``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from maskpro.serve.config import EngineConfig
from maskpro.serve.engine import TorchEngine
from maskpro.serve.protocol import (
    ClientCancelledError,
    MaxTokensError,
    PromptTooLongError,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
    UnavailableError,
)
from maskpro.serve.streaming import IncrementalDetokenizer, StopMatcher

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "def fibonacci(n):",
           "1, 2, 3, 4,", "Water boils at", "The quick brown fox jumps over the lazy dog. The quick brown fox"]


def _reference(engine: TorchEngine, prompt: str, n: int) -> str:
    """transformers' greedy decoding of the engine's own model: the text the engine must reproduce."""
    inputs = engine.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=engine.pad_id)
    return engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), max_batch_size=8, max_new_tokens=256))
    engine.start()
    yield engine
    engine.stop()


def _engine(path, **kw) -> TorchEngine:
    engine = TorchEngine(EngineConfig(model=str(path), **kw))
    engine.start()
    return engine


# ------------------------------------------------------------------------------------------- text helpers

def test_incremental_detokenizer_multibyte(smollm2_tokenizer):
    """Deltas of a byte-level BPE stream never split a character and add up to the full decode."""
    text = "Grüße aus Zürich: 東京は晴れ 🙂🚀 naïve café — ok"
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == smollm2_tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 2, "multi-token characters should be held back until complete"


def test_incremental_detokenizer_flushes_a_cut_character(smollm2_tokenizer):
    ids = smollm2_tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == smollm2_tokenizer.decode(ids[:1])  # what a full decode of the cut stream gives


def test_stop_matcher_holds_back_and_cuts():
    m = StopMatcher(["o W", "###"])
    out = [m.feed("Hel"), m.feed("lo"), m.feed(" W")]
    assert out[0] == ("Hel", False)
    assert out[1] == ("l", False)      # "o" could start "o W"
    assert out[2] == ("", True)        # "Hell" was already out; the stop sequence is cut
    assert m.text == "Hell"
    m = StopMatcher(["o W"])
    assert m.feed("Hello World") == ("Hell", True)
    m = StopMatcher(["###"])
    assert m.feed("a#") == ("a", False) and m.feed("#b") == ("##b", False) and m.flush() == ""


# ------------------------------------------------------------------------------------------- generation

def test_greedy_matches_transformers_generate_alone_and_batched(tiny_engine):
    n = 24
    refs = {p: _reference(tiny_engine, p, n) for p in PROMPTS}
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for p in PROMPTS[:2]:
        c = tiny_engine.generate(p, params)
        assert (c.text, c.finish_reason, c.completion_tokens) == (refs[p], "length", n)
    # all at once: one left-padded prefill group, decoded together
    before = tiny_engine.stats()
    handles = [tiny_engine.submit(tiny_engine.encode_prompt(p), params, loop=None) for p in PROMPTS]
    assert [h.result().text for h in handles] == [refs[p] for p in PROMPTS]
    after = tiny_engine.stats()
    assert after["batched_steps"] - before["batched_steps"] >= n - 1 and after["max_rows"] >= 2
    # staggered: later requests join the running batch mid-decode (cache merge + row removal)
    results: dict[str, str] = {}

    def client(i: int, p: str) -> None:
        time.sleep(0.01 * i)
        results[p] = tiny_engine.generate(p, SamplingParams(max_tokens=n - 2 * i, temperature=0.0,
                                                            ignore_eos=True)).text

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(PROMPTS):  # each equals greedy decoding of its own length, alone
        assert results[p] == _reference(tiny_engine, p, n - 2 * i) and results[p], (p, results[p])
    assert tiny_engine.stats()["batched_steps"] > after["batched_steps"]  # the staggered ones ran together


def test_sampling_seed_and_top_p(tiny_engine):
    prompt = PROMPTS[0]
    a = tiny_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    b = tiny_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    c = tiny_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
    assert a.text == b.text and a.text != c.text
    # top_p so small that only the most likely token survives: sampling equals greedy
    greedy = tiny_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    nucleus = tiny_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0.7, top_p=1e-6, seed=3,
                                                          ignore_eos=True))
    assert nucleus.text == greedy.text


def test_frequency_penalty_changes_greedy_output(tiny_engine):
    prompt = PROMPTS[3]
    plain = tiny_engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    penalized = tiny_engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                            frequency_penalty=2.0, presence_penalty=2.0))
    ids = tiny_engine.tokenizer(penalized.text, add_special_tokens=False)["input_ids"]
    assert plain.text != penalized.text
    assert len(set(ids)) >= len(set(tiny_engine.tokenizer(plain.text, add_special_tokens=False)["input_ids"]))


def test_stop_sequence_cuts_text(tiny_engine):
    prompt = PROMPTS[1]
    full = tiny_engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = tiny_engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                      stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]


@pytest.mark.slow
def test_eos_ends_generation_and_chat_template(smollm2_path):
    """SmolLM2-Instruct answers a chat turn and stops at <|im_end|>: finish_reason 'stop', EOS not in text."""
    threads = torch.get_num_threads()
    engine = _engine(smollm2_path, max_new_tokens=96, threads=1)
    try:
        messages = [{"role": "user", "content": "Say hello."}]
        ids = engine.encode_chat(messages)
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        c = engine.submit(ids, SamplingParams(max_tokens=96, temperature=0.0), loop=None).result()
        assert c.finish_reason == "stop" and c.completion_tokens < 96
        assert "<|im_end|>" not in c.text and c.text.strip()
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        with torch.inference_mode():
            out = engine.model.generate(**inputs, max_new_tokens=96, do_sample=False)
        assert c.text == engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert engine.info()["sparsity"]["layers"] == 0  # the raw model is not 2:4: nothing swapped (CPU or GPU)
    finally:
        engine.stop()
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ limits

def test_limits_raise_client_errors(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_prompt_tokens=8, max_new_tokens=10)
    try:
        with pytest.raises(PromptTooLongError) as e:
            engine.submit(list(range(100, 120)), SamplingParams(max_tokens=4))
        assert e.value.status == 400 and e.value.param == "prompt" and "20 tokens" in e.value.message
        with pytest.raises(MaxTokensError) as e:
            engine.submit([100, 101], SamplingParams(max_tokens=11))
        assert e.value.status == 400 and e.value.param == "max_tokens"
        assert engine.submit([100, 101], SamplingParams(temperature=0.0, ignore_eos=True), loop=None,
                             default_max_tokens=3).result().completion_tokens == 3
    finally:
        engine.stop()


def test_queue_full_and_timeout(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_batch_size=1, max_queue=1, max_new_tokens=500, request_timeout_s=0.15)
    try:
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        accepted, refused = [], 0
        for _ in range(4):
            try:
                accepted.append(engine.submit([100, 101, 102], long, loop=None))
            except QueueFullError as e:
                assert e.status == 429
                refused += 1
        assert refused >= 1 and accepted
        for h in accepted:  # 500 tokens take longer than 0.15 s; waiting ones time out in the queue
            with pytest.raises(RequestTimeoutError) as e:
                h.result()
            assert e.value.status == 504
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------ async, cancel, stop

def test_async_stream_cancel_and_shutdown(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_new_tokens=500)

    async def scenario():
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        # a stream that the client abandons after a few deltas
        h = engine.submit([100, 101, 102], params)
        got = []
        async for event in h:
            got.append(event)
            if len(got) == 3:
                h.cancel()
                break
        tail = [await asyncio.wait_for(h.next_event(), 10)]
        while not hasattr(tail[-1], "error") and not hasattr(tail[-1], "finish_reason"):
            tail.append(await asyncio.wait_for(h.next_event(), 10))
        assert isinstance(tail[-1].error, ClientCancelledError)
        for _ in range(100):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats()["running"] == 0
        # shutdown: the running request ends with 503 after the grace period, new ones are refused
        h = engine.submit([100, 101, 102], params)
        await asyncio.wait_for(h.next_event(), 10)
        engine.begin_shutdown(0.05)
        with pytest.raises(UnavailableError):
            engine.submit([100], params)
        events = [await asyncio.wait_for(h.next_event(), 10)]
        while not hasattr(events[-1], "error") and not hasattr(events[-1], "finish_reason"):
            events.append(await asyncio.wait_for(h.next_event(), 10))
        assert isinstance(events[-1].error, UnavailableError) and events[-1].error.status == 503

    try:
        asyncio.run(scenario())
    finally:
        t0 = time.monotonic()
        engine.stop(10)
        assert time.monotonic() - t0 < 5 and not engine._thread.is_alive()
        assert not engine.is_ready()
