"""vLLM with maskpro's 2:4 plugin against vLLM dense on the same masked weights: decode, TTFT, greedy text.

  maskpro-bench vllm-plugin --sparse /tmp/llama2-7b-2of4 --points 1:512 4:512 16:512
  maskpro-bench vllm-plugin --sparse /tmp/llama2-7b-2of4 --smollm2 runs/smollm2-2of4 --work /tmp/vp

The --sparse maskpro folder (e.g. from maskpro-bench random-model) is exported as maskpro-export --engine vllm
writes it: a plain Hugging Face checkpoint with the pruned zeros in place and maskpro.json beside it, but no
quantization_config. So that one folder is both sides: vLLM loads it as an ordinary dense model, and with
--quantization maskpro the plugin compresses every target layer to 2:4 after loading. Each side runs
``python -m maskpro.bench.vllm_dense --model EXPORT [--quantization maskpro]`` in its own process, dense first,
so one engine has given its GPU memory back before the next starts, and both time the same way: wall time of
``generate``, median of --reps, fresh random prompts, prefix caching off, vLLM's default torch.compile and CUDA
graphs (--enforce-eager turns graphs off on both sides). Decode speedup is dense ms/step over plugin ms/step.

With --smollm2 (a SmolLM2 2:4 maskpro folder) its export is loaded in vLLM dense, then with the plugin, each in
its own process, and 8 fixed prompts x 64 greedy tokens are compared token by token.

Writes vllm-plugin.json: per point the dense and plugin decode and TTFT, the speedup, both runs' raw figures,
start-up time and weight GiB, and the bars of issue 17 (decode >= 1.5x at batch 1 and >= 1.25x at batch 16 at
prompt 512, TTFT <= 1.05x dense, greedy text equal) with which of them pass. --work keeps the exports and reuses
them while their source is unchanged, so a run cut short is cheap to repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskpro.errors import MaskproError

from .env import add_output_args, environment, output_path

BARS = {"decode_batch1": 1.5, "decode_batch16": 1.25, "ttft_ratio": 1.05}
BAR_PROMPT = 512
GREEDY_TOKENS = 64
PROMPTS = (  # fixed, varied openings; greedy continuations of each are compared token by token
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three laws of thermodynamics state that",
    "Here is a recipe for a simple tomato soup:",
    "In 1969, the first humans to walk on the Moon",
    "A good way to learn a new language is",
    "The difference between a list and a tuple in Python is",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse", required=True, help="a 2:4 maskpro folder (maskpro prune, maskpro-bench random-model)")
    p.add_argument("--points", nargs="+", default=["1:512", "4:512", "16:512"], help="BATCH:PROMPT pairs")
    p.add_argument("--new", type=int, default=128, help="new tokens per decode measurement")
    p.add_argument("--reps", type=int, default=5, help="repetitions per point (medians are reported)")
    p.add_argument("--dtype", default="float16", help="dtype vLLM runs both sides in")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or torch.compile, on both sides")
    p.add_argument("--smollm2", default=None, help="a SmolLM2 2:4 maskpro folder for the greedy-equality check")
    p.add_argument("--work", default=None, help="folder for the exports, kept and reused while their source is "
                                                "unchanged (default: a temporary folder)")
    p.add_argument("--tag", default=None, help="results name vllm-plugin-<tag>.json (default: vllm-plugin.json)")
    add_output_args(p, "vllm-plugin.json")


# ----------------------------------------------------------------------------- pure: figures -> summary

def point_rows(dense: dict, plugin: dict) -> list[dict]:
    """One row per point of the dense run, paired with the plugin's figures at the same (batch, prompt)."""
    theirs = {(r["batch"], r["prompt"]): r for r in plugin["rows"]}
    rows = []
    for d in dense["rows"]:
        p = theirs.get((d["batch"], d["prompt"]))
        if p is None:
            raise MaskproError(f"the plugin run has no point batch {d['batch']} prompt {d['prompt']}; both runs "
                               "must measure the same --points")
        rows.append({"batch": d["batch"], "prompt": d["prompt"],
                     "dense_decode_ms": d["decode_ms"], "plugin_decode_ms": p["decode_ms"],
                     "speedup": d["decode_ms"] / p["decode_ms"],
                     "dense_ttft_ms": d["ttft_ms"], "plugin_ttft_ms": p["ttft_ms"],
                     "ttft_ratio": p["ttft_ms"] / d["ttft_ms"]})
    return rows


