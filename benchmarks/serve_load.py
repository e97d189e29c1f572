"""Load test of an OpenAI-compatible server (maskpro-serve, vLLM, TensorRT-LLM): throughput and latency.

  maskpro-bench serve --url http://127.0.0.1:8000/v1 --concurrency 1 4 16 --requests 64
  maskpro-bench serve --launch runs/smollm2-2of4 --concurrency 1 4 --requests 16   # starts maskpro-serve
  maskpro-bench serve --url http://gpu-box:8000/v1 --model my-model --chat --duration 60

For each concurrency level, that many clients send streaming requests back to back (``--requests`` in all,
or for ``--duration`` seconds) to ``/completions`` (``/chat/completions`` with ``--chat``). Prompts are
WikiText-2 paragraphs from the data folder (a fixed built-in list without one), cut to ``--prompt-words``.
Per request: time to first token (TTFT: first streamed chunk with text), inter-token latency (ITL: gaps
between later chunks with text), end-to-end latency and output tokens (the server's usage, else chunks).
Per level: requests/s and output tokens/s over the level's wall time, TTFT / ITL / latency p50/p90/p99,
and errors counted by kind (HTTP status, timeout, connection, malformed stream); a failed request never
stops the run. ``ignore_eos`` (a vLLM / TensorRT-LLM / maskpro-serve extension) makes every request
generate ``--max-tokens``. ``--launch`` starts ``maskpro-serve`` on a free loopback port, waits for
/health, runs, and stops it with SIGTERM. Writes ``serve-<tag>.json`` and a latency-vs-concurrency PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
from tqdm.auto import tqdm

from maskpro.errors import MaskproError

from . import stats
from .env import add_output_args, environment, merge_json, output_path
from .kernels import positive_int

HOST = "127.0.0.1"
BUILTIN_PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "In mathematics, a prime number is a natural number greater than one that",
    "The river flows through three countries before it reaches the sea, and",
    "Photosynthesis is the process by which green plants turn light into",
    "The committee met on Tuesday to discuss the new budget, which",
    "A good recipe for bread needs only flour, water, salt and yeast, but",
    "The first computers filled entire rooms and used vacuum tubes that",
    "During the winter months the village depends on a single road that",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target (one of)")
    target.add_argument("--url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--launch", default=None, metavar="MODEL",
                        help="start maskpro-serve on MODEL (folder, .gguf or smollm2-135m-instruct) on loopback, "
                             "benchmark it, stop it")
    target.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra maskpro-serve argument for --launch (repeat, e.g. --serve-arg=--no-sparse)")
    p.add_argument("--model", default=None, help="model id to request (default: the first of GET /models)")
    p.add_argument("--chat", action="store_true", help="use /chat/completions instead of /completions")
    p.add_argument("--concurrency", nargs="+", type=positive_int, default=[1, 4, 16],
                   help="clients sending at once, one level after another")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="requests per level (default 4 x concurrency, at least 8)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level instead of --requests")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens each request generates")
    p.add_argument("--prompt-words", type=positive_int, default=48, help="prompts are cut to this many words")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask the server to generate --max-tokens even past end-of-sequence")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as a timeout")
    soak = p.add_argument_group("soak (a long run that must stay clean)")
    soak.add_argument("--mixed", action="store_true",
                      help="each request draws its prompt length (8..--prompt-words words) and max_tokens "
                           "(8..--max-tokens) at random (seeded)")
    soak.add_argument("--disconnect-rate", type=float, default=0.0,
                      help="share of streaming requests whose client hangs up after its first tokens")
    soak.add_argument("--sample-memory", type=float, default=None, metavar="SECONDS",
                      help="read the server's memory from /health this often during each level")
    p.add_argument("--data-dir", default=None, help="data folder with wikitext2/test.txt for the prompts")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="--launch: seconds to wait for /health")
    p.add_argument("--tag", default=None, help="results name serve-<tag>.json (default: local or the URL's host)")
    add_output_args(p, "serve-<tag>.json")


# --------------------------------------------------------------------------------------------------- prompts

def load_prompts(data_dir: str | None, words: int, n: int = 64) -> tuple[list[str], str]:
    """(prompts, source): the first ``n`` WikiText-2 paragraphs of 40+ words, else the built-in list."""
    from maskpro.data import WIKITEXT2, data_file

    try:
        lines = data_file(WIKITEXT2, data_dir).read_text(encoding="utf-8").splitlines()
    except MaskproError:
        return [" ".join(p.split()[:words]) for p in BUILTIN_PROMPTS], "built-in"
    paras = [ln.strip() for ln in lines if len(ln.split()) >= 40 and not ln.strip().startswith("=")]
    return [" ".join(p.split()[:words]) for p in paras[:n]], "wikitext2 test paragraphs"


# -------------------------------------------------------------------------------------------------- requests

@dataclass
class Outcome:
    """One request: timings in seconds from its start, or the kind of error that ended it."""

    error: str | None = None
    disconnected: bool = False   # the client hung up on purpose (a soak's random disconnect), not an error
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    tokens: int = 0


def _chunk_text(obj: dict, chat: bool) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool,
                      hang_up_after: int | None = None) -> Outcome:
    """Send one streaming request and time its chunks; every failure becomes ``Outcome.error``.
    With ``hang_up_after`` the client closes the stream after that many text chunks."""
    t0 = time.perf_counter()
    out, stamps, done, usage = Outcome(), [], False, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(error=f"http_{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    return Outcome(error="stream_error")
                if _chunk_text(obj, chat):
                    stamps.append(time.perf_counter() - t0)
                    if hang_up_after is not None and len(stamps) >= hang_up_after:
                        return Outcome(disconnected=True, ttft=stamps[0], tokens=len(stamps))
                usage = obj.get("usage") or usage
    except httpx.TimeoutException:
        return Outcome(error="timeout")
    except httpx.ConnectError:
        return Outcome(error="connect")
    except httpx.HTTPError as e:
        return Outcome(error=f"transport_{type(e).__name__}")
    except (json.JSONDecodeError, AttributeError, TypeError):
        return Outcome(error="malformed_stream")
    if not done:
        return Outcome(error="malformed_stream")
    if not stamps:
        return Outcome(error="empty_stream")
    out.latency = time.perf_counter() - t0
    out.ttft = stamps[0]
    out.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    out.tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else len(stamps)
    return out


def request_body(cfg: "LoadConfig", prompt: str, max_tokens: int | None = None) -> dict:
    body = {"model": cfg.model, "max_tokens": max_tokens or cfg.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


@dataclass
class LoadConfig:
    """What one load run sends; the same for every concurrency level."""

    base_url: str
    model: str | None
    prompts: list[str]
    max_tokens: int = 64
    chat: bool = False
    ignore_eos: bool = True
    timeout: float = 120.0
    mixed: bool = False
    disconnect_rate: float = 0.0
    sample_memory_s: float | None = None
    seed: int = 0

    def draw(self, i: int, rng: random.Random) -> tuple[str, int, int | None]:
        """(prompt, max_tokens, hang-up point) of the i-th request of a level."""
        prompt, max_tokens = self.prompts[i % len(self.prompts)], self.max_tokens
        if self.mixed:
            words = prompt.split()
            prompt = " ".join(words[:rng.randint(min(8, len(words)), len(words))])
            max_tokens = rng.randint(min(8, self.max_tokens), self.max_tokens)
        hang_up = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < self.disconnect_rate else None
        return prompt, max_tokens, hang_up

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + ("/chat/completions" if self.chat else "/completions")


async def run_level(cfg: LoadConfig, concurrency: int, requests: int | None, duration: float | None) -> dict:
    """``concurrency`` clients back to back until ``requests`` are sent or ``duration`` is over."""
    outcomes: list[Outcome] = []
    sent = 0
    deadline = time.perf_counter() + duration if duration else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    rng = random.Random(cfg.seed + concurrency)
    memory: list[tuple[float, int]] = []
    host: list[tuple[float, int]] = []
    running = True

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while (deadline is None and sent < requests) or (deadline is not None and time.perf_counter() < deadline):
            prompt, max_tokens, hang_up = cfg.draw(sent, rng)
            sent += 1
            outcomes.append(await one_request(client, cfg.endpoint, request_body(cfg, prompt, max_tokens), cfg.chat,
                                              hang_up))

    async def sample_memory(client: httpx.AsyncClient) -> None:
        root = cfg.base_url.rstrip("/").removesuffix("/v1")
        while running:
            try:
                health, now = (await client.get(root + "/health")).json(), round(time.perf_counter() - t0, 2)
                for key, series in (("memory_bytes", memory), ("host_memory_bytes", host)):
                    if health.get(key) is not None:
                        series.append((now, int(health[key])))
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(cfg.sample_memory_s)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), limits=limits) as client, \
            httpx.AsyncClient(timeout=10.0) as side:
        sampler = asyncio.create_task(sample_memory(side)) if cfg.sample_memory_s else None
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0  # before the sampler's last sleep
        running = False
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    level = summarize_level(concurrency, outcomes, wall)
    if memory:
        level["memory"] = memory_trend(memory)
    if host:
        level["host_memory"] = memory_trend(host)
    return level


def memory_trend(samples: list[tuple[float, int]]) -> dict:
    """Server memory over a level: after warm-up (the first quarter) it should stay flat."""
    values = [v for _, v in samples]
    warm = values[len(values) // 4:] or values
    return {"samples": len(values), "first_bytes": values[0], "after_warmup_bytes": warm[0],
            "last_bytes": values[-1], "max_bytes": max(values),
            "growth_after_warmup": (values[-1] - warm[0]) / warm[0] if warm[0] else None, "series": samples}


def summarize_level(concurrency: int, outcomes: list[Outcome], wall_s: float) -> dict:
    """Throughput, latency percentiles (ms) and errors by kind of one level."""
    ok = [o for o in outcomes if o.error is None and not o.disconnected]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1

    def ms(values: list[float]) -> dict:
        return {k: (None if v is None else round(v * 1000, 3)) for k, v in stats.percentiles(values).items()}

    tokens = sum(o.tokens for o in ok)
    return {"concurrency": concurrency, "requests": len(outcomes), "ok": len(ok), "errors": sum(errors.values()),
            "disconnected": sum(o.disconnected for o in outcomes),
            "errors_by_kind": errors, "wall_s": round(wall_s, 3),
            "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
            "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "output_tokens": tokens, "ttft_ms": ms([o.ttft for o in ok]),
            "itl_ms": ms([d for o in ok for d in o.itl]), "latency_ms": ms([o.latency for o in ok])}


def discover_model(base_url: str, timeout: float) -> tuple[str | None, str | None]:
    """(first model id of GET /models, None) or (None, why it failed)."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout)
        r.raise_for_status()
        return r.json()["data"][0]["id"], None
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _health(root: str) -> dict | None:
    try:
        r = httpx.get(root + "/health", timeout=5.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- launcher

def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def launch_server(model: str, extra: list[str], startup_timeout: float, log_dir: Path) -> Iterator[str]:
    """Run ``maskpro-serve MODEL`` on a free loopback port; yields its base URL (.../v1) once /health answers."""
    for _ in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        log = log_dir / f"maskpro-serve-{port}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "maskpro.serve.cli", str(model), "--host", HOST, "--port",
                                     str(port), "--log-level", "warning", *extra], stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        root = f"http://{HOST}:{port}"
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and proc.poll() is None and _health(root) is None:
            time.sleep(0.2)
        if proc.poll() is None and _health(root) is not None:
            break
        stop_process(proc)
        text = log.read_text(errors="replace")
        if "cannot listen" not in text:
            last = (text.strip().splitlines() or ["no output"])[-1]
            raise MaskproError(f"maskpro-serve {model} did not become healthy within {startup_timeout:.0f} s: "
                               f"{last} (log: {log})")
    else:
        raise MaskproError("no free loopback port for maskpro-serve")
    try:
        yield root + "/v1"
    finally:
        code = stop_process(proc)
        print(f"maskpro-serve stopped (exit code {code})", flush=True)


