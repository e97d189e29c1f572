"""Mask-learning cost: ms per MaskPro step and peak GPU memory, ours vs a naive per-layer loop, one process.

  python -m benchmarks.learn_speed                      # SmolLM2-135M, batch 32 x 128 tokens, fp16

The naive loop is the official code's structure (per-layer softmax, torch.multinomial without
replacement, per-layer masked copies, a host sync for the loss every step), rebuilt here as the in-run
baseline. Every step is timed with CUDA events after warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.env import RESULTS, environment, merge_json
from maskpro import data, policy
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, load_model, tiny_llama
from maskpro.nm import NM, topn_mask


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default SmolLM2-135M-Instruct; 'tiny' for a CPU smoke run")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--naive-steps", type=int, default=20)
    p.add_argument("--tag", default="smollm2-2of4")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    nm = NM(2, 4)
    if a.model == "tiny":
        model, tok = tiny_llama(vocab_size=49152, hidden=64).to(device), None
        batches = torch.randint(0, 49152, (max(64, a.batch_size * 2), a.seq_len), device=device)
    else:
        model, tok = load_model(a.model, a.dtype, device)
        batches = data.learning_batches(tok, 512, a.seq_len, a.data_dir).to(device)
    layers = find_linears(model)
    prior = {n: topn_mask(m.weight.data.abs(), nm) for n, m in layers.items()}
    n_weights = sum(m.weight.numel() for m in layers.values())
    rows = {}
    for graph in ([True, False] if cuda else [False]):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cfg = LearnerConfig(steps=a.warmup + a.steps + 60, batch_size=a.batch_size, cuda_graph=graph)
        learner = MaskProLearner(model, layers, prior, batches, cfg, progress=False)
        learner.prepare(resume=False)
        timed_steps(learner.train_step, a.warmup, cuda)
        t = timed_steps(learner.train_step, a.steps, cuda)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        ids = learner.batch(0)
        box = {}
        phases = {"sample": learner.sample_phase,
                  "forward": lambda: box.__setitem__("loss", learner.forward_loss(ids)),
                  "update": lambda: learner.update_phase(box["loss"])}
        breakdown = {k: [] for k in phases}
        for _ in range(min(a.steps, 50)):
            for k, fn in phases.items():
                breakdown[k].append(timed_steps(fn, 1, cuda)[0])
        rows["maskpro" + ("" if graph else "-eager")] = {
            "ms_per_step": statistics.median(t), "ms_mean": statistics.fmean(t),
            "ms_p10": sorted(t)[len(t) // 10], "ms_p90": sorted(t)[9 * len(t) // 10], "steps": a.steps,
            "peak_gib": peak, "breakdown_ms": {k: statistics.median(v) for k, v in breakdown.items()}}
        print(json.dumps({"cuda_graph": graph, **rows["maskpro" + ("" if graph else "-eager")]}), flush=True)
        learner.finish(learner.final_masks())
    if a.naive_steps:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = naive_loop(model, layers, prior, batches, nm, a.batch_size, 50.0, 10.0)
        timed_steps(step, 3, cuda)
        t = timed_steps(step, a.naive_steps, cuda)
        rows["naive-per-layer"] = {"ms_per_step": statistics.median(t), "ms_mean": statistics.fmean(t),
                                   "steps": a.naive_steps,
                                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        print(json.dumps({"naive": rows["naive-per-layer"]}), flush=True)
    best = rows.get("maskpro", rows.get("maskpro-eager"))
    env = environment()
    result = {"device": env["device"], "env": env, "batch": [a.batch_size, a.seq_len], "dtype": a.dtype,
              "linear_weights": n_weights, "rows": rows,
              "speedup_vs_naive": rows["naive-per-layer"]["ms_per_step"] / best["ms_per_step"]
              if "naive-per-layer" in rows else None}
    merge_json(RESULTS / f"learner-{a.tag}.json", result)
    if a.model != "tiny":
        merge_json(RESULTS / f"quality-{a.tag}.json",
                   {"learner": {"ms_per_step": best["ms_per_step"], "peak_gib": best["peak_gib"],
                                "batch": [a.batch_size, a.seq_len], "device": env["device"],
                                "naive_ms_per_step": rows.get("naive-per-layer", {}).get("ms_per_step")}})
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