def compare_greedy(dense_ids: list[list[int]], plugin_ids: list[list[int]]) -> dict:
    """Per prompt: equal or not, and the first position where the plugin's tokens leave dense's."""
    prompts = []
    for i, (a, b) in enumerate(zip(dense_ids, plugin_ids)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):  # one side stopped early: they differ where it stopped
            first = min(len(a), len(b))
        prompts.append({"prompt": i, "equal": first is None, "first_diff": first, "tokens": [len(a), len(b)]})
    equal = len(dense_ids) == len(plugin_ids) and all(p["equal"] for p in prompts)
    return {"equal": equal, "prompts": prompts}


def bars(rows: list[dict], greedy_equal: bool | None) -> dict:
    """Issue 17's bars: each with what it needs, what was measured and pass (None: not measured)."""
    def speedup_at(batch: int) -> float | None:
        return next((r["speedup"] for r in rows if r["batch"] == batch and r["prompt"] == BAR_PROMPT), None)

    out = {}
    for name, batch in (("decode_batch1", 1), ("decode_batch16", 16)):
        got = speedup_at(batch)
        out[name] = {"need": f">= {BARS[name]}x dense decode at batch {batch}, prompt {BAR_PROMPT}", "got": got,
                     "pass": None if got is None else got >= BARS[name]}
    worst = max((r["ttft_ratio"] for r in rows), default=None)
    out["ttft"] = {"need": f"<= {BARS['ttft_ratio']}x dense TTFT at every point", "got": worst,
                   "pass": None if worst is None else worst <= BARS["ttft_ratio"]}
    out["greedy_equal"] = {"need": f"{len(PROMPTS)} prompts x {GREEDY_TOKENS} greedy tokens equal to dense",
                           "got": greedy_equal, "pass": greedy_equal}
    out["all_pass"] = all(b["pass"] is True for b in out.values())
    return out


def summarize(device: str, dense: dict, plugin: dict, greedy: dict) -> dict:
    """The vllm-plugin.json summary from the two runs' JSON (vllm_dense's output) and the greedy check."""
    ok = "rows" in dense and "rows" in plugin
    rows = point_rows(dense, plugin) if ok else []
    equal = greedy.get("equal")
    return {"device": device, "vllm": plugin.get("vllm") or dense.get("vllm"),
            "cuda_graphs": bool(dense.get("cuda_graphs")) and bool(plugin.get("cuda_graphs")),
            "rows": rows, "smollm2_greedy_equal": equal, "bars": bars(rows, equal),
            "startup_s": {"dense": dense.get("startup_s"), "plugin": plugin.get("startup_s")},
            "weights_gib": {"dense": dense.get("weights_gib"), "plugin": plugin.get("weights_gib")},
            "greedy": greedy, "dense_run": dense, "plugin_run": plugin}


