"""``maskpro-bench generate`` on the fast runtime: 2:4 and dense compiled, against vLLM dense in the same run.

Phases, one after another in one call sequence, so each variant's memory is its own:
1. vLLM dense (``--vllm``, its own process: :mod:`maskpro.bench.vllm_dense`), when vLLM is installed;
2. maskpro 2:4: the model built, pruned 2:4 by magnitude, every decoder linear kept only compressed
   (:class:`~maskpro.serve.fast_model.FastLM`), its ``mma.sp`` configs planned per token bucket, decode
   compiled and replayed from graphs (:class:`~maskpro.serve.fast_decoder.FastDecoder`);
3. maskpro dense: the same model and code with the masked dense weights on cuBLAS.

At each (batch, prompt) point a generation is a prefill of the batch's prompts (captured per shape) and
``--new`` greedy steps. Time to first token is the wall time of the prefill up to its first tokens; a step is
the wall time of the decode loop over ``--new``, host loop and sampling included, as vLLM's figures are.
``roofline_ms`` is the bytes one step must read (weights as held, each row's K/V at the average context)
over the device-to-device copy bandwidth measured in the same run; ``roofline_fraction`` is it over the step.
Writes ``generate-<tag>.json`` and, with vLLM, ``vs-vllm-dense.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import configs
from .env import environment, merge_json


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Device-to-device copy rate in bytes/s, bytes read plus written (the roofline's denominator)."""
    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * a.numel() * 10 / (s.elapsed_time(e) / 1000)


def step_bytes(fast, batch: int, context: int) -> int:
    """Bytes a decode step reads at least: every weight as held (the embedding only its rows) and each row's
    keys and values up to ``context``."""
    arch = fast.arch
    embed = fast.embed.numel() * fast.embed.element_size()
    tied = fast.embed.data_ptr() == fast.lm_head.data_ptr()
    kv = 2 * arch.layers * batch * context * arch.kv_heads * arch.head_dim * fast.embed.element_size()
    return fast.weight_bytes() - (0 if tied else embed) + kv


