"""The static slot KV cache: the engine decoding from slots (eager on CPU, CUDA graphs on a GPU) must
produce exactly what transformers' own ``generate`` and the dynamic-cache engine produce, while rows of
different lengths join, leave (slot compaction) and grow across column buckets."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from maskpro.serve import slot_cache
from maskpro.serve.config import EngineConfig
from maskpro.serve.engine import TorchEngine
from maskpro.serve.protocol import SamplingParams

from maskpro.errors import MaskproError

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "def fibonacci(n):",
           "1, 2, 3, 4,", "Water boils at", "The quick brown fox jumps over the lazy dog. The quick brown fox"]
N = 20


_REFERENCE_MODELS: dict = {}


def _reference(engine: TorchEngine, prompt: str, n: int) -> str:
    """transformers' greedy decoding of the same checkpoint (its own cache): what the engine must reproduce.

    The checkpoint is loaded apart, at the engine's device and dtype: on a GPU the engine moves its weights
    into its own runtime (fused qkv and gate/up) and leaves the transformers modules without them.
    """
    from transformers import AutoModelForCausalLM

    key = (engine.config.model, str(engine.device), engine.model.dtype)
    if key not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[key] = AutoModelForCausalLM.from_pretrained(key[0], dtype=key[2]).to(engine.device).eval()
    inputs = engine.tokenizer(prompt, return_tensors="pt").to(engine.device)
    with torch.inference_mode():
        out = _REFERENCE_MODELS[key].generate(**inputs, max_new_tokens=n, do_sample=False,
                                              pad_token_id=engine.pad_id)
    return engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _run_staggered(engine: TorchEngine) -> dict[str, str]:
    """Requests arrive 10 ms apart with different lengths: joins mid-decode, early leavers, a queue."""
    results: dict[str, str] = {}

    def client(i: int, p: str) -> None:
        time.sleep(0.01 * i)
        results[p] = engine.generate(p, SamplingParams(max_tokens=N - 3 * i, temperature=0.0, ignore_eos=True)).text

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _check(engine: TorchEngine) -> None:
    refs = {p: _reference(engine, p, N) for p in PROMPTS}
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    assert engine.generate(PROMPTS[1], params).text == refs[PROMPTS[1]]
    handles = [engine.submit(engine.encode_prompt(p), params, loop=None) for p in PROMPTS]  # 6 rows, 4 slots
    assert [h.result().text for h in handles] == [refs[p] for p in PROMPTS]
    for p, text in _run_staggered(engine).items():
        assert refs[p].startswith(text) and text, (p, text, refs[p])


@pytest.fixture
def small_columns(monkeypatch) -> set[tuple[int, int]]:
    """Column buckets from 8 tokens, so short test prompts cross several of them; returns the buckets used."""
    monkeypatch.setattr(slot_cache, "MIN_COLUMNS", 8)
    used: set[tuple[int, int]] = set()
    buckets = slot_cache.SlotDecoder.buckets

    def recording(self, rows, longest):
        used.add(buckets(self, rows, longest))
        return buckets(self, rows, longest)
    monkeypatch.setattr(slot_cache.SlotDecoder, "buckets", recording)
    return used


def test_static_cache_matches_generate_on_cpu(tiny_model_dir, small_columns):
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", kv_cache="static", max_batch_size=4,
                                      max_prompt_tokens=40, max_new_tokens=40))
    engine.start()
    try:
        info, cache, cfg = engine.info(), engine._decoder.cache, engine.model.config
        held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        assert held == 2 * cfg.num_hidden_layers * 4 * cfg.num_key_value_heads * 80 * head_dim * 4  # K, V fp32
        assert info["kv_cache"] == {"kind": "static", "slots": 4, "capacity_tokens": 80, "bytes": held,
                                    "gib": round(held / 2**30, 3)}
        assert info["cuda_graphs"]["active"] is False and info["cuda_graphs"]["why"] == "not on a GPU"
        _check(engine)
    finally:
        engine.stop()
    assert {r for r, _ in small_columns} == {1, 2, 4} and {c for _, c in small_columns} >= {16, 32}


def test_bucket_sizes():
    cache = slot_cache.SlotCache(1, 6, 300, 1, 4, torch.float32, torch.device("cpu"))
    dec = slot_cache.SlotDecoder(torch.nn.Linear(1, 1), cache, graphs=False)
    assert dec.buckets(1, 1) == (1, 128)
    assert dec.buckets(3, 129) == (4, 256)
    assert dec.buckets(5, 299) == (6, 300)   # capped at the slots and the capacity


def test_keep_compacts_rows():
    cache = slot_cache.SlotCache(1, 4, 8, 1, 2, torch.float32, torch.device("cpu"))
    for t in cache.keys + cache.values:
        t.copy_(torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand_as(t))
    cache.keep([1, 3], columns=8)
    assert cache.keys[0][:2, 0, :, 0].tolist() == [[1.0] * 8, [3.0] * 8]


def test_keep_within_a_range_leaves_earlier_slots_alone():
    """A prefilled group sits after the running rows; a row of it that finished at once is compacted away
    within the group."""
    cache = slot_cache.SlotCache(1, 5, 4, 1, 2, torch.float32, torch.device("cpu"))
    for t in cache.keys + cache.values:
        t.copy_(torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand_as(t))
    cache.from_slot(2).keep([0, 2], columns=4)  # group = slots 2, 3, 4; its row 1 (slot 3) left
    assert cache.values[0][:4, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 4.0]


def test_right_padded_prefill_loads_each_rows_tokens_from_column_zero(tiny_model_dir):
    """Rows of different lengths prefilled together: each slot holds what the row alone would, from column 0,
    and the logits are those of the row's own last token."""
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", kv_cache="static", max_batch_size=4,
                                      max_prompt_tokens=40, max_new_tokens=8))
    dec, prompts = engine._decoder, [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
    with torch.inference_mode():
        together = dec.prefill(prompts, 1, engine.pad_id)
        keys = [dec.cache.keys[0][1 + i, :, :len(p)].clone() for i, p in enumerate(prompts)]
        for i, p in enumerate(prompts):
            alone = dec.prefill([p], 0, engine.pad_id)
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(keys[i], dec.cache.keys[0][0, :, :len(p)], rtol=1e-4, atol=1e-4)


def test_requests_finishing_at_their_first_token_leave_the_slots_in_order(tiny_model_dir):
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", kv_cache="static", max_batch_size=4,
                                      max_prompt_tokens=40, max_new_tokens=40))
    engine.start()
    try:
        refs = {p: _reference(engine, p, 12) for p in PROMPTS[:4]}
        sizes = [1, 12, 1, 12]
        handles = [engine.submit(engine.encode_prompt(p), SamplingParams(max_tokens=n, temperature=0.0,
                                                                         ignore_eos=True), loop=None)
                   for p, n in zip(PROMPTS[:4], sizes)]
        for h, p, n in zip(handles, PROMPTS[:4], sizes):
            out = h.result()
            assert out.completion_tokens == n and refs[p].startswith(out.text), (p, out.text, refs[p])
        assert engine.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0,
                                                          ignore_eos=True)).text == refs[PROMPTS[1]]
    finally:
        engine.stop()