def last_json(stdout: str, key: str) -> dict | None:
    """The last line of a child's stdout that is a JSON object holding ``key`` (vLLM logs to stdout too, and its
    engine process may still log after the child printed its result)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found = json.loads(line)
                if isinstance(found, dict) and key in found:
                    return found
    return None


# ------------------------------------------------------------------------------------ engine processes

def require_vllm() -> None:
    """One line naming the install, before any export work (a 7B export takes minutes)."""
    from importlib.util import find_spec

    from maskpro.serve.vllm_plugin import VLLM_VERSION

    if find_spec("vllm") is None:
        raise MaskproError(f"vllm-plugin runs vLLM, which is not installed here; run: pip install "
                           f"vllm=={VLLM_VERSION} (on a Linux host with an NVIDIA GPU)")


def _maskpro_folder(path: str, option: str) -> Path:
    from maskpro.artifacts import METADATA

    folder = Path(path)
    if not (folder / METADATA).is_file():
        raise MaskproError(f"{option} {path} is not a maskpro folder (no {METADATA}); pass one written by "
                           "maskpro prune or maskpro-bench random-model")
    return folder


def export_for_vllm(src: Path, out: Path) -> dict:
    """``src`` exported as the vllm engine writes it, into ``out``; reused while the source's maskpro.json (which
    holds the sha256 of every file) is unchanged. The engine's reload-and-compare step is left out: it loads the
    model twice in transformers on the CPU (minutes for 7B), and the runs below load the folder anyway."""
    from maskpro.artifacts import METADATA
    from maskpro.checkpoint import save_json
    from maskpro.export.vllm import write_vllm_checkpoint

    stamp = out.with_name(out.name + ".source.json")
    key = {"source": str(src.resolve()), "metadata_sha256": hashlib.sha256((src / METADATA).read_bytes()).hexdigest()}
    if out.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return {"folder": str(out), "reused": True, "export_s": 0.0}
    t0 = time.perf_counter()
    write_vllm_checkpoint(src, out)
    save_json(key, stamp)
    return {"folder": str(out), "reused": False, "export_s": time.perf_counter() - t0}


def _child_env() -> dict:
    # VLLM_ALLOW_INSECURE_SERIALIZATION: vLLM's engine refuses to ship a function to its worker without it, and
    # vllm_dense sends one (LLM.apply_model) to count the loaded weight bytes; the engine here is local.
    return {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def run_child(cmd: list[str], what: str, key: str) -> dict:
    """Run one engine process; its JSON line, plus its wall time and the plugin's log lines (which layers fell back
    to dense), or an error with the tail of its output."""
    print(f"{what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    logs = (done.stdout + "\n" + done.stderr).splitlines()
    found = last_json(done.stdout, key) if done.returncode == 0 else None
    if found is None:
        tail = [line for line in logs if line.strip()][-20:]
        print(f"{what} failed (exit {done.returncode}):\n" + "\n".join(tail), file=sys.stderr, flush=True)
        return {"error": tail[-1] if tail else f"exit {done.returncode}", "output_tail": tail}
    found["wall_s"] = time.perf_counter() - t0
    found["plugin_log"] = sorted({line.split("maskpro: ", 1)[1] for line in logs if "maskpro: " in line})
    return found


def _engine_flags(a: argparse.Namespace, quantization: str | None) -> list[str]:
    """What differs between the two sides (the quantization method) and what both share."""
    return ["--dtype", a.dtype, *(["--quantization", quantization] if quantization else []),
            *(["--enforce-eager"] if a.enforce_eager else [])]


def timing_cmd(model: Path, a: argparse.Namespace, quantization: str | None) -> list[str]:
    return [sys.executable, "-m", "maskpro.bench.vllm_dense", "--model", str(model), "--new", str(a.new),
            "--reps", str(a.reps), "--points", *a.points, *_engine_flags(a, quantization)]


def greedy_cmd(model: Path, a: argparse.Namespace, quantization: str | None) -> list[str]:
    return [sys.executable, "-m", "maskpro.bench.vllm_plugin", "--greedy-child", str(model),
            *_engine_flags(a, quantization)]


def greedy_child(argv: list[str]) -> int:
    """One engine's greedy tokens for PROMPTS, printed as a JSON line (run by the bench, in its own process)."""
    p = argparse.ArgumentParser(prog="python -m maskpro.bench.vllm_plugin --greedy-child")
    p.add_argument("model")
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--enforce-eager", action="store_true")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # Token ids in, token ids out: both engines see identical inputs and nothing is decoded.
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = [tok(text).input_ids for text in PROMPTS]
    t0 = time.perf_counter()
    llm = LLM(model=a.model, quantization=a.quantization, dtype=a.dtype, max_model_len=256, seed=0,
              skip_tokenizer_init=True, enable_prefix_caching=False, max_num_seqs=len(PROMPTS),
              gpu_memory_utilization=0.5, enforce_eager=a.enforce_eager)
    startup_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    print(json.dumps({"vllm": vllm.__version__, "quantization": a.quantization, "startup_s": startup_s,
                      "prompt_ids": ids, "token_ids": [list(o.outputs[0].token_ids) for o in out]}), flush=True)
    return 0


