"""Data-parallel mask learning: steps/s on 1 and on N processes at the same global batch and seed, peak memory
per rank against the lean bound, and a digest of the final masks so the runs can be checked to agree.

  python -m benchmarks.learn_distributed --config llama2-7b --memory lean --reference-world 2 --out R.json
  torchrun --nproc-per-node 2 -m benchmarks.learn_distributed --config llama2-7b --memory lean --out R.json

``--config smollm2`` is the real SmolLM2-135M-Instruct (``--model`` takes its folder or .gguf file); any other
name (``tiny``, ``llama2-7b``, ``NAME:LAYERS``, see ``benchmarks/configs.py``) is a Llama with random weights
at that shape, built directly on the device. Rows are random tokens and the prior is magnitude 2:4: speed
does not depend on the values, and no calibration is needed.

Every invocation merges one row into the JSON, keyed ``CONFIG/MEMORY/bBATCH/wWORLD``:
- ``ms_per_step`` (median, CUDA events after ``--warmup`` steps; rank 0, whose step includes the all-reduce
  wait), p10/p90, ``steps_per_s``;
- ``peak_bytes_per_rank`` (``torch.cuda.max_memory_allocated`` from the learner's construction on) and the bound
  ``model_bytes + 4 * weights + activation_bytes``, the activations measured as the peak of one plain
  forward + loss of the unmasked model on the rows one forward pass takes;
- ``mask_sha256`` of the final masks and the fraction of mask entries that moved from the prior.
With ``--reference-world N`` a single process also runs the same global batch as N micro-batches (what N
ranks run) and records that digest: N processes must reproduce it bit for bit (their loss all-reduce sums
what the single process adds up). When the JSON holds both, ``comparisons`` gets the speedup and whether
the masks are identical. On a CPU (gloo, ``--config tiny``) it checks the harness in seconds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
from pathlib import Path

import torch

from maskpro import distributed
from maskpro.errors import MaskproError
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, load_model
from maskpro.nm import NM, topn_mask

from . import configs, stats
from .env import add_output_args, environment, merge_json, output_path
from .learn_speed import timed_steps

REAL = "smollm2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"{REAL} (the real model) or a random-weight shape: "
                                                  f"{', '.join(configs.CONFIGS)}, NAME:LAYERS (default: "
                                                  "llama2-7b on GPU, tiny on CPU)")
    p.add_argument("--model", default=None, help=f"folder or .gguf of '{REAL}' (default SmolLM2-135M-Instruct)")
    p.add_argument("--memory", default="fast", choices=["fast", "lean"], help="the learner's memory mode")
    p.add_argument("--batch-size", type=int, default=None, help="global rows per step (default 32, CPU 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 128, CPU 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100, CPU 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, CPU 2)")
    p.add_argument("--batches", type=int, default=4, help="distinct minibatches the rows hold")
    p.add_argument("--lr", type=float, default=50.0)
    p.add_argument("--scale", type=float, default=3.0,
                   help="initial logits = prior x scale; below the paper's 10 so that a short run moves the masks "
                        "and the digest comparison means something (speed does not depend on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-world", type=int, default=0,
                   help="single process only: also run the global batch as this many micro-batches and record "
                        "its mask digest (what that many processes must reproduce)")
    add_output_args(p, "learn-distributed.json")


def _defaults(a: argparse.Namespace, cuda: bool) -> None:
    for key, gpu, cpu in (("config", "llama2-7b", "tiny"), ("batch_size", 32, 8), ("seq_len", 128, 16),
                          ("steps", 100, 6), ("warmup", 10, 2)):
        if getattr(a, key) is None:
            setattr(a, key, gpu if cuda else cpu)


def build(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The model on ``device``: the real SmolLM2, or random weights at a configured shape (seeded: every rank
    builds the same replica)."""
    if a.config == REAL:
        return load_model(a.model, dtype, device)[0]
    return configs.build_random_model(configs.resolve(a.config), str(device), dtype, seed=a.seed)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes, in name order (masks or logits; any device)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def activation_bytes(model, rows: torch.Tensor, cuda: bool) -> int:
    """Peak extra memory of one plain forward + loss (no learner) on ``rows``: what activations cost."""
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(input_ids=rows, labels=rows, use_cache=False).loss.float().item()
    return torch.cuda.max_memory_allocated() - before


