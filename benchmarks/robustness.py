"""Bad input of every kind against every command: one clear line, never a traceback, never a silent success.

  maskpro-bench robustness                        # every family: damaged files, bad options, bad requests
  maskpro-bench robustness --families options     # one family

Each case runs a real command in a subprocess on a real (tiny) maskpro folder, or sends a real request to a
real ``maskpro-serve``, and is classed as:
  one_line_error   exit code as the scheme says (1: check failed, 2: bad input), and stderr ends with one
                   ``PROG: error: ...`` line; a request: a 4xx with an OpenAI-style one-line error body
  traceback        a Python traceback on stderr, a 5xx, or a command that hung
  silent_success   exit 0 (or a 2xx) on input that is damaged or wrong
  other            anything else (an error without the one-line form, a wrong exit code)
The summary goes to ``robustness.json``; every case, its command and its last stderr line are kept there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from maskpro.errors import EXIT_BAD_INPUT
from maskpro.schema import METADATA

from .env import add_output_args, environment, output_path
from .serve_load import launch_server

FAMILIES = ("files", "options", "requests")
KEY = "robustness-key"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    p.add_argument("--jobs", type=int, default=2, help="commands run at once")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds before a command counts as hung")
    add_output_args(p, "robustness.json")


@dataclass
class Case:
    family: str
    name: str
    argv: list[str] = field(default_factory=list)
    expect: int = EXIT_BAD_INPUT
    outcome: str = ""
    code: int | None = None
    last_line: str = ""


# ------------------------------------------------------------------------------------------------ fixtures

def make_folder(root: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, pruned 2:4 by magnitude and saved as maskpro saves."""
    from transformers import AutoTokenizer

    from maskpro.artifacts import save_pruned
    from maskpro.models import resolve_model_path, tiny_llama
    from maskpro.nm import NM
    from maskpro.oneshot import magnitude_prune

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    model = tiny_llama(vocab_size=len(tok), hidden=64, layers=2, intermediate=128)
    masks = magnitude_prune(model, NM(2, 4)).masks
    return save_pruned(model, tok, root / "good", masks, NM(2, 4), "magnitude")


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        os.truncate(path, int(path.stat().st_size * keep))
    return damage


def _flip(name: str, at: float = 0.7) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:  # one byte inside the tensor data: same size, valid header
        path = folder / name
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0x40
        path.write_bytes(bytes(data))
    return damage


