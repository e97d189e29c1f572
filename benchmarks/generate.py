"""End-to-end generation, dense vs 2:4: time to first token, time per output token, tokens/s and peak memory.

  maskpro-bench generate --config llama2-7b --batch-sizes 1 4 16 64 --prompts 128 512 --new 128
  maskpro-bench generate --model runs/smollm2-2of4 --batch-sizes 1 8
  maskpro-bench generate                        # CPU: a tiny config, a check of the harness

Random weights at the model's real shapes (``--config``; speed does not depend on the values) or a model
folder's weights (``--model``), every decoder linear pruned 2:4 by magnitude. The same model is measured
in one process over every batch size and prompt length: dense (the masked dense weights on cuBLAS), then
(``--dense-fused``, default on GPU) dense with q/k/v and gate/up fused into one product each as the 2:4 runtime
does, then after ``sparsify`` (maskpro's runtime picks its 2:4 kernel or dense per shape and token count;
q/k/v and gate/up fused). Speedups are given against both dense models. Prefill
(TTFT) is one forward of the batch of prompts; decode runs one token per sequence per step on a static KV
cache, captured in a CUDA graph where capture works (``decode_graph`` says which). CUDA events on GPU,
perf_counter on CPU, median of ``--reps`` runs after warm-up; rows whose (p90-p10)/median exceeds
``--max-spread`` are marked ``trusted: false``. Peak memory is the CUDA allocator's peak per measurement on
GPU and the process's peak RSS on CPU. The backend is maskpro's PyTorch runtime; other engines are measured
through their servers with ``maskpro-bench serve``.

Top-level ``decode_tokens_per_s`` and ``ttft_ms`` ({"dense", "sparse"}, and "dense_fused") are those of the
first batch size and
prompt length; ``rows`` holds the whole sweep. Writes ``generate-<tag>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import configs, stats
from .env import (add_output_args, device_tag, environment, fill_defaults, merge_json, output_path, peak_memory,
                  reset_peak_memory)
from .kernels import positive_int

GPU = {"config": "llama2-7b", "batch_sizes": [1, 4, 16, 64], "prompts": [128, 512], "new": 128, "reps": 5,
       "dtype": "fp16", "dense_fused": True}
CPU = {"config": "tiny", "batch_sizes": [1], "prompts": [16], "new": 8, "reps": 3, "dtype": "fp32",
       "dense_fused": False}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"random-weight model shapes: {', '.join(configs.CONFIGS)} or "
                                                   "NAME:LAYERS (default: llama2-7b on GPU, tiny on CPU)")
    p.add_argument("--model", default=None, help="a model folder to load instead (its weights, pruned 2:4)")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=None,
                   help="sequences decoded together (default GPU: 1 4 16 64; CPU: 1)")
    p.add_argument("--prompts", "--prompt", nargs="+", type=positive_int, default=None,
                   help="prompt lengths in tokens (default GPU: 128 512; CPU: 16)")
    p.add_argument("--new", type=positive_int, default=None, help="tokens generated per sequence (default 128, "
                                                                   "CPU 8)")
    p.add_argument("--reps", type=positive_int, default=None, help="timed repetitions (default 5, CPU 3)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp16 on GPU; CPU runs fp32")
    p.add_argument("--max-spread", type=float, default=stats.MAX_SPREAD,
                   help="flag rows whose (p90-p10)/median exceeds this as not trusted")
    p.add_argument("--dense-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the dense model with q/k/v and gate/up fused, as the 2:4 runtime runs them "
                        "(default: on GPU)")
    p.add_argument("--dense-after", action="store_true",
                   help="time dense once more after the 2:4 sweep (the runtime forced to its kept dense weights, "
                        "q/k/v and gate/up fused): separates drift over the run from the 2:4 runtime itself")
    p.add_argument("--tag", default=None, help="results name generate-<tag>.json (default: the device)")
    add_output_args(p, "generate-<tag>.json")


def build_model(a: argparse.Namespace, device: str, dtype: torch.dtype):
    """(model, description): random weights at a config's shapes or a folder's weights, decoder linears 2:4."""
    if a.model:
        from maskpro.models import load_model

        model, _ = load_model(a.model, dtype, device)
        desc = f"{a.model} (its weights, decoder linears 2:4)"
    else:
        shape = configs.resolve(a.config)
        model = configs.build_random_model(shape, device, dtype)
        desc = f"{shape.name} (random weights, decoder linears 2:4)"
    configs.prune_24_(model)
    return model, desc


class Timer:
    """CUDA events on GPU, perf_counter on CPU; returns milliseconds."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000


def _capture(step, device: str):
    """A CUDA graph of one decode step (run = graph.replay), or eager ``step`` where capture fails or on CPU."""
    if device != "cuda":
        return None, step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph, graph.replay
    except Exception as e:  # noqa: BLE001 - record why and time eager decode instead
        print(f"decode graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager decode")
        torch.cuda.synchronize()
        return None, step


