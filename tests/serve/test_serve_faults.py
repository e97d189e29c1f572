"""Device faults in the embedded engine: out of memory fails one request, a broken device stops the engine.

A CPU has no device memory to run out of, so the faults are injected into the real model's forward pass
(the engine, its batching, KV cache and sampling are all real): out-of-memory where a CUDA allocator would
raise it, and CUDA's sticky "illegal memory access" after which a process cannot use its GPU again.
"""

from __future__ import annotations

import threading

import pytest
import torch
from maskpro.serve.config import EngineConfig
from maskpro.serve.engine import TorchEngine
from maskpro.serve.protocol import OutOfMemoryError, SamplingParams, ServeError, UnavailableError

SHORT = ["The capital of France is", "1, 2, 3, 4,", "Water boils at"]
LONG = "Once upon a time, in a land far away, there lived a king who had three daughters and a " * 3
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _engine(path) -> TorchEngine:
    engine = TorchEngine(EngineConfig(model=str(path), max_batch_size=8, max_new_tokens=64, kv_cache="dynamic"))
    engine.start()
    return engine


def _references(engine: TorchEngine) -> dict[str, str]:
    return {p: engine.generate(p, GREEDY).text for p in SHORT}


def _inject(engine: TorchEngine, fault) -> None:
    """Run ``fault(input_ids, attention_mask)`` around every forward of the engine's real model."""
    forward = engine.model.forward

    def faulty(*args, **kw):
        fault(kw["input_ids"], kw.get("attention_mask"), before=True)
        out = forward(*args, **kw)
        fault(kw["input_ids"], kw.get("attention_mask"), before=False)  # after the cache was written
        return out

    engine.model.forward = faulty


def _run_together(engine: TorchEngine, prompts: list[str]) -> dict[str, object]:
    """Submit all prompts at once (one admission) and collect each completion or error."""
    results: dict[str, object] = {}
    handles = []
    for p in prompts:
        try:
            handles.append((p, engine.submit(engine.encode_prompt(p), GREEDY, loop=None)))
        except ServeError as e:  # refused at the door (e.g. the engine already stopped)
            results[p] = e

    def wait(p, h):
        try:
            results[p] = h.result().text
        except ServeError as e:
            results[p] = e

    threads = [threading.Thread(target=wait, args=ph) for ph in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(prompts), "a request hung"
    return results


def test_out_of_memory_in_prefill_fails_only_the_long_prompt(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    try:
        refs = _references(engine)
        n_long = len(engine.encode_prompt(LONG))

        def fault(ids, mask, before):
            if before and ids.shape[1] >= n_long:  # the long prompt does not fit, alone or padded with others
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        _inject(engine, fault)
        results = _run_together(engine, [LONG, *SHORT])
        assert isinstance(results[LONG], OutOfMemoryError) and results[LONG].status == 503
        assert "shorter prompt" in str(results[LONG])
        assert {p: results[p] for p in SHORT} == refs  # the others ran, output unchanged
        assert engine.is_ready() and engine.generate(SHORT[0], GREEDY).text == refs[SHORT[0]]
    finally:
        engine.stop()


def test_out_of_memory_in_decode_sheds_the_longest_context(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    try:
        refs = _references(engine)
        n_long = len(engine.encode_prompt(LONG))
        fired = []

        def fault(ids, mask, before):
            # a decode step of a batch that still holds the long context runs out of memory after the KV
            # cache of every layer was written, so the engine must also cut the cache back
            if not before and ids.shape[1] == 1 and mask.shape[1] > n_long and ids.shape[0] > 1 and not fired:
                fired.append(ids.shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB (injected)")

        _inject(engine, fault)
        results = _run_together(engine, [LONG, *SHORT])
        assert len(fired) == 1 and fired[0] >= 2
        assert isinstance(results[LONG], OutOfMemoryError) and f"{fired[0] - 1} other requests" in str(results[LONG])
        assert {p: results[p] for p in SHORT} == refs  # shed rows' neighbours decode exactly as alone
        assert engine.stats()["outcomes"].get("out_of_memory") == 1
    finally:
        engine.stop()


def test_sticky_device_error_stops_the_engine_and_answers_503(tiny_model_dir):
    from fastapi.testclient import TestClient
    from maskpro.serve.server import ServerConfig, create_app

    engine = _engine(tiny_model_dir)
    try:
        def fault(ids, mask, before):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

        _inject(engine, fault)
        results = _run_together(engine, SHORT)
        assert all(isinstance(r, ServeError) and "illegal memory access" in str(r) for r in results.values())
        engine._thread.join(10)
        assert not engine.is_ready() and "illegal memory access" in engine.stats()["stopped"]
        with pytest.raises(UnavailableError, match="must be restarted"):
            engine.submit(engine.encode_prompt(SHORT[0]), GREEDY, loop=None)
        client = TestClient(create_app(engine, ServerConfig()))
        health = client.get("/health")
        assert health.status_code == 503 and "illegal memory access" in health.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": engine.model_id, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "restarted" in r.json()["error"]["message"]
    finally:
        engine.stop()


def test_repeated_step_failures_stop_the_engine(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    try:
        def fault(ids, mask, before):
            raise ValueError("a bug that every step hits (injected)")

        _inject(engine, fault)
        for p in SHORT:  # one failed step each; the third in a row stops the engine
            with pytest.raises(ServeError):
                engine.generate(p, GREEDY)
        engine._thread.join(10)
        assert "a bug that every step hits" in engine.stats()["stopped"] and not engine.is_ready()
    finally:
        engine.stop()
