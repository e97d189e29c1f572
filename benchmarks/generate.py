"""End-to-end generation, dense vs 2:4: time to first token, time per output token, tokens/s and peak memory.

  maskpro-bench generate --config llama2-7b --batch-sizes 1 4 16 64 --prompts 128 512 --new 128
  maskpro-bench generate --model runs/smollm2-2of4 --batch-sizes 1 8
  maskpro-bench generate                        # CPU: a tiny config, a check of the harness

Random weights at the model's real shapes (``--config``; speed does not depend on the values) or a model
folder's weights (``--model``), every decoder linear pruned 2:4 by magnitude. Two models are resident in one
process: the dense one (the masked dense weights on cuBLAS) and a copy after ``sparsify`` (maskpro's runtime
picks its 2:4 kernel or dense per shape and token count; q/k/v and gate/up fused). Three variants are timed:
dense, 2:4, and (``--dense-fused``, default on GPU) the 2:4 model forced to its kept dense weights, i.e. dense
with the runtime's fusion. Speedups are given against both dense variants. Their repetitions are interleaved
at every point, so a drift of the GPU over the process (clocks, temperature) falls on all alike.
Prefill (TTFT) is one forward of the batch of prompts up to the last position's logits, captured in a CUDA
graph of its shape with ``--prefill-graphs`` (default on GPU; without it prefill is eager and TTFT includes
the host's launch work, which the 2:4 runtime's wrappers add to); decode runs one token per sequence per step on
a static KV cache, captured in a CUDA graph where capture works (``prefill_graph`` and ``decode_graph`` say
which). Buckets that run in graphs are planned by device time, so cuSPARSELt (whose eager calls cost
milliseconds on the host) can win prefill there. ``prefill_logits_rel_err`` compares each variant's prefill
logits with the dense model's on the same prompts. CUDA events on
GPU, perf_counter on CPU, median of ``--reps`` runs after warm-up (TTFT: ``TTFT_REPS_FACTOR`` times as many, as
one prefill is short and noisier than a whole decode); rows whose (p90-p10)/median exceeds
``--max-spread`` are marked ``trusted: false``. Memory: ``weights_gib`` is what each model holds on the GPU,
``point_memory`` the allocator's peak at a point with every variant's cache (peak RSS on CPU). The backend is
maskpro's PyTorch runtime; other engines are measured through their servers with ``maskpro-bench serve``.

Top-level ``decode_tokens_per_s`` and ``ttft_ms`` ({"dense", "sparse"}, and "dense_fused") are those of the
first batch size and prompt
length; ``rows`` holds the whole sweep. Writes ``generate-<tag>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import copy
import inspect
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
       "dtype": "fp16", "dense_fused": True, "prefill_graphs": True, "runtime": "fast"}
CPU = {"config": "tiny", "batch_sizes": [1], "prompts": [16], "new": 8, "reps": 3, "dtype": "fp32",
       "dense_fused": False, "prefill_graphs": False, "runtime": "transformers"}
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
                   help="also time dense with q/k/v and gate/up fused as the 2:4 runtime runs them: the 2:4 model "
                        "forced to its kept dense weights (default: on GPU)")
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="run each variant's prefill as a CUDA graph of its (batch, prompt) shape, as decode steps "
                        "are, so TTFT is device time and the 2:4 plan may pick cuSPARSELt there (default: on GPU)")
    p.add_argument("--runtime", default=None, choices=["fast", "transformers"],
                   help="fast: maskpro's compiled Llama-family decoder, 2:4 weights compressed only, against vLLM "
                        "dense and the same decoder dense (maskpro.bench.generate_fast); transformers: the "
                        "transformers model with sparsify's layers (default: fast on GPU, transformers on CPU)")
    p.add_argument("--points", nargs="+", default=None, metavar="BATCH:PROMPT",
                   help="with --runtime fast, these (batch, prompt) points instead of every batch size x prompt")
    p.add_argument("--dense-points", nargs="+", default=None, metavar="BATCH:PROMPT",
                   help="with --runtime fast, time maskpro's own dense decoder at these points only (default: all)")
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                   help="with --runtime fast, time vLLM dense first in the same call (when vLLM is installed)")
    p.add_argument("--vllm-results", default=None, metavar="JSON",
                   help="with --runtime fast, vLLM dense figures that `python -m maskpro.bench.vllm_dense` wrote "
                        "earlier in the same call sequence, instead of running vLLM now")
    p.add_argument("--expand-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="with --runtime fast, expand each block's 2:4 layers for prefill one block ahead on a side "
                        "stream (default; --no-expand-ahead: in line, before each product)")
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

    def __call__(self, fn, before=None) -> float:
        """Time ``fn`` alone; ``before`` (e.g. a cache reset) runs first, outside the timed region."""
        if before is not None:
            before()
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


def _capture(step, device: str, before=None):
    """(graph, run): ``step`` (a decode step or a prefill) captured in a CUDA graph, ``run`` replaying it and
    returning the captured output; (None, step) where capture fails or on CPU. ``before`` (a cache reset) runs
    ahead of every warm-up call and of the capture, outside the graph."""
    if device != "cuda":
        return None, step
    before = before or (lambda: None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            before()
            step()
    torch.cuda.current_stream().wait_stream(s)
    before()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    except Exception as e:  # noqa: BLE001 - record why and time it eagerly instead
        print(f"graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing it eagerly")
        torch.cuda.synchronize()
        return None, step

    def replay():  # the output tensor captured with the graph, rewritten by each replay
        graph.replay()
        return out
    # The graph reads the step's input tensors (token ids, positions) at their captured addresses: keep the
    # step's closure, which owns them, alive for as long as the graph can be replayed.
    replay.step = step
    return graph, replay


class Variant:
    """One way to run a model: ``setup`` switches the model to it (e.g. the 2:4 runtime forced dense)."""

    def __init__(self, model, setup=None):
        self.model, self.setup = model, setup or (lambda: None)


class Prepared:
    """One variant ready to time at a point: ``prefill`` (returns the last position's logits) after ``reset``
    (an empty cache, untimed), ``fresh_decode`` (reset and prefill, then the decode closure to time) and whether
    each runs from a CUDA graph."""

    def __init__(self, reset, prefill, fresh_decode, prefill_graph: bool, decode_graph: bool):
        self.reset, self.prefill, self.fresh_decode = reset, prefill, fresh_decode
        self.prefill_graph, self.decode_graph = prefill_graph, decode_graph


def _prepared(v: Variant, prompt_len: int, new_tokens: int, device: str, batch: int,
              prefill_graphs: bool = False) -> Prepared:
    """One variant on its own static cache and prompt (see :class:`Prepared`)."""
    from transformers import StaticCache

    model, cfg = v.model, v.model.config
    v.setup()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    cache = StaticCache(config=cfg, max_cache_len=prompt_len + new_tokens + 8)
    from maskpro.models import cache_kwarg

    cache_kw = cache_kwarg(model)
    # a server needs the last position's logits only. The cache is reset outside the timed prefill: some
    # transformers versions write at a counter the reset rewinds, and zeroing the cache is no part of a prefill.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_position = torch.arange(prompt_len, device=device)

    def eager_prefill():
        with torch.no_grad():
            return model(input_ids=ids, **{cache_kw: cache}, use_cache=True, cache_position=cache_position,
                         **keep).logits[:, -1]

    prefill_graph, prefill = (_capture(eager_prefill, device, before=cache.reset) if prefill_graphs
                              else (None, eager_prefill))
    for _ in range(2):
        cache.reset()
        prefill()
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            return model(input_ids=tok, **{cache_kw: cache}, use_cache=True, cache_position=pos,
                         position_ids=pos[None].expand(batch, 1)).logits

    cache.reset()
    prefill()
    graph, run = _capture(step, device)

    def decode():
        for _ in range(new_tokens):
            run()
            pos.add_(1)

    def fresh_decode():  # a new prompt's cache, then the timed steps start at its end
        cache.reset()
        prefill()
        pos.fill_(prompt_len)
        return decode

    return Prepared(cache.reset, prefill, fresh_decode, prefill_graph is not None, graph is not None)


TTFT_REPS_FACTOR = 3  # prefills per decode repetition: one prefill is short, so its median needs more samples


def logits_rel_err(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error (Frobenius) of one variant's last-position prefill logits against the dense model's."""
    ref = reference.float()
    return float((logits.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def measure(variants: dict[str, Variant], prompt_len: int, new_tokens: int, reps: int, device: str,
            batch: int = 1, prefill_graphs: bool = False) -> dict[str, dict]:
    """TTFT of a batch of prompts and per-step decode time on a static cache, for every variant, and each
    variant's prefill logits against the first variant's (the dense model's) on the same prompts.

    The variants' repetitions are interleaved (A B C, B C A, ...), so a drift of the GPU over the run (clocks,
    temperature, allocator) falls on all of them alike instead of on whichever was measured last.
    """
    timer = Timer(device)
    names = list(variants)
    prepared = {n: _prepared(variants[n], prompt_len, new_tokens, device, batch, prefill_graphs) for n in names}
    errors, reference = {}, None
    for n in names:
        variants[n].setup()
        prepared[n].reset()
        logits = prepared[n].prefill()
        reference = logits.clone() if reference is None else reference
        errors[n] = logits_rel_err(logits, reference)
    ttft: dict[str, list[float]] = {n: [] for n in names}
    per_token: dict[str, list[float]] = {n: [] for n in names}
    orders = [names[rep % len(names):] + names[:rep % len(names)] for rep in range(reps)]  # A B C, B C A, ...
    for order in orders * TTFT_REPS_FACTOR:
        for n in order:
            variants[n].setup()
            ttft[n].append(timer(prepared[n].prefill, before=prepared[n].reset))
    for order in orders:
        for n in order:
            variants[n].setup()
            per_token[n].append(timer(prepared[n].fresh_decode()) / new_tokens)
    out = {}
    for n in names:
        med, ttft_med = statistics.median(per_token[n]), statistics.median(ttft[n])
        out[n] = {"ttft_ms": ttft_med, "ms_per_token": med, "decode_tokens_per_s": batch * 1000 / med,
                  "e2e_tokens_per_s": batch * new_tokens * 1000 / (ttft_med + new_tokens * med),
                  "prefill_graph": prepared[n].prefill_graph, "decode_graph": prepared[n].decode_graph,
                  "prefill_logits_rel_err": errors[n], "ttft_spread_ms": [min(ttft[n]), max(ttft[n])],
                  "ms_per_token_spread": [min(per_token[n]), max(per_token[n])],
                  "spread": {"ttft": stats.summarize(ttft[n])["spread"],
                             "decode": stats.summarize(per_token[n])["spread"]}}
    return out


def sweep(variants: dict[str, Variant], a: argparse.Namespace,
          device: str) -> tuple[dict[tuple[int, int], dict], dict[tuple[int, int], dict]]:
    """measure() at every (batch, prompt): (results per variant, peak memory of the point with all variants
    resident); out-of-memory is recorded, not fatal."""
    out, peaks = {}, {}
    points = list(itertools.product(a.batch_sizes, a.prompts))
    for batch, prompt in tqdm(points, desc="interleaved " + " / ".join(variants), unit="point", disable=None):
        reset_peak_memory()
        try:
            out[batch, prompt] = measure(variants, prompt, a.new, a.reps, device, batch, a.prefill_graphs)
        except torch.OutOfMemoryError:
            out[batch, prompt] = {n: {"error": "CUDA out of memory"} for n in variants}
        peaks[batch, prompt] = peak_memory()
        reset_peak_memory()  # drops this point's caches and graph pools before the next
        print(f"batch {batch} prompt {prompt}:", out[batch, prompt], flush=True)
    return out, peaks


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


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run(a: argparse.Namespace) -> Path:
    from maskpro.serve import sparse_linear as sl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fill_defaults(a, GPU if device == "cuda" else CPU)
    dtype = DTYPES[a.dtype if device == "cuda" else "fp32"]
    out_path = output_path(a, f"generate-{a.tag or device_tag()}.json")
    if a.runtime == "fast":
        from .generate_fast import run as run_fast
        from .plot import publish

        return publish(run_fast(a, out_path))
    model, desc = build_model(a, device, dtype)
    weights_gib = {"dense": allocated_gib()}
    sparse_model = copy.deepcopy(model)
    prefill_tokens = {b * p for b in a.batch_sizes for p in a.prompts}
    tokens = set(a.batch_sizes) | prefill_tokens
    # steps that run as CUDA graphs here (decode; prefill with --prefill-graphs) are planned by device time
    graphed = (set(a.batch_sizes) | (prefill_tokens if a.prefill_graphs else set())) if device == "cuda" else set()
    report = sl.sparsify(sparse_model, buckets=tuple(sorted({sl.token_bucket(t) for t in tokens})),
                         graph_buckets=tuple(sorted({sl.token_bucket(t) for t in graphed})))
    weights_gib["sparse"] = allocated_gib() - weights_gib["dense"]
    variants = {"dense": Variant(model)}
    swapped = [m for m in sparse_model.modules() if isinstance(m, sl.SparseLinear)]
    if a.dense_fused and swapped and all(m.weight is not None for m in swapped):
        # The 2:4 model forced to its kept dense weights is dense with the runtime's q/k/v and gate/up fusion.
        variants["dense fused"] = Variant(sparse_model, lambda: sl.set_dense_only(sparse_model, True))
    variants["2:4"] = Variant(sparse_model, lambda: sl.set_dense_only(sparse_model, False))
    results, peaks = sweep(variants, a, device)
    dense = {pt: r["dense"] for pt, r in results.items()}
    sparse = {pt: r["2:4"] for pt, r in results.items()}
    fused = {pt: r["dense fused"] for pt, r in results.items()} if "dense fused" in variants else None
    rows = rows_of(dense, sparse, a.max_spread, fused)
    for row in rows:
        row["point_memory"] = peaks[row["batch"], row["prompt_tokens"]]
    first = rows[0]
    env = environment()
    out = {"device": env["device"], "model": desc, "dtype": str(dtype).removeprefix("torch."),
           "backend": "maskpro torch runtime", "batch": first["batch"], "prompt_tokens": first["prompt_tokens"],
           "new_tokens": a.new, "batch_sizes": a.batch_sizes, "prompt_lengths": a.prompts,
           "max_spread": a.max_spread, "order": "interleaved", "variants": list(variants),
           "prefill_graphs": bool(a.prefill_graphs and device == "cuda"),
           "weights_gib": weights_gib, "rows": rows, "runtime": report, "env": env}
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