# ------------------------------------------------------------------------------------------------------ run

def benchmark(cfg: LoadConfig, levels: list[int], requests: int | None, duration: float | None) -> list[dict]:
    """Every concurrency level in turn, printing one line per level."""
    out = []
    for c in tqdm(levels, desc="serve", unit="level", disable=None):
        n = None if duration else (requests or max(8, 4 * c))
        level = asyncio.run(run_level(cfg, c, n, duration))
        print(f"concurrency {c}: {level['ok']}/{level['requests']} ok, {level['requests_per_s']:.2f} req/s, "
              f"{level['output_tokens_per_s']:.1f} tok/s, TTFT p50 {level['ttft_ms']['p50']} ms, "
              f"ITL p50 {level['itl_ms']['p50']} ms, errors {level['errors_by_kind'] or 0}", flush=True)
        out.append(level)
    return out


def _default_tag(url: str, launched: bool) -> str:
    if launched:
        return "local"
    host = httpx.URL(url).host or "server"
    return "local" if host in ("127.0.0.1", "localhost", "::1") else host.replace(".", "-")


def run(a: argparse.Namespace) -> Path:
    if bool(a.url) == bool(a.launch):
        raise MaskproError("give either --url BASE_URL of a running server or --launch MODEL to start maskpro-serve")
    if a.url and not a.url.startswith(("http://", "https://")):
        raise MaskproError(f"--url {a.url} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
    if a.duration is not None and a.duration <= 0:
        raise MaskproError("--duration must be > 0 seconds")
    if not 0 <= a.disconnect_rate <= 1 or (a.sample_memory is not None and a.sample_memory <= 0):
        raise MaskproError("--disconnect-rate must be in [0, 1] and --sample-memory > 0 seconds")
    prompts, prompt_source = load_prompts(a.data_dir, a.prompt_words)
    out = output_path(a, f"serve-{a.tag or _default_tag(a.url or '', bool(a.launch))}.json")
    with tempfile.TemporaryDirectory(prefix="maskpro-bench-serve-") as tmp:
        if a.launch:
            with launch_server(a.launch, a.serve_arg, a.startup_timeout, Path(tmp)) as url:
                result = _run_against(url, a, prompts)
        else:
            result = _run_against(a.url, a, prompts)
    env = environment()
    result.update(prompts={"source": prompt_source, "count": len(prompts), "words": a.prompt_words},
                  launched=({"model": str(a.launch), "args": a.serve_arg} if a.launch else None),
                  device=env["device"], env=env)
    merge_json(out, result)
    from .plot import publish

    publish(out)
    reached = sum(lv["requests"] - lv["errors_by_kind"].get("connect", 0) for lv in result["levels"])
    if not reached:
        why = result["model_lookup_error"] or "connection refused"
        raise MaskproError(f"no request reached {result['url']} ({why}); start the server (e.g. maskpro-serve MODEL) "
                           f"or pass --launch MODEL; errors are in {out}")
    return out


def _run_against(url: str, a: argparse.Namespace, prompts: list[str]) -> dict:
    model, why = (a.model, None) if a.model else discover_model(url, 30.0)
    if model is None and not why.startswith("ConnectError"):  # unreachable is reported once, at the end
        print(f"warning: GET {url.rstrip('/')}/models failed ({why}); requests name no model", file=sys.stderr)
    cfg = LoadConfig(url, model, prompts, a.max_tokens, a.chat, a.ignore_eos, a.timeout, a.mixed,
                     a.disconnect_rate, a.sample_memory)
    root = url.rstrip("/").removesuffix("/v1")
    levels = benchmark(cfg, a.concurrency, a.requests, a.duration)
    return {"url": url, "endpoint": cfg.endpoint, "model": model, "model_lookup_error": why,
            "server_health": _health(root), "max_tokens": a.max_tokens, "ignore_eos": a.ignore_eos,
            "chat": a.chat, "requests_per_level": a.requests, "duration_per_level_s": a.duration,
            "mixed": a.mixed, "disconnect_rate": a.disconnect_rate,
            "timeout_s": a.timeout, "levels": levels, "errors_total": sum(lv["errors"] for lv in levels)}


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("serve"))