def greedy_check(folder: Path, a: argparse.Namespace) -> dict:
    dense = run_child(greedy_cmd(folder, a, None), "greedy, vLLM dense", "token_ids")
    plugin = run_child(greedy_cmd(folder, a, "maskpro"), "greedy, vLLM + maskpro plugin", "token_ids")
    if "token_ids" not in dense or "token_ids" not in plugin:
        return {"equal": None, "reason": "an engine failed", "dense": dense, "plugin": plugin}
    return {**compare_greedy(dense["token_ids"], plugin["token_ids"]), "folder": str(folder),
            "startup_s": {"dense": dense["startup_s"], "plugin": plugin["startup_s"]},
            "plugin_log": plugin["plugin_log"], "dense_ids": dense["token_ids"], "plugin_ids": plugin["token_ids"]}


def run(a: argparse.Namespace) -> Path:
    from .generate_fast import parse_points

    parse_points(a.points)
    if a.new < 1 or a.reps < 1:
        raise MaskproError(f"--new and --reps must be at least 1; got {a.new} and {a.reps}")
    require_vllm()
    sparse = _maskpro_folder(a.sparse, "--sparse")
    smollm2 = _maskpro_folder(a.smollm2, "--smollm2") if a.smollm2 else None
    if smollm2 is not None and not (smollm2 / "tokenizer_config.json").is_file():
        raise MaskproError(f"--smollm2 {a.smollm2} has no tokenizer_config.json; the greedy check encodes its "
                           "prompts with the folder's tokenizer (maskpro prune saves it)")
    path = output_path(a, f"vllm-plugin-{a.tag}.json" if a.tag else "vllm-plugin.json")
    with contextlib.nullcontext(a.work) if a.work else tempfile.TemporaryDirectory(prefix="maskpro-vllm-") as work:
        work = Path(work)
        export = export_for_vllm(sparse, work / "sparse-vllm")
        folder = Path(export["folder"])
        dense = run_child(timing_cmd(folder, a, None), "vLLM dense", "rows")
        plugin = run_child(timing_cmd(folder, a, "maskpro"), "vLLM + maskpro plugin", "rows")
        if smollm2 is None:
            greedy = {"equal": None, "reason": "no --smollm2 folder given"}
        else:
            greedy = greedy_check(Path(export_for_vllm(smollm2, work / "smollm2-vllm")["folder"]), a)
    env = environment()  # after the engines: CUDA is first touched here, so this process held no GPU memory
    from maskpro.checkpoint import save_json

    result = {**summarize(env["device"], dense, plugin, greedy), "tag": a.tag, "command": env["command"],
              "sparse": str(sparse), "export": export, "points": a.points, "new_tokens": a.new, "reps": a.reps,
              "dtype": a.dtype, "env": env}
    save_json(result, path)
    for r in result["rows"]:
        print(f"batch {r['batch']} prompt {r['prompt']}: decode {r['dense_decode_ms']:.3f} -> "
              f"{r['plugin_decode_ms']:.3f} ms/step ({r['speedup']:.2f}x), TTFT {r['dense_ttft_ms']:.1f} -> "
              f"{r['plugin_ttft_ms']:.1f} ms")
    print(json.dumps({k: b["pass"] if isinstance(b, dict) else b for k, b in result["bars"].items()}))
    print(f"wrote {path}")
    for name, r in (("dense", dense), ("plugin", plugin)):
        if "error" in r:  # after the JSON is written: it holds the tail of that engine's output
            raise MaskproError(f"the {name} vLLM run failed ({r['error']}); {path} holds the tail of its output")
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--greedy-child"]:
        sys.exit(greedy_child(sys.argv[2:]))
    from .cli import main_for

    sys.exit(main_for("vllm-plugin"))