def _random(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(os.urandom(path.stat().st_size))
    return damage


def _delete(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


DAMAGE = {
    "weights truncated": _truncate("model.safetensors"),
    "weights random bytes": _random("model.safetensors"),
    "weights one byte flipped": _flip("model.safetensors"),
    "weights empty": _truncate("model.safetensors", 0.0),
    "weights missing": _delete("model.safetensors"),
    "masks truncated": _truncate("masks.safetensors"),
    "masks one byte flipped": _flip("masks.safetensors"),
    "masks missing": _delete("masks.safetensors"),
    "maskpro.json truncated": _truncate(METADATA),
    "config.json truncated": _truncate("config.json"),
    "tokenizer.json truncated": _truncate("tokenizer.json"),
}


def file_cases(good: Path, root: Path, data: list[str]) -> list[Case]:
    """Every damage x every command that reads a model folder."""
    cases = []
    for i, (what, damage) in enumerate(DAMAGE.items()):
        folder = root / f"damaged-{i}"
        shutil.copytree(good, folder)
        damage(folder)
        f = str(folder)
        commands = {
            "maskpro-check": ["maskpro-check", f, "--quiet"],
            "maskpro check": ["maskpro", "check", "--model", f],
            "maskpro eval": ["maskpro", "eval", "--model", f, "--ppl", "wikitext2", "--max-windows", "1",
                             "--seq-len", "32", "-q", *data],
            "maskpro prune": ["maskpro", "prune", "--model", f, "--method", "magnitude", "--out",
                              str(root / f"out-prune-{i}"), "-q", *data],
            "maskpro-export vllm": ["maskpro-export", f, "--engine", "vllm", "--out", str(root / f"out-vllm-{i}"),
                                    "--quiet", *data],
            "maskpro-export onnx": ["maskpro-export", f, "--engine", "onnx", "--out", str(root / f"out-onnx-{i}"),
                                    "--quiet", "--no-parity"],
            "maskpro-serve": ["maskpro-serve", f, "--port", "0", "--device", "cpu"],
        }
        for cmd, argv in commands.items():
            cases.append(Case("files", f"{cmd}: {what}", argv))
    return cases


def option_cases(good: Path, root: Path, data: list[str]) -> list[Case]:
    g = str(good)
    a_file = root / "a-file"
    a_file.write_text("not a folder\n")
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "keep.txt").write_text("someone's work\n")
    prune = ["maskpro", "prune", "--model", g, "-q", *data]
    out = ["--out", str(root / "never-written")]
    bad = {
        "prune --steps -5": [*prune, *out, "--steps", "-5"],
        "prune --seq-len 0": [*prune, *out, "--seq-len", "0"],
        "prune --calib-samples 0": [*prune, *out, "--calib-samples", "0"],
        "prune --batch-size 0": [*prune, *out, "--batch-size", "0"],
        "prune --nm 3:2": [*prune, *out, "--nm", "3:2"],
        "prune --nm two-four": [*prune, *out, "--nm", "two-four"],
        "prune --method foo": [*prune, *out, "--method", "foo"],
        "prune --init foo": [*prune, *out, "--init", "foo"],
        "prune --learn-on foo": [*prune, *out, "--learn-on", "foo"],
        "prune --preset foo": [*prune, *out, "--preset", "foo"],
        "prune --lr -1": [*prune, *out, "--lr", "-1"],
        "prune --ema 1.5": [*prune, *out, "--ema", "1.5"],
        "prune --micro-batch 3": [*prune, *out, "--micro-batch", "3"],
        "prune --ft-steps -1": [*prune, *out, "--ft-steps", "-1"],
        "prune --ft-loss mse": [*prune, *out, "--ft-steps", "5", "--ft-loss", "mse"],
        "prune --ft-micro-batch 3": [*prune, *out, "--ft-steps", "5", "--ft-micro-batch", "3"],
        "prune --self-gen-rows -1": [*prune, *out, "--ft-steps", "5", "--self-gen-rows", "-1"],
        "prune --out a file": [*prune, "--out", str(a_file)],
        "prune --out a folder with files": [*prune, "--out", str(full)],
        "prune --calib-file missing": [*prune, *out, "--method", "wanda", "--calib-file", str(root / "no.jsonl")],
        "prune --data-dir missing": ["maskpro", "prune", "--model", g, "-q", *out, "--method", "wanda",
                                     "--data-dir", str(root / "no-data")],
        "prune --targets matching nothing": [*prune, *out, "--method", "magnitude", "--targets", "nothing.*"],
        "prune --model missing": ["maskpro", "prune", "--model", str(root / "nope"), *out, "-q"],
        "eval --ppl foo": ["maskpro", "eval", "--model", g, "--ppl", "foo", "-q", *data],
        "eval --zeroshot foo": ["maskpro", "eval", "--model", g, "--ppl", "none", "--zeroshot", "foo", "-q", *data],
        "eval --seq-len 0": ["maskpro", "eval", "--model", g, "--seq-len", "0", "-q", *data],
        "eval --model a file": ["maskpro", "eval", "--model", str(a_file), "-q"],
        "export --engine foo": ["maskpro-export", g, "--engine", "foo", "--out", str(root / "x")],
        "export --out the source": ["maskpro-export", g, "--engine", "vllm", "--out", g],
        "export --dtype int8": ["maskpro-export", g, "--engine", "onnx", "--dtype", "int8", "--out", str(root / "x")],
        "export --batch 1,2": ["maskpro-export", g, "--engine", "trt", "--batch", "1,2", "--out", str(root / "x")],
        "check a garbage .onnx": ["maskpro-check", str(a_file.with_suffix(".onnx"))],
        "check --nm 5:4": ["maskpro-check", g, "--nm", "5:4"],
        "serve --port 99999": ["maskpro-serve", g, "--port", "99999"],
        "serve --max-batch-size 0": ["maskpro-serve", g, "--max-batch-size", "0"],
        "serve --api-key empty": ["maskpro-serve", g, "--api-key", " "],
        "serve --ssl-keyfile missing": ["maskpro-serve", g, "--ssl-keyfile", "no.pem", "--ssl-certfile", "no.pem"],
        "serve --tensor-parallel-size 2 (torch)": ["maskpro-serve", g, "--tensor-parallel-size", "2"],
        "serve engine args for torch": ["maskpro-serve", g, "--", "--enforce-eager"],
        "serve --model missing": ["maskpro-serve", str(root / "nope"), "--port", "0"],
        "bench kernels --tokens 0": ["maskpro-bench", "kernels", "--tokens", "0"],
        "bench serve without a target": ["maskpro-bench", "serve", "--out", str(root / "s.json")],
    }
    a_file.with_suffix(".onnx").write_bytes(os.urandom(4096))
    return [Case("options", name, argv) for name, argv in bad.items()]


def request_cases(model: str) -> list[tuple[str, str, str, dict | str | None, dict]]:
    """(name, method, path, body, headers) of bad requests; the server runs with an API key."""
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = {"model": model, "prompt": "Hello", "max_tokens": 4}
    return [
        ("no API key", "POST", "/v1/completions", ok, {}),
        ("wrong API key", "POST", "/v1/completions", ok, {"Authorization": "Bearer nope"}),
        ("not JSON", "POST", "/v1/completions", "{not json", auth),
        ("JSON list body", "POST", "/v1/completions", "[1, 2]", auth),
        ("no prompt", "POST", "/v1/completions", {"model": model, "max_tokens": 4}, auth),
        ("no model", "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, auth),
        ("max_tokens -1", "POST", "/v1/completions", {**ok, "max_tokens": -1}, auth),
        ("max_tokens 10^9", "POST", "/v1/completions", {**ok, "max_tokens": 10**9}, auth),
        ("temperature -1", "POST", "/v1/completions", {**ok, "temperature": -1}, auth),
        ("top_p 2", "POST", "/v1/completions", {**ok, "top_p": 2}, auth),
        ("unknown model", "POST", "/v1/completions", {**ok, "model": "gpt-9"}, auth),
        ("prompt too long", "POST", "/v1/completions", {**ok, "prompt": "word " * 50000}, auth),
        ("prompt of wrong type", "POST", "/v1/completions", {**ok, "prompt": {"a": 1}}, auth),
        ("chat without messages", "POST", "/v1/chat/completions", {"model": model, "max_tokens": 4}, auth),
        ("chat message without role", "POST", "/v1/chat/completions",
         {"model": model, "messages": [{"content": "hi"}], "max_tokens": 4}, auth),
        ("unknown endpoint", "POST", "/v1/embeddings", ok, auth),
    ]


# --------------------------------------------------------------------------------------------- classifying

def classify(case: Case, code: int | None, stderr: str) -> None:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    case.code, case.last_line = code, (lines[-1][:300] if lines else "")
    prog = case.argv[0] if case.argv else ""
    if code is None or "Traceback (most recent call last)" in stderr:
        case.outcome = "traceback"
    elif code == 0:
        case.outcome = "silent_success"
    elif code == case.expect and case.last_line.startswith(f"{prog}: error: "):
        case.outcome = "one_line_error"
    else:
        case.outcome = "other"


def run_command(case: Case, timeout: float) -> Case:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MASKPRO_API_KEY", None)
    try:
        proc = subprocess.run(case.argv, capture_output=True, text=True, timeout=timeout, env=env)
        classify(case, proc.returncode, proc.stderr)
    except subprocess.TimeoutExpired as e:  # a server that started on damaged files, or a hang
        classify(case, 0 if case.argv[0] == "maskpro-serve" else None, (e.stderr or b"").decode(errors="replace")
                 if isinstance(e.stderr, bytes) else (e.stderr or ""))
    return case


def run_requests(good: Path, root: Path) -> list[Case]:
    cases = []
    with launch_server(str(good), ["--device", "cpu", "--api-key", KEY, "--max-prompt-tokens", "256",
                                   "--max-tokens", "64"], 300.0, root) as url:
        base = url.removesuffix("/v1")
        model = httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        for name, method, path, body, headers in request_cases(model):
            case = Case("requests", name, [method, path])
            kw = {"content": body} if isinstance(body, str) else {"json": body}
            try:
                r = httpx.request(method, base + path, headers={"Content-Type": "application/json", **headers},
                                  timeout=60.0, **kw)
                case.code = r.status_code
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = None
                case.last_line = (message or r.text)[:300]
                if r.status_code >= 500:
                    case.outcome = "traceback"
                elif r.status_code < 400:
                    case.outcome = "silent_success"
                else:
                    case.outcome = "one_line_error" if message and "\n" not in message else "other"
            except httpx.HTTPError as e:
                case.outcome, case.last_line = "traceback", f"{type(e).__name__}: {e}"
            cases.append(case)
        alive = httpx.post(url + "/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60.0)
        if alive.status_code != 200:
            cases.append(Case("requests", "server still answers after the bad requests", ["POST", "/v1/completions"],
                              outcome="traceback", code=alive.status_code, last_line=alive.text[:300]))
    return cases


# ------------------------------------------------------------------------------------------------------ run

def summarize(cases: list[Case]) -> dict:
    count = {k: sum(c.outcome == k for c in cases) for k in ("one_line_error", "traceback", "silent_success", "other")}
    return {"tried": len(cases), "one_line_errors": count["one_line_error"], "tracebacks": count["traceback"],
            "silent_successes": count["silent_success"], "other": count["other"],
            "by_family": {f: sum(c.family == f for c in cases) for f in FAMILIES}}


def run(a: argparse.Namespace) -> Path:
    t0 = time.perf_counter()
    data = ["--data-dir", a.data_dir] if a.data_dir else []
    with tempfile.TemporaryDirectory(prefix="maskpro-robustness-") as tmp:
        root = Path(tmp)
        good = make_folder(root)
        commands: list[Case] = []
        if "files" in a.families:
            commands += file_cases(good, root, data)
        if "options" in a.families:
            commands += option_cases(good, root, data)
        print(f"robustness: {len(commands)} commands, {a.jobs} at a time", flush=True)
        done: list[Case] = []
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for case in pool.map(lambda c: run_command(c, a.timeout), commands):
                done.append(case)
                print(f"  [{len(done)}/{len(commands)}] {case.outcome:<15} {case.family}: {case.name}", flush=True)
        if "requests" in a.families:
            done += run_requests(good, root)
    summary = summarize(done)
    result = {**summary, "wall_s": round(time.perf_counter() - t0, 1), "env": environment(),
              "cases": [asdict(c) for c in done]}
    path = output_path(a, "robustness.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("robustness"))