def learn(a: argparse.Namespace, group: distributed.Group, dtype: torch.dtype, micro: int = 0,
          timed: bool = True) -> dict:
    """Build a replica, learn ``warmup + steps`` steps, and report time, memory and the final masks."""
    cuda = group.device.type == "cuda"
    model = build(a, group.device, dtype)
    layers = find_linears(model)
    nm = NM(2, 4)
    prior = {n: topn_mask(m.weight.data.abs(), nm).cpu() for n, m in layers.items()}
    if not distributed.agree(int(digest(prior)[:15], 16)):
        raise MaskproError("the ranks built different replicas (prior digests differ); use one GPU model type")
    g = torch.Generator().manual_seed(a.seed)
    rows = torch.randint(0, model.config.vocab_size, (a.batches * a.batch_size, a.seq_len), generator=g)
    n_weights = sum(m.weight.numel() for m in layers.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    local = a.batch_size // group.world_size
    act = activation_bytes(model, rows[:micro or local].to(group.device), cuda)
    cfg = LearnerConfig(steps=a.warmup + a.steps, batch_size=a.batch_size, lr=a.lr, scale=a.scale, seed=a.seed,
                        memory=a.memory,
                        micro_batch=micro, checkpoint_every=10**9)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    learner = MaskProLearner(model, layers, prior, rows, cfg, progress=False)
    learner.prepare(resume=False)
    timed_steps(learner.train_step, a.warmup, cuda)
    times = timed_steps(learner.train_step, a.steps, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    masks = learner.final_masks()
    peaks = [peak]
    if group.distributed:
        peaks = [None] * group.world_size
        torch.distributed.all_gather_object(peaks, peak)
    s = stats.summarize(times)
    bound = model_bytes + 4 * n_weights + act
    row = {"world_size": group.world_size, "global_batch": a.batch_size, "rows_per_forward": micro or local,
           "seq_len": a.seq_len, "memory": a.memory, "steps_timed": a.steps, "warmup": a.warmup, "seed": a.seed,
           "lr": a.lr, "scale": a.scale, "linear_weights": n_weights, "learner_state_bytes": learner.state_bytes(),
           "mask_sha256": digest(masks), "logits_sha256": digest(learner.logits()),
           "changed_fraction": sum(int((masks[n] != prior[n]).sum()) for n in masks) / n_weights,
           "skipped_steps": int((~torch.isfinite(learner.residuals[: learner.step])).sum())}
    if timed:
        row.update(ms_per_step=s["median"], ms_p10=s["p10"], ms_p90=s["p90"], spread=s["spread"],
                   trusted=stats.trusted(s["spread"]), steps_per_s=1000.0 / s["median"])
    if cuda:
        row.update(peak_bytes_per_rank=peaks, model_bytes=model_bytes, activation_bytes=act,
                   bound_bytes=bound, within_bound=max(peaks) <= bound,
                   peak_over_bound_gib=(max(peaks) - bound) / 2**30)
    del learner, model, layers
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _compare(runs: dict) -> dict:
    """Speedup and mask identity of each multi-process row against the single-process row of its setting."""
    out = {}
    for key, row in runs.items():
        base, _, world = key.rpartition("/w")
        one = runs.get(f"{base}/w1", {})
        if world == "1" or "steps_per_s" not in row or "steps_per_s" not in one:
            continue
        ref = one.get("reference", {}).get(world)
        out[key] = {"speedup": row["steps_per_s"] / one["steps_per_s"], "world_size": int(world),
                    "masks_identical_to_reference": None if ref is None else ref["mask_sha256"] == row["mask_sha256"],
                    "logits_identical_to_reference": None if ref is None else
                    ref["logits_sha256"] == row["logits_sha256"],
                    "masks_identical_to_unsplit_single_process": one["mask_sha256"] == row["mask_sha256"]}
    return out


def run(a: argparse.Namespace) -> Path | None:
    group = distributed.init_from_env()
    cuda = group.device.type == "cuda"
    _defaults(a, cuda)
    distributed.local_batch(a.batch_size, group.world_size)
    if a.reference_world and (group.distributed or a.batch_size % a.reference_world):
        raise MaskproError("--reference-world is for a single process, and must divide --batch-size")
    dtype = torch.float16 if cuda else torch.float32
    row = learn(a, group, dtype)
    if a.reference_world > 1:
        ref = learn(a, group, dtype, micro=a.batch_size // a.reference_world, timed=False)
        row["reference"] = {str(a.reference_world): {k: ref[k] for k in ("mask_sha256", "logits_sha256",
                                                                           "rows_per_forward")}}
    if not group.is_main:
        distributed.shutdown()
        return None

    key = f"{a.config}/{a.memory}/b{a.batch_size}/w{group.world_size}"
    path = output_path(a, "learn-distributed.json")
    merged = merge_json(path, {"runs": {key: {**row, "env": {**environment(), "world_size": group.world_size}}}})
    merged = merge_json(path, {"comparisons": _compare(merged["runs"])})
    print(f"{key}: " + ", ".join(f"{k}={row[k]}" for k in ("ms_per_step", "mask_sha256") if k in row), flush=True)
    if key in merged["comparisons"]:
        print(f"{key}: {merged['comparisons'][key]}", flush=True)
    distributed.shutdown()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learn_distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except MaskproError as e:
        print(f"learn_distributed: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