def test_auto_is_dynamic_on_cpu_and_bad_choice_fails(tiny_model_dir):
    with pytest.raises(MaskproError, match="unknown kv_cache 'paged'; choose one of auto, static, dynamic"):
        EngineConfig(model=str(tiny_model_dir), kv_cache="paged").validate()
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_batch_size=2))
    assert engine.info()["kv_cache"] == {"kind": "dynamic", "why": "not on a GPU"}


@pytest.mark.gpu
def test_cuda_graph_decode_matches_dynamic_cache(tiny_model_dir, small_columns):
    """fp32 on the GPU so the two caches may only differ by summation order, far below a token flip."""
    kw = {"model": str(tiny_model_dir), "device": "cuda", "dtype": "fp32", "max_batch_size": 4,
          "max_prompt_tokens": 40, "max_new_tokens": 40}
    engine = TorchEngine(EngineConfig(**kw))
    engine.start()
    try:
        assert engine.info()["kv_cache"]["kind"] == "static"
        _check(engine)
        graphs = engine.info()["cuda_graphs"]
        # one decode graph per (rows, columns) bucket these prompts reach: three of them
        assert graphs["active"] is True and graphs["captured"] >= 3, graphs
        assert graphs["prefill"]["active"] is True and graphs["prefill"]["captured"] >= 3, graphs  # lengths 16..64
    finally:
        engine.stop()
    eager = TorchEngine(EngineConfig(**kw, kv_cache="dynamic"))
    assert eager.info()["cuda_graphs"]["active"] is False


def test_forward_calls_use_this_transformers_cache_keyword():
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40); the GPU image's
    5.17 knows only the old one. The slot decoder must pass whichever this version takes, without warnings."""
    import warnings

    from maskpro.models import cache_kwarg, tiny_llama

    model = tiny_llama()
    cfg = model.config
    cache = slot_cache.SlotCache(cfg.num_hidden_layers, 2, 64, cfg.num_key_value_heads,
                                 cfg.hidden_size // cfg.num_attention_heads, torch.float32, torch.device("cpu"))
    dec = slot_cache.SlotDecoder(model, cache, graphs=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        logits = dec.prefill([[1, 2, 3]], 0, 0)
        dec.step(logits.argmax(-1), [3])
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    import inspect

    assert cache_kwarg(model) in inspect.signature(model.forward).parameters
