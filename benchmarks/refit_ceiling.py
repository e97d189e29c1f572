"""How much of a layer's pruning error is the mask's, once the kept weights are re-fitted?

  maskpro-bench refit-ceiling                      # SmolLM2 block 11's q, v, o and gate projections, CPU (~5 min)
  maskpro-bench refit-ceiling --layers model.layers.5.mlp.up_proj --rows 32

For each layer and a sample of its output rows, the relative output error ``||X(w - w')||^2 / ||Xw||^2`` (X the
dense inputs of the learning tokens; X^T X damped as SparseGPT damps it, the objective every method here solves)
of four (mask, re-fit) pairs:
- ``sparsegpt_seq``: SparseGPT's mask and weights (its sequential, lazy-batch OBS updates), what ``maskpro prune
  --method sparsegpt`` and ``--reconstruct obs`` keep;
- ``sparsegpt_exact``: the same mask, kept weights re-fitted exactly (the least-squares solution for that mask,
  :func:`maskpro.sparsegpt.exact_refit`, what ``--reconstruct exact`` keeps);
- ``greedy_exact``: a mask found by coordinate descent over every group's C(4, 2) patterns on the exact re-fit
  error, from SparseGPT's mask, re-fitted exactly: how far a re-fit-aware mask search can go;
- ``greedy_seq``: that mask re-fitted by SparseGPT's sequential updates instead.
The learner's rewards score masks on fixed weights (``maskpro.row_reward``); this asks whether a reward that
scores the error after re-fitting has room to improve on SparseGPT's mask (docs/results.md). Writes
``refit-ceiling-<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from .env import add_output_args, environment, output_path

LAYERS = ["model.layers.11.self_attn.q_proj", "model.layers.11.self_attn.v_proj",
          "model.layers.11.self_attn.o_proj", "model.layers.11.mlp.gate_proj"]
N_DOCS, SEQ_LEN, BATCH = 128, 128, 8
DAMP = 0.01  # SparseGPT's dampening of H, fraction of its mean diagonal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    p.add_argument("--layers", nargs="+", default=LAYERS, help="linear layers to probe (2:4 along their input)")
    p.add_argument("--rows", type=int, default=16, help="output rows sampled per layer")
    p.add_argument("--sweeps", type=int, default=2, help="coordinate-descent passes over a row's groups")
    p.add_argument("--eval", action="store_true",
                   help="also prune --targets with each re-fit through `maskpro prune` and report quick perplexities")
    p.add_argument("--targets", default="model.layers.1[0-2].*", help="with --eval: the layers to prune (a glob)")
    add_output_args(p, "refit-ceiling-cpu.json")


def exact_error(w: torch.Tensor, keep: torch.Tensor, hinv: torch.Tensor) -> float:
    """``w_P^T (Hinv[P, P])^-1 w_P``: the output error of that re-fit under the (damped) H of ``hinv``."""
    p = (~keep).nonzero().flatten()
    return float(w[p] @ torch.linalg.solve(hinv[p][:, p], w[p]))


def greedy_mask(w: torch.Tensor, keep: torch.Tensor, hinv: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Coordinate descent over every group of 4's 2:4 patterns on :func:`exact_error`, from ``keep``."""
    keep, best = keep.clone(), exact_error(w, keep, hinv)
    patterns = list(itertools.combinations(range(4), 2))
    for _ in range(sweeps):
        for g in range(0, w.numel(), 4):
            chosen = keep[g:g + 4].clone()
            for a, b in patterns:
                trial = keep.clone()
                trial[g:g + 4] = False
                trial[g + a] = trial[g + b] = True
                if torch.equal(trial[g:g + 4], keep[g:g + 4]):
                    continue
                e = exact_error(w, trial, hinv)
                if e < best:
                    best, chosen = e, trial[g:g + 4].clone()
            keep[g:g + 4] = chosen
    return keep


