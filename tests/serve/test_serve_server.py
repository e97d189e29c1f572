"""``maskpro-serve`` as a real process on loopback, driven by the official openai client and httpx.

Fast tests use the tiny random Llama (SmolLM2's tokenizer); the ``slow`` ones serve SmolLM2 itself and
compare its greedy text with transformers' ``generate``. Launcher tests run the real supervisor around a
real child server; vLLM and TensorRT-LLM themselves are not installable here, so only their command lines
and the missing-package path are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch
from maskpro.serve import backends
from maskpro.serve.cli import main as cli_main
from prometheus_client.parser import text_string_to_metric_families

from maskpro.errors import MaskproError

HOST = "127.0.0.1"
ERROR_KEYS = {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------------------------ harness

@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    model: str
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2.0, verify=False).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(model: Path, log_dir: Path, *args: str, name: str | None = None, env: dict | None = None,
          scheme: str = "http") -> Iterator[Server]:
    """Start ``python -m maskpro.serve.cli MODEL`` on a free loopback port and wait for /health."""
    for _ in range(3):
        port = _free_port()
        log = log_dir / f"server-{port}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "maskpro.serve.cli", str(model), "--host", HOST, "--port",
                                     str(port), "--log-level", "warning", *args],
                                    stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        server = Server(proc, port, log, name or Path(model).name, scheme)
        if _wait_healthy(proc, server.url, 180):
            break
        _stop(proc)
        if "cannot listen" not in log.read_text():  # a port race is retried, anything else is a failure
            raise AssertionError(f"server did not start:\n{server.log_tail()}")
    else:
        raise AssertionError("no free port")
    try:
        yield server
    finally:
        _stop(proc)


def _sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a server-sent-event stream, checking the framing."""
    raw = response.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    out = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        out.append(block[len("data: "):])
    return out


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) >= {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


# --------------------------------------------------------------------------------------- tiny-model server

@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    with serve(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--served-model-name", "tiny",
               "--max-prompt-tokens", "32", "--max-tokens", "400", "--max-batch-size", "4",
               name="tiny") as server:
        yield server


def test_health_and_models(tiny_server):
    health = httpx.get(tiny_server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["backend"] == "torch"
    assert health["sparsity"]["backend"] == "dense" and health["max_prompt_tokens"] == 32
    assert health["cuda_graphs"]["active"] is False
    client = tiny_server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_malformed_and_refused_requests(tiny_server):
    url = tiny_server.url
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    ok = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    e = _error(post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type":
                                                                                          "application/json"}), 400)
    assert "not valid JSON" in e["message"]
    assert _error(post("/v1/completions", json={**ok, "max_tokens": "2"}), 400)["param"] == "max_tokens"
    assert _error(post("/v1/completions", json={**ok, "prompt": 7}), 400)["param"] == "prompt"
    assert _error(post("/v1/completions", json={**ok, "temperature": 9}), 400)["param"] == "temperature"
    assert _error(post("/v1/completions", json={"prompt": "x"}), 400)["param"] == "model"
    assert _error(post("/v1/completions", json=[ok]), 400)["param"] is None
    assert _error(post("/v1/completions", json={**ok, "n": 2}), 400)["param"] == "n"
    assert _error(post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400)["param"] == "messages"
    assert _error(post("/v1/chat/completions", json={"model": "tiny"}), 400)["param"] == "messages"
    assert _error(post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}),
                  400)["param"] == "messages.0.role"
    assert _error(post("/v1/completions", json={**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert _error(post("/v1/nothing", json=ok), 404)["code"] == "not_found"
    assert _error(httpx.get(url + "/v1/completions"), 405)["code"] == "method_not_allowed"
    too_long = " ".join(["word"] * 200)
    e = _error(post("/v1/completions", json={**ok, "prompt": too_long}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "prompt"
    e = _error(post("/v1/completions", json={**ok, "max_tokens": 401}), 400)
    assert e["param"] == "max_tokens" and "400" in e["message"]
    assert _error(post("/v1/completions", content=b"x" * (5 * 1024 * 1024),
                       headers={"content-type": "application/json"}), 413)["code"] == "payload_too_large"
    # the official client maps them to its exception types
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=too_long, max_tokens=2)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    # the server is still healthy after all that
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices[0].text


def test_completion_streams_and_schemas(tiny_server):
    body = {"model": "tiny", "prompt": "The weather today", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=30).json()
    assert full["object"] == "text_completion" and full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 20
    assert full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + 20
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=30,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    # chat through the official client, streamed and not
    client = tiny_server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kw = dict(model="tiny", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kw)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert stream[-1].usage.completion_tokens == reply.usage.completion_tokens == 12
    # a stop sequence taken from the text itself ends the completion there
    text = reply.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.index(stop)]


def test_concurrent_requests_match_sequential(tiny_server):
    client = tiny_server.client()
    prompts = [f"Story number {i}: once upon a time" + " and then" * i for i in range(8)]

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=16 + 2 * len(prompt) % 7,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(p) for p in prompts]
    before = httpx.get(tiny_server.url + "/health").json()["batched_steps"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone and all(alone)
    health = httpx.get(tiny_server.url + "/health").json()
    # the server's own counters: the requests were decoded together, not one after another
    assert health["batched_steps"] - before >= 8 and health["max_rows"] >= 3, health


def test_disconnect_cancels_and_metrics(tiny_server):
    before = httpx.get(tiny_server.url + "/health").json()["outcomes"].get("client_closed_request", 0)
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 400, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    for _ in range(100):  # the engine drops the row at its next step
        health = httpx.get(tiny_server.url + "/health").json()
        if health["outcomes"].get("client_closed_request", 0) > before and health["running"] == 0:
            break
        time.sleep(0.05)
    assert health["outcomes"].get("client_closed_request", 0) == before + 1 and health["running"] == 0
    # metrics: counts by endpoint and status, tokens, latency and TTFT histograms, gauges
    httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny"})
    m = tiny_server.metrics()
    assert m[("maskpro_serve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert m[("maskpro_serve_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] >= 1
    assert m[("maskpro_serve_generated_tokens_total", ())] >= 3
    assert m[("maskpro_serve_time_to_first_token_seconds_count", (("endpoint", "/v1/completions"),))] >= 1
    assert m[("maskpro_serve_request_latency_seconds_count", (("endpoint", "/v1/completions"),))] >= 2
    assert m[("maskpro_serve_queue_depth", ())] == 0 and m[("maskpro_serve_running_batch_size", ())] == 0
    assert m[("maskpro_serve_engine_requests_total", (("outcome", "client_closed_request"),))] >= 1


def test_queue_full_429_and_timeout_504(tiny_model_dir, tmp_path):
    with serve(tiny_model_dir, tmp_path, "--max-batch-size", "1", "--max-queue", "1", "--timeout", "0.15",
               "--max-tokens", "480") as server:
        body = {"model": server.model, "prompt": "Tell me everything", "max_tokens": 480, "ignore_eos": True}

        def post(_):
            return httpx.post(server.url + "/v1/completions", json=body, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {429, 504} and 429 in statuses and 504 in statuses, statuses
        for r in responses:
            _error(r, r.status_code)
        stream = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
        if stream.status_code == 200:  # timed out after the first token: an error event, then [DONE]
            assert "request_timeout" in stream.text and stream.text.endswith("data: [DONE]\n\n")
        else:
            assert _error(stream, 504)["code"] == "request_timeout"
        assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_guards_v1_and_leaves_health_open(tiny_model_dir, tmp_path):
    """The key from MASKPRO_API_KEY: /v1/* without it (or with a wrong one, or not as a Bearer token) is an
    OpenAI-style 401; with it the OpenAI client works as before; /health and /metrics stay open."""
    with serve(tiny_model_dir, tmp_path, "--max-tokens", "8", env={"MASKPRO_API_KEY": "s3cret-key"}) as server:
        body = {"model": server.model, "prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer s3cret-kez"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}, {"Authorization": "Bearer s3cret-key-and-more"}):
            r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
            assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert _error(httpx.get(server.url + "/v1/models"), 401)["type"] == "invalid_request_error"
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == [server.model]
        assert client.completions.create(model=server.model, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_https_with_a_key(tiny_model_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with serve(tiny_model_dir, tmp_path, "--max-tokens", "8", "--api-key", "k", "--ssl-keyfile", str(key),
               "--ssl-certfile", str(cert), scheme="https") as server:
        r = httpx.post(server.url + "/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer k"}, verify=str(cert))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://{HOST}:{server.port}/health", timeout=2.0)


def test_sigterm_shuts_down_cleanly(tiny_model_dir, tmp_path):
    with serve(tiny_model_dir, tmp_path, "--shutdown-grace", "0.5", "--max-tokens", "480") as server:
        got: list[str] = []
        first = threading.Event()

        def reader():
            with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                              json={"model": server.model, "prompt": "Hi", "max_tokens": 480, "stream": True,
                                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line:
                        got.append(line)
                        first.set()

        t = threading.Thread(target=reader)
        t.start()
        assert first.wait(30)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(15)
        took = time.monotonic() - t0
        t.join(10)
        assert code == 0 and took < 5, (code, took, server.log_tail())
        assert got[-1] == "data: [DONE]"  # the in-flight stream was finished or ended with an error event
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")
        assert "Traceback" not in server.log.read_text()


# -------------------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.fixture(scope="module")
def smol_server(smollm2_path, tmp_path_factory):
    with serve(smollm2_path, tmp_path_factory.mktemp("logs"), "--served-model-name", "smollm2", "--max-tokens", "256",
               name="smollm2") as server:
        yield server


@pytest.fixture(scope="module")
def smol_reference(smollm2_path):
    """transformers' greedy generate on SmolLM2, one thread like the server (same float reductions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))

    def generate(ids: list[int], n: int) -> str:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    yield tok, generate
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smol_server, smol_reference):
    tok, generate = smol_reference
    client = smol_server.client()
    for prompt in ("The capital of France is", "def quicksort(arr):"):
        got = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0)
        assert got.choices[0].text == generate(tok(prompt)["input_ids"], 40)
    messages = [{"role": "user", "content": "What is the boiling point of water?"}]
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.choices[0].message.content == generate(tok(text, add_special_tokens=False)["input_ids"], 48)
    assert chat.choices[0].message.content.strip()
    streamed = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


@pytest.mark.slow
def test_smollm2_concurrent_batch_matches_alone(smol_server):
    client = smol_server.client()
    prompts = ["Water boils at", "My favourite book is", "1, 1, 2, 3, 5,", "The opposite of hot is",
               "In 1969, humans", "A haiku about rain:", "import numpy as np\n", "The largest planet is"]

    def ask(prompt: str) -> str:
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    before = httpx.get(smol_server.url + "/health").json()["batched_steps"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone and all(alone)
    assert httpx.get(smol_server.url + "/health").json()["batched_steps"] - before >= 4  # decoded together


@pytest.mark.slow
def test_smollm2_soak_32_streaming_clients(smol_server):
    """32 concurrent streaming clients for ~60 s: no failed request, no RSS growth after warm-up."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    stop = threading.Event()
    stats = {"ok": 0, "failed": 0, "tokens": 0, "errors": []}
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        n = 0
        with httpx.Client(base_url=smol_server.url, timeout=120) as http:
            while not stop.is_set():
                n += 1
                prompt = f"Client {i} request {n}: " + " ".join(words[(i + n + k) % len(words)] for k in range(i % 9))
                body = {"model": "smollm2", "max_tokens": 16 + (i + n) % 17, "temperature": 0.8, "seed": i * 1000 + n,
                        "stream": True, "stream_options": {"include_usage": True}}
                if (i + n) % 2:
                    path, body["prompt"] = "/v1/completions", prompt
                else:
                    path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
                try:
                    with http.stream("POST", path, json=body) as r:
                        events = _sse_events(r) if r.status_code == 200 else [r.read().decode()]
                    ok = r.status_code == 200 and events[-1] == "[DONE]" and '"error"' not in "".join(events[:-1])
                    usage = json.loads(events[-2])["usage"] if ok else None
                except Exception as e:  # a failed request is counted, not raised, so the soak runs on
                    ok, usage, events = False, None, [repr(e)]
                with lock:
                    if ok:
                        stats["ok"] += 1
                        stats["tokens"] += usage["completion_tokens"]
                    else:
                        stats["failed"] += 1
                        stats["errors"].append(events[-1][:200])

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(32)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(20)  # warm-up: RSS climbs while the batch first fills up and the allocator settles (~20-30 s)
    warm_rss, warm_ok = smol_server.rss_kib(), stats["ok"]
    time.sleep(38)
    end_rss = smol_server.rss_kib()
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    health = httpx.get(smol_server.url + "/health").json()
    report = {**{k: v for k, v in stats.items() if k != "errors"}, "warm_ok": warm_ok, "elapsed_s": round(elapsed, 1),
              "rss_warm_mib": round(warm_rss / 1024, 1), "rss_end_mib": round(end_rss / 1024, 1),
              "outcomes": health["outcomes"]}
    print("soak:", json.dumps(report))
    assert stats["failed"] == 0, stats["errors"][:3]
    assert stats["ok"] > warm_ok > 0
    assert end_rss <= warm_rss * 1.05 + 32 * 1024, report   # 5% + 32 MiB tolerance
    assert health["running"] == 0 and health["queue_depth"] == 0


# ----------------------------------------------------------------------------------- CLI and launchers

def test_vllm_and_trtllm_command_lines():
    assert backends.vllm_command("/m", host="127.0.0.1", port=9000, tensor_parallel_size=2, dtype="bf16",
                                 max_batch_size=64, max_model_len=4096, served_model_name="smol") == [
        "vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "9000", "--tensor-parallel-size", "2",
        "--dtype", "bfloat16", "--max-num-seqs", "64", "--max-model-len", "4096", "--served-model-name", "smol"]
    assert backends.trtllm_command("/e", port=9001, tensor_parallel_size=4, backend="tensorrt", tokenizer="/hf",
                                   max_batch_size=8) == [
        "trtllm-serve", "/e", "--host", "127.0.0.1", "--port", "9001", "--backend", "tensorrt", "--tp_size", "4",
        "--max_batch_size", "8", "--tokenizer", "/hf"]
    assert backends.vllm_command("/m", extra_args=["--quantization", "maskpro"])[-2:] == ["--quantization", "maskpro"]
    for bad in (dict(port=0), dict(tensor_parallel_size=0), dict(dtype="int3")):
        with pytest.raises(MaskproError):
            backends.vllm_command("/m", **bad)
    with pytest.raises(MaskproError, match="--tokenizer"):
        backends.trtllm_command("/e", backend="tensorrt")
    assert backends.health_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/health"
    assert backends.health_url("::", 8000) == "http://[::1]:8000/health"


def test_prepare_checkpoints(tiny_pruned, tiny_model_dir, tmp_path):
    from maskpro.export.vllm import write_vllm_checkpoint

    with pytest.raises(MaskproError, match="maskpro-export .* --engine vllm"):
        backends.prepare_vllm_model(tiny_pruned)
    exported = write_vllm_checkpoint(tiny_pruned, tmp_path / "vllm")
    assert backends.prepare_vllm_model(exported) == exported
    assert backends.prepare_vllm_model(tiny_model_dir) == tiny_model_dir   # any plain HF folder
    assert backends.prepare_trtllm_model(tiny_model_dir, 2, None) == (tiny_model_dir, "pytorch", None)
    engine = tmp_path / "trt" / "engine"   # the layout maskpro-export --engine trtllm writes
    engine.mkdir(parents=True)
    (engine / "rank0.engine").write_bytes(b"")
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"tp_size": 1}}}))
    assert backends.prepare_trtllm_model(tmp_path / "trt", 1, tiny_model_dir) == (engine, "tensorrt", tiny_model_dir)
    with pytest.raises(MaskproError, match="tensor parallelism 1, not 2"):
        backends.prepare_trtllm_model(engine, 2, tiny_model_dir)
    with pytest.raises(MaskproError, match="--tokenizer"):
        backends.prepare_trtllm_model(engine, 1, None)


@pytest.mark.skipif(shutil.which("vllm") is not None, reason="vLLM is installed here")
def test_cli_missing_vllm_is_one_line_exit_2(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "maskpro.serve.cli", str(tiny_model_dir), "--backend", "vllm"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "pip install vllm==0.26.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing")], "not a local Hugging Face folder"),
        ([str(tiny_model_dir), "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        ([str(tiny_model_dir), "--tensor-parallel-size", "2"], "--backend vllm or trtllm"),
        ([str(tiny_model_dir), "--dtype", "int4"], "invalid choice"),
        ([str(tiny_model_dir), "--port", "99999"], "--port must be in"),
        ([str(tiny_model_dir), "--", "--quantization", "maskpro"], "are for --backend vllm or trtllm"),
        ([str(tiny_model_dir), "--api-key", " "], "--api-key is empty"),
        ([str(tiny_model_dir), "--ssl-keyfile", str(tmp_path / "k.pem")], "needs both --ssl-keyfile"),
        ([str(tiny_model_dir), "--ssl-keyfile", str(tmp_path / "k.pem"), "--ssl-certfile", str(tmp_path / "c.pem")],
         "does not exist"),
        ([str(tiny_model_dir), "--backend", "trtllm", "--port", "8000", "--api-key", "k"], "takes no API key"),
        ([str(tiny_model_dir), "--device", "cuda"] if not torch.cuda.is_available() else [str(tmp_path / "x")],
         "no CUDA GPU" if not torch.cuda.is_available() else "not a local"),
    ]
    if shutil.which("trtllm-serve") is None:
        cases.append(([str(tiny_model_dir), "--backend", "trtllm", "--port", "8000"], "pip install tensorrt-llm=="))
    for argv, expected in cases:
        try:
            code = cli_main(argv)
        except SystemExit as e:  # argparse errors exit from inside parse_args
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (argv, code, err)
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        assert cli_main([str(tiny_model_dir), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err


def test_launcher_supervises_a_real_server(tiny_model_dir, tmp_path):
    """run_server_process (what --backend vllm/trtllm use) around a real child: health wait, SIGTERM forwarding."""
    port = _free_port()
    child = [sys.executable, "-m", "maskpro.serve.cli", str(tiny_model_dir), "--port", str(port),
             "--log-level", "warning"]
    code = ("import sys; from maskpro.serve.backends import run_server_process; "
            f"sys.exit(run_server_process({child!r}, '127.0.0.1', {port}, startup_timeout_s=120))")
    log = tmp_path / "supervisor.log"
    with open(log, "w") as fh:
        sup = subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
    try:
        assert _wait_healthy(sup, f"http://{HOST}:{port}", 120), log.read_text()
        assert httpx.post(f"http://{HOST}:{port}/v1/completions",
                          json={"model": tiny_model_dir.name, "prompt": "Hi", "max_tokens": 2}).status_code == 200
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0, log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{HOST}:{port}/health")
    finally:
        _stop(sup)