def measure(model, prompt_len: int, new_tokens: int, reps: int, device: str, batch: int = 1) -> dict:
    """TTFT of a batch of prompts and per-step decode time on a static cache (CUDA-graph replay when it captures)."""
    from transformers import StaticCache

    timer = Timer(device)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    cache = StaticCache(config=cfg, max_cache_len=prompt_len + new_tokens + 8)

    def prefill():
        cache.reset()
        with torch.no_grad():
            return model(input_ids=ids, past_key_values=cache, use_cache=True,
                         cache_position=torch.arange(prompt_len, device=device)).logits

    for _ in range(2):
        prefill()
    ttft = [timer(prefill) for _ in range(reps)]
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos,
                         position_ids=pos[None].expand(batch, 1)).logits

    prefill()
    graph, run = _capture(step, device)
    per_token = []
    for _ in range(reps):
        prefill()
        pos.fill_(prompt_len)

        def decode():
            for _ in range(new_tokens):
                run()
                pos.add_(1)

        per_token.append(timer(decode) / new_tokens)
    med, ttft_med = statistics.median(per_token), statistics.median(ttft)
    return {"ttft_ms": ttft_med, "ms_per_token": med, "decode_tokens_per_s": batch * 1000 / med,
            "e2e_tokens_per_s": batch * new_tokens * 1000 / (ttft_med + new_tokens * med),
            "decode_graph": graph is not None, "ttft_spread_ms": [min(ttft), max(ttft)],
            "ms_per_token_spread": [min(per_token), max(per_token)],
            "spread": {"ttft": stats.summarize(ttft)["spread"], "decode": stats.summarize(per_token)["spread"]}}


def sweep(model, a: argparse.Namespace, device: str, label: str) -> dict[tuple[int, int], dict]:
    """measure() at every (batch, prompt) with the peak memory of each; out-of-memory is recorded, not fatal."""
    out = {}
    points = list(itertools.product(a.batch_sizes, a.prompts))
    for batch, prompt in tqdm(points, desc=label, unit="point", disable=None):
        reset_peak_memory()
        try:
            out[batch, prompt] = {**measure(model, prompt, a.new, a.reps, device, batch), **peak_memory()}
        except torch.OutOfMemoryError:
            out[batch, prompt] = {"error": "CUDA out of memory"}
            torch.cuda.empty_cache()
        print(f"{label} batch {batch} prompt {prompt}:", out[batch, prompt], flush=True)
    return out


def rows_of(dense: dict, sparse: dict, max_spread: float, fused: dict | None = None) -> list[dict]:
    """One row per (batch, prompt) with dense (and dense fused) and 2:4 side by side, speedups, spread flag."""
    rows = []
    for (batch, prompt), d in dense.items():
        s, f = sparse[batch, prompt], (fused or {}).get((batch, prompt))
        row = {"batch": batch, "prompt_tokens": prompt, "dense": d, "sparse": s, **({"dense_fused": f} if f else {})}
        if "error" not in d and "error" not in s:
            measured = (("dense", d), ("2:4", s)) + ((("dense fused", f),) if f and "error" not in f else ())
            spreads = {f"{path} {k}": v for path, m in measured for k, v in m["spread"].items()}
            row.update(decode_speedup=s["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                       ttft_speedup=d["ttft_ms"] / s["ttft_ms"], trusted=stats.trusted(*spreads.values(),
                                                                                       max_spread=max_spread))
            if f and "error" not in f:
                row.update(decode_speedup_vs_fused=s["decode_tokens_per_s"] / f["decode_tokens_per_s"],
                           ttft_speedup_vs_fused=f["ttft_ms"] / s["ttft_ms"])
            if not row["trusted"]:
                stats.warn_untrusted(f"batch {batch}, prompt {prompt}", spreads, max_spread)
        else:
            row["trusted"] = False
        rows.append(row)
    return rows


def run(a: argparse.Namespace) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fill_defaults(a, GPU if device == "cuda" else CPU)
    dtype = DTYPES[a.dtype if device == "cuda" else "fp32"]
    out_path = output_path(a, f"generate-{a.tag or device_tag()}.json")
    model, desc = build_model(a, device, dtype)
    dense = sweep(model, a, device, "dense")
    from maskpro.serve.shared_input import fuse_all
    from maskpro.serve.sparse_linear import _bucket, sparsify

    fused = None
    if a.dense_fused:
        fuse_all(model)
        fused = sweep(model, a, device, "dense fused")

    tokens = {b for b in a.batch_sizes} | {b * p for b in a.batch_sizes for p in a.prompts}
    # decode steps run as CUDA graphs here, so their buckets are planned by device time, without host overhead
    report = sparsify(model, buckets=tuple(sorted({_bucket(t) for t in tokens})),
                      graph_buckets=tuple({_bucket(b) for b in a.batch_sizes}) if device == "cuda" else ())
    sparse = sweep(model, a, device, "2:4")
    after = None
    if a.dense_after:
        from maskpro.serve.sparse_linear import set_dense_only

        set_dense_only(model)
        after = sweep(model, a, device, "dense after")
    rows = rows_of(dense, sparse, a.max_spread, fused)
    for row in rows if after else ():
        row["dense_after"] = after[row["batch"], row["prompt_tokens"]]
    first = rows[0]
    env = environment()
    out = {"device": env["device"], "model": desc, "dtype": str(dtype).removeprefix("torch."),
           "backend": "maskpro torch runtime", "batch": first["batch"], "prompt_tokens": first["prompt_tokens"],
           "new_tokens": a.new, "batch_sizes": a.batch_sizes, "prompt_lengths": a.prompts,
           "max_spread": a.max_spread, "rows": rows,
           "runtime": report, "env": env}
    if "error" not in first["dense"] and "error" not in first["sparse"]:
        d, s = first["dense"], first["sparse"]
        out.update(decode_tokens_per_s={"dense": d["decode_tokens_per_s"], "sparse": s["decode_tokens_per_s"]},
                   ttft_ms={"dense": d["ttft_ms"], "sparse": s["ttft_ms"]}, decode_speedup=first["decode_speedup"],
                   detail={"dense": d, "sparse": s})
        f = first.get("dense_fused")
        if f and "error" not in f:
            out["decode_tokens_per_s"]["dense_fused"] = f["decode_tokens_per_s"]
            out["ttft_ms"]["dense_fused"] = f["ttft_ms"]
            out.update(decode_speedup_vs_fused=first["decode_speedup_vs_fused"])
    merge_json(out_path, out)
    from .plot import publish

    return publish(out_path)


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("generate"))