@torch.no_grad()
def probe_layer(w: torch.Tensor, h: torch.Tensor, rows: list[int], sweeps: int) -> dict:
    """The four errors (module doc) of each sampled row of weight ``w`` with input Gram ``h``."""
    from maskpro.nm import NM
    from maskpro.sparsegpt import exact_refit, inverse_hessian_factor, obs_prune

    h64 = h.double()
    damped = h64 + DAMP * h64.diag().mean() * torch.eye(h.shape[0], dtype=h64.dtype)
    u = inverse_hessian_factor(h, DAMP)[0].double()
    hinv = u.T @ u
    sgpt = obs_prune(w, h, NM(2, 4), percdamp=DAMP)
    sampled, keep = w[rows], sgpt.mask[rows].bool()
    greedy = torch.stack([greedy_mask(sampled[i].double(), keep[i], hinv, sweeps) for i in range(len(rows))])
    # every re-fit of the sampled rows at once: rows are independent under one H
    fitted = {"sparsegpt_seq": sgpt.weight[rows], "sparsegpt_exact": exact_refit(sampled, h, keep, DAMP),
              "greedy_exact": exact_refit(sampled, h, greedy, DAMP),
              "greedy_seq": obs_prune(sampled, h, NM(2, 4), mask=greedy, percdamp=DAMP).weight}

    def rel(row: torch.Tensor, fit: torch.Tensor) -> float:  # under the damped H every method solves for
        d = row - fit
        return float(d @ damped @ d) / float(row @ damped @ row)

    out = {k: [rel(sampled[i].double(), fit[i].double()) for i in range(len(rows))] for k, fit in fitted.items()}
    return {k: statistics.mean(v) for k, v in out.items()} | {"per_row": out}


# With --eval: the same blocks pruned through the command a user types, re-fitted each way (the learner's
# settings are mask-search's group variant)
PIPELINES = {"sparsegpt": [], "sparsegpt+exact": ["--reconstruct", "exact"],
             "sparsegpt+block": ["--reconstruct", "block"],
             "maskpro@sparsegpt+exact": ["--method", "maskpro", "--learn-on", "sparsegpt", "--loss", "group", "--lr",
                                         "3000", "--scale", "5", "--steps", "300", "--reconstruct", "exact"]}


def pipelines(a: argparse.Namespace) -> list[dict]:
    """``maskpro prune --preset cpu-quick`` of ``--targets`` per entry of PIPELINES, then ``maskpro eval --quick``."""
    import tempfile

    from .cpu_quick import timed
    from .mask_search import BATCH, N_DOCS, SEQ_LEN, quick_eval

    common = [*(["--model", a.model] if a.model else []), *(["--data-dir", a.data_dir] if a.data_dir else [])]
    base = ["--preset", "cpu-quick", "--targets", a.targets, "--n-docs", str(N_DOCS), "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH), "-q", "--method", "sparsegpt"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskpro-refit-") as tmp:
        for name, extra in PIPELINES.items():
            out = Path(tmp) / name.replace("@", "-").replace("+", "-")
            argv = [*base, *extra]
            row = {"pipeline": name, "prune_argv": ["maskpro", "prune", *argv, "--out", "OUT"],
                   "prune_s": timed(["prune", *common, *argv, "--out", str(out)])}
            row["perplexity"] = quick_eval(out, ["--data-dir", a.data_dir] if a.data_dir else [], Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run(a: argparse.Namespace) -> Path:
    from maskpro import data
    from maskpro.errors import MaskproError
    from maskpro.models import find_linears, load_model
    from maskpro.row_reward import RowTargets
    from maskpro.checkpoint import save_json

    if a.rows < 1 or a.sweeps < 1:
        raise MaskproError("--rows and --sweeps must be at least 1")
    model, tok = load_model(a.model, "float32", "cpu")
    layers = find_linears(model, a.layers)
    missing = [n for n in a.layers if n not in layers]
    if missing:
        raise MaskproError(f"the model has no linear layer {missing[0]!r}; name one like {next(iter(layers))!r}")
    batches = data.learning_batches(tok, N_DOCS, SEQ_LEN, a.data_dir, None, 1, 0)
    targets = RowTargets(model, [layers[n] for n in a.layers], batches, BATCH)
    gen = torch.Generator().manual_seed(0)
    result: dict = {"layers": {}, "rows_per_layer": a.rows, "sweeps": a.sweeps, "damp": DAMP,
                    "learning_tokens": int(batches.numel())}
    for i, name in enumerate(a.layers):
        t0 = time.perf_counter()
        w = layers[name].weight.data.float()
        rows = torch.randperm(w.shape[0], generator=gen)[:a.rows].tolist()
        result["layers"][name] = probe_layer(w, targets.grams[targets.gram_of[i]], rows, a.sweeps) | {
            "rows": rows, "seconds": time.perf_counter() - t0}
        means = {k: round(v, 5) for k, v in result["layers"][name].items() if isinstance(v, float)}
        print(name, means, flush=True)
    layer_means = list(result["layers"].values())
    result["mean"] = {k: statistics.mean(r[k] for r in layer_means)
                      for k in ("sparsegpt_seq", "sparsegpt_exact", "greedy_exact", "greedy_seq")}
    if a.eval:
        result["pipelines"] = pipelines(a)
    result["env"] = environment()
    path = output_path(a, "refit-ceiling-cpu.json")
    save_json(result, path)
    print(f"wrote {path}")
    return path