def _generate(dec, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """(TTFT ms, ms per decode step) of one greedy generation, wall time."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tok = dec.prefill(prompts, 0, 0).argmax(-1)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    pos = [len(p) for p in prompts]
    for _ in range(new):
        tok = dec.step(tok, pos).argmax(-1)
        pos = [q + 1 for q in pos]
    torch.cuda.synchronize()
    return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000 / new


PROFILE_STEPS = 8


def _device_us(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def step_profile(dec, prompts: list[list[int]], top: int = 12) -> dict:
    """Where one decode step's device time goes: CUDA kernels of ``PROFILE_STEPS`` graph-replayed steps after a
    prefill, per step. ``kernels_us`` over the step's wall time is the share the GPU spends computing; the rest
    is gaps between kernels and host time."""
    from torch.profiler import ProfilerActivity, profile

    tok = dec.prefill(prompts, 0, 0).argmax(-1)
    pos = [len(p) for p in prompts]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            tok = dec.step(tok, pos).argmax(-1)
            pos = [q + 1 for q in pos]
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages()  # device events only: CPU ops would count their kernels again
                      if str(getattr(e, "device_type", "")).endswith("CUDA") and _device_us(e) > 0),
                     key=_device_us, reverse=True)
    return {"steps": PROFILE_STEPS, "kernels_us": sum(map(_device_us, kernels)) / PROFILE_STEPS,
            "launches": sum(e.count for e in kernels) / PROFILE_STEPS,
            "top": [{"name": e.key[:120], "us": _device_us(e) / PROFILE_STEPS, "calls": e.count / PROFILE_STEPS}
                    for e in kernels[:top]]}


def _phase(a: argparse.Namespace, sparse: bool, points: list[tuple[int, int]], bandwidth: float) -> dict:
    from maskpro.serve.fast_decoder import FastDecoder
    from maskpro.serve.fast_model import FastLM
    from maskpro.serve.slot_cache import SlotCache

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    shape = configs.resolve(a.config)
    hf = configs.build_random_model(shape, "cuda", torch.float16)
    configs.prune_24_(hf)
    capacity = max(p for _, p in points) + a.new + 8
    probe = torch.randint(0, shape.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():  # the dense masked model's logits, which the converted model must reproduce
        reference = hf(probe).logits[0, -1].float()
    t0 = time.perf_counter()
    fast = FastLM.from_hf(hf, capacity, sparse=sparse, expand_ahead=getattr(a, "expand_ahead", True))
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    plan = fast.plan(sorted({b for b, _ in points})) if sparse else {}
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        probe_cache = SlotCache(shape.num_hidden_layers, 1, 512, shape.num_key_value_heads, shape.heads_dim,
                                torch.float16, torch.device("cuda"))
        logits = fast.prefill(probe, torch.tensor([511], device="cuda"), torch.tensor([0], device="cuda"),
                              probe_cache.keys, probe_cache.values)[0]
        rel_err = float((logits - reference).norm() / reference.norm())
        del probe_cache
    resident = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(1)
    rows, compile_s, graphs = [], 0.0, 0
    for batch, prompt in points:
        # a cache of this point's size: the step is compiled for its shapes, as a server compiles its buckets
        cache = SlotCache(shape.num_hidden_layers, batch, prompt + a.new + 8, shape.num_key_value_heads,
                          shape.heads_dim, torch.float16, torch.device("cuda"))
        torch.cuda.reset_peak_memory_stats()
        dec = FastDecoder(fast, cache, graphs=True)
        dec.prefill_graph_tokens = batch * prompt

        def prompts() -> list[list[int]]:
            return torch.randint(0, shape.vocab_size, (batch, prompt), generator=gen).tolist()
        for _ in range(3):  # compile and capture this batch's step, capture this prefill shape
            _generate(dec, prompts(), a.new)
        runs = [_generate(dec, prompts(), a.new) for _ in range(a.reps)]
        ttft = statistics.median(r[0] for r in runs)
        step = statistics.median(r[1] for r in runs)
        roofline = step_bytes(fast, batch, prompt + a.new // 2) / bandwidth * 1000
        rows.append({"batch": batch, "prompt": prompt, "ttft_ms": ttft, "decode_ms": step,
                     "decode_tokens_per_s": batch * 1000 / step, "roofline_ms": roofline,
                     "roofline_fraction": roofline / step, "compile_s": dec.compile_s,
                     "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                     "prefill_graph": dec.prefills_captured > 0, "decode_graph": dec.captured > 0,
                     "ttft_ms_all": [r[0] for r in runs], "decode_ms_all": [r[1] for r in runs],
                     "step_profile": step_profile(dec, prompts())})
        compile_s += dec.compile_s
        graphs += dec.captured + dec.prefills_captured
        print(f"{'2:4' if sparse else 'dense'} batch {batch} prompt {prompt}: ttft {ttft:.2f} ms, decode "
              f"{step:.3f} ms/step, roofline {roofline:.3f} ms ({roofline / step:.0%}), compile "
              f"{dec.compile_s:.1f} s", flush=True)
        del dec, cache
        gc.collect()
        torch.cuda.empty_cache()
    ahead = fast.expand_ahead
    out = {"weights_gib": fast.weight_bytes() / 2**30, "resident_gib": resident / 2**30,
           "expand_ahead": bool(ahead and ahead.enabled),
           "expand_ahead_gib": ahead.nbytes() / 2**30 if ahead and ahead.enabled else 0.0,
           "logits_rel_err_vs_transformers_dense_masked": rel_err,
           "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30, "build_s": build_s,
           "compile_s": compile_s, "graphs": graphs, "fallbacks": fast.fallbacks, "plan": plan, "rows": rows}
    del fast
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _vllm(a: argparse.Namespace, points: list[tuple[int, int]]) -> dict:
    cmd = [sys.executable, "-m", "maskpro.bench.vllm_dense", "--config", a.config, "--new", str(a.new),
           "--reps", str(a.reps), "--points", *[f"{b}:{p}" for b, p in points]]
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-12:]
        print("vLLM dense baseline failed:\n" + "\n".join(tail), file=sys.stderr)
        return {"error": tail[-1] if tail else f"exit {done.returncode}", "stderr_tail": tail}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def parse_points(specs: list[str]) -> list[tuple[int, int]]:
    """``BATCH:PROMPT`` strings as (batch, prompt) pairs."""
    from maskpro.errors import MaskproError

    try:
        points = [tuple(int(v) for v in s.split(":")) for s in specs]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 for p in points):
        raise MaskproError(f"--points takes BATCH:PROMPT pairs of positive integers, e.g. 1:512 4:2048; got {specs}")
    return points


def vllm_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def summary(device: str, vllm: dict, sparse: dict, dense: dict) -> dict:
    """The ``vs-vllm-dense.json`` summary: 2:4 against vLLM dense point by point, and against the strongest
    dense baseline measured (vLLM or maskpro's own compiled dense decoder, where that ran the point)."""
    ours = {(r["batch"], r["prompt"]): r for r in sparse["rows"]}
    mine = {(r["batch"], r["prompt"]): r for r in dense["rows"]}
    rows = []
    for v in vllm["rows"]:
        point = (v["batch"], v["prompt"])
        s, d = ours[point], mine.get(point, {})
        best_decode = min(v["decode_ms"], d.get("decode_ms", float("inf")))
        best_ttft = min(v["ttft_ms"], d.get("ttft_ms", float("inf")))
        rows.append({"batch": v["batch"], "prompt": v["prompt"], "vllm_dense_decode_ms": v["decode_ms"],
                     "sparse_decode_ms": s["decode_ms"], "speedup": v["decode_ms"] / s["decode_ms"],
                     "vllm_dense_ttft_ms": v["ttft_ms"], "sparse_ttft_ms": s["ttft_ms"],
                     "maskpro_dense_decode_ms": d.get("decode_ms"), "maskpro_dense_ttft_ms": d.get("ttft_ms"),
                     "speedup_vs_strongest_dense": best_decode / s["decode_ms"],
                     "ttft_vs_strongest_dense": s["ttft_ms"] / best_ttft,
                     "sparse_roofline_fraction": s["roofline_fraction"]})
    first = [r for r in sparse["rows"] if r["batch"] == 1]
    both = set(mine) & set(ours)

    def peak(rows: list[dict]) -> float:  # the largest peak over the points both models ran
        return max(r["peak_gib"] for r in rows if (r["batch"], r["prompt"]) in both)
    return {"device": device, "vllm": vllm.get("vllm"), "rows": rows,
            "roofline_fraction_batch1": first[0]["roofline_fraction"] if first else None,
            "weights_gib": {"dense": dense["weights_gib"], "sparse": sparse["weights_gib"]},
            "peak_gib": {"dense": peak(dense["rows"]), "sparse": peak(sparse["rows"])},
            "peak_points": sorted(both)}


def write_summary(generate_json: Path) -> Path:
    """(Re)write ``vs-vllm-dense.json`` beside a ``generate --runtime fast`` result that holds vLLM figures."""
    from maskpro.errors import MaskproError

    if not Path(generate_json).is_file():
        raise MaskproError(f"{generate_json} does not exist; pass a generate-<tag>.json written with --runtime fast")
    d = json.loads(Path(generate_json).read_text())
    if "vllm_dense" not in d or "rows" not in d["vllm_dense"]:
        raise MaskproError(f"{generate_json} holds no vLLM dense figures; run generate --runtime fast with vLLM")
    out = Path(generate_json).parent / "vs-vllm-dense.json"
    from maskpro.checkpoint import save_json

    # the code that measured it, where the source names it (a result saved from another checkout's copy)
    code = {"code": d["code"]} if "code" in d else {}
    save_json({**summary(d["device"], d["vllm_dense"], d["sparse"], d["dense_compiled"]),
               "source": Path(generate_json).name, **code}, out)
    return out


def run(a: argparse.Namespace, out_path: Path) -> Path:
    points = parse_points(a.points) if a.points else [(b, p) for b in a.batch_sizes for p in a.prompts]
    if a.dense_points:
        parse_points(a.dense_points)
    if a.vllm_results and not Path(a.vllm_results).is_file():
        from maskpro.errors import MaskproError

        raise MaskproError(f"--vllm-results {a.vllm_results} does not exist; run python -m maskpro.bench.vllm_dense "
                           f"first and pass the JSON it prints")
    if not torch.cuda.is_available():
        from maskpro.errors import MaskproError

        raise MaskproError("--runtime fast times CUDA graphs and needs a GPU; on CPU use --runtime transformers")
    env = environment()
    if a.vllm_results:  # measured by `python -m maskpro.bench.vllm_dense` just before, on this machine
        vllm = json.loads(Path(a.vllm_results).read_text())
    elif a.vllm and vllm_installed():
        vllm = _vllm(a, points)
    else:
        vllm = {"error": "not asked (--no-vllm)" if not a.vllm else "vLLM is not installed here"}
    bandwidth = copy_bandwidth("cuda")
    sparse = _phase(a, True, points, bandwidth)
    dense = _phase(a, False, parse_points(a.dense_points) if a.dense_points else points, bandwidth)
    by_point = {(d["batch"], d["prompt"]): d for d in dense["rows"]}
    for s in sparse["rows"]:
        d = by_point.get((s["batch"], s["prompt"]))
        if d:
            s["speedup_vs_compiled_dense"] = d["decode_ms"] / s["decode_ms"]
            s["ttft_speedup_vs_compiled_dense"] = d["ttft_ms"] / s["ttft_ms"]
    out = {"device": env["device"], "model": f"{a.config} (random weights, decoder linears 2:4 by magnitude)",
           "runtime": "maskpro fast (compiled block, CUDA graphs, mma.sp 2:4, compressed weights only)",
           "new_tokens": a.new, "reps": a.reps, "copy_bandwidth_tb_s": bandwidth / 1e12,
           "vllm_dense": vllm, "sparse": sparse, "dense_compiled": dense, "env": env}
    merge_json(out_path, out)
    if "rows" in vllm:
        write_summary(out_path)
    return out_path


if __name__ == "__main__":  # python -m maskpro.bench.generate_fast RESULT.json: rewrite its vs-vllm-dense.json
    from maskpro.errors import run_cli

    if len(sys.argv) != 2:
        sys.exit("usage: python -m maskpro.bench.generate_fast generate-<tag>.json")
    sys.exit(run_cli("generate_fast", lambda: print(f"wrote {write_summary(Path(sys.argv[1]))}"), "nothing written"))
