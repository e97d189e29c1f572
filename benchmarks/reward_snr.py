"""How much signal a MaskPro step carries: global (LM loss) against block-local rewards, on the real model.

Two independent runs (other seeds, same prior, same logits, the logits held still) each sum the policy-gradient
estimate ``adv * d log P(mask) / d logits`` over ``--steps`` steps. Where the estimate is mostly noise the two
sums are uncorrelated; the correlation between them, per decoder block, measures the signal a step brings
(for an unbiased estimate with signal s and per-step noise n over k steps it is about k s^2 / (k s^2 + n^2)).
The learner's own loop draws the masks and computes the losses; only its logit update is replaced by the sum.

  maskpro-bench reward-snr --steps 24 --scale 5           # SmolLM2 on CPU: about 20 minutes
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from maskpro import data, policy
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, load_model
from maskpro.nm import NM
from maskpro.oneshot import prune

from .env import add_output_args, environment, merge_json, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--init", default="wanda", help="prior mask (one-shot method)")
    p.add_argument("--losses", nargs="+", default=["ce", "local"], choices=["ce", "kd", "local", "row"],
                   help="row: one reward per output row of every linear (a probe; the learner has no such loss)")
    p.add_argument("--steps", type=int, default=16, help="steps summed by each of the two runs")
    p.add_argument("--scale", type=float, default=5.0, help="initial logits = prior * scale (exploration)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=64, help="learning rows (of --seq-len tokens, from C4)")
    p.add_argument("--dtype", default=None, help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--data-dir", default=None)
    add_output_args(p, "reward-snr.json")


def summed_gradient(model_path, dtype, device, prior, rows, cfg: LearnerConfig) -> tuple[torch.Tensor, list, dict]:
    """The sum over ``cfg.steps`` of the policy-gradient estimate, with the logits held at their start."""
    model, _ = load_model(model_path, dtype, device)
    learner = MaskProLearner(model, find_linears(model), prior, rows, cfg, progress=False)
    mode = learner.mode
    sizes = torch.tensor([(b - a) // cfg.nm.m for a, b in zip(mode.offsets, mode.offsets[1:])])
    s_res = torch.zeros_like(mode.theta)    # sum over steps of residual * score
    s_one = torch.zeros_like(mode.theta)    # sum over steps of score
    res_sum = torch.zeros_like(learner.delta)
    first = _first_of_block(learner) if learner.local is not None else None

    def accumulate(adv: torch.Tensor, step: int) -> None:
        g = policy.log_prob_grad(mode.theta.view(-1, cfg.nm.m), mode.mask.view(-1, cfg.nm.m), cfg.nm.n)
        delta = learner.delta if learner.local is None else learner.delta[learner.local.layer_block]
        res = delta - adv  # adv = -(res - delta) at lr 1: the raw residual of this step (per layer if local)
        res_sum.add_(learner.delta - (adv if first is None else adv[first]))
        if res.dim():
            res = torch.repeat_interleave(res, sizes.to(res.device)).unsqueeze(1)
        s_res.add_((res * g).view(-1))
        s_one.add_(g.view(-1))

    mode.update = accumulate
    t0 = time.perf_counter()
    out = learner.run(resume=False)
    # Centred on the run's mean residual (per block): the part of the estimate that says which draw was better,
    # without the common push back towards the prior that a positive mean residual gives every draw.
    mean = res_sum / cfg.steps
    if mean.dim():
        mean = torch.repeat_interleave(mean[learner.local.layer_block], sizes.to(mean.device))
        mean = torch.repeat_interleave(mean, cfg.nm.m)
    return s_res - mean * s_one, mode.offsets, {"ms_per_step": out.ms_per_step, "wall_s": time.perf_counter() - t0,
                                                "residual_mean": sum(out.residuals) / len(out.residuals)}


@torch.no_grad()
def row_sums(model_path, dtype, device, prior, rows, cfg: LearnerConfig) -> tuple[torch.Tensor, list, dict]:
    """The same sum with one reward per output row of every linear (a probe: the learner has no such loss).

    A row's reward is its squared output error on the dense model's input to that linear (captured once per
    batch), so only the groups of that row share it: hundreds instead of a block's ~870 K.
    """
    model, _ = load_model(model_path, dtype, device)
    learner = MaskProLearner(model, find_linears(model), prior, rows, cfg, progress=False)
    mode, m = learner.mode, cfg.nm.m
    inputs: list[list[torch.Tensor]] = [[] for _ in range(learner.n_batches)]
    hooks, current = [], {}
    for i, mod in enumerate(mode.modules):
        hooks.append(mod.register_forward_hook(
            lambda _m, args, _o, i=i: inputs[current["b"]].append(args[0].reshape(-1, args[0].shape[-1]))))
    for b in range(learner.n_batches):  # dense weights: the mode's buffers start as the dense source
        current["b"] = b
        mode.w.copy_(mode.w0)
        model(input_ids=learner.batch(b), use_cache=False)
    for h in hooks:
        h.remove()
    dense = [[x @ w.T for x, w in zip(inputs[b], (mod.weight for mod in mode.modules))] for b in range(len(inputs))]

    def row_errors(b: int) -> torch.Tensor:
        return torch.cat([(x @ mod.weight.T - y).float().pow(2).mean(0)
                          for x, mod, y in zip(inputs[b], mode.modules, dense[b])])

    with mode.initial_weights():
        base = [row_errors(b) for b in range(learner.n_batches)]
    per_row = torch.cat([torch.full((s[0],), s[1] // m) for s in mode.shapes]).to(mode.theta.device)
    s_res, s_one = torch.zeros_like(mode.theta), torch.zeros_like(mode.theta)
    res_sum = torch.zeros_like(base[0])
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        b = step % learner.n_batches
        mode.sample(step)
        res = row_errors(b) - base[b]
        res_sum += res
        g = policy.log_prob_grad(mode.theta.view(-1, m), mode.mask.view(-1, m), cfg.nm.n)
        s_res.add_((torch.repeat_interleave(res, per_row).unsqueeze(1) * g).view(-1))
        s_one.add_(g.view(-1))
    mean = torch.repeat_interleave(torch.repeat_interleave(res_sum / cfg.steps, per_row), m)
    wall = time.perf_counter() - t0
    return s_res - mean * s_one, mode.offsets, {"ms_per_step": 1000 * wall / cfg.steps, "wall_s": wall,
                                                "residual_mean": float(res_sum.mean() / cfg.steps)}


def _first_of_block(learner) -> torch.Tensor:
    """Index of one layer of every block (the per-layer advantages repeat their block's value)."""
    lb = learner.local.layer_block.tolist()
    return torch.tensor([lb.index(k) for k in range(learner.local.n_blocks)])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def run(a: argparse.Namespace) -> object:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("fp16" if device == "cuda" else "fp32")
    out = output_path(a, "reward-snr.json")
    model, tok = load_model(a.model, dtype, device)
    calib = data.calibration_windows(tok, max(1, a.rows * a.seq_len // 512), 512, 0, a.data_dir)
    rows = calib.reshape(-1, a.seq_len)[: a.rows]
    prior = prune(model, a.init, NM(2, 4), calib).masks
    del model
    names = list(prior)
    block_of = [int(n.split(".")[2]) if n.split(".")[1] == "layers" else -1 for n in names]
    result = {}
    for loss in a.losses:
        sums, info = [], []
        for seed in (1, 2):
            cfg = LearnerConfig(steps=a.steps, batch_size=a.batch_size, lr=1.0, lr_schedule="constant",
                                scale=a.scale, loss="ce" if loss == "row" else loss, seed=seed, cuda_graph=False)
            probe = row_sums if loss == "row" else summed_gradient
            acc, offsets, meta = probe(a.model, dtype, device, prior, rows, cfg)
            sums.append(acc)
            info.append(meta)
            print(f"{loss} seed {seed}: {meta}", flush=True)
        per_block = {}
        for blk in sorted(set(block_of)):
            idx = [i for i, b in enumerate(block_of) if b == blk]
            sl = [torch.cat([s[offsets[i]:offsets[i + 1]] for i in idx]) for s in sums]
            per_block[blk] = _corr(*sl)
        vals = list(per_block.values())
        result[loss] = {"corr_whole_model": _corr(*sums), "corr_per_block": per_block,
                        "corr_block_mean": sum(vals) / len(vals), "runs": info}
        print(f"{loss}: whole-model correlation {result[loss]['corr_whole_model']:.4f}, "
              f"mean per block {result[loss]['corr_block_mean']:.4f}", flush=True)
    merge_json(out, {"model": a.model or "SmolLM2-135M-Instruct", "prior": a.init, "nm": "2:4",
                     "steps_per_run": a.steps, "scale": a.scale, "batch": [a.batch_size, a.seq_len],
                     "rows": int(rows.shape[0]), "dtype": dtype, "results": result, "env": environment(),
                     "device": environment()["device"]})
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("reward-snr"))
