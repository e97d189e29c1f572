"""How much better than SparseGPT's mask can the learner's mask be, scored by each row's exact output error?

  maskpro-bench mask-search                                  # SmolLM2, blocks 10-12, on this CPU (~20 min)
  maskpro-bench mask-search --variants group:300 group:3000 --steps 300 --greedy --eval

For a few decoder blocks (``--targets``) it runs SparseGPT (the prior, with its compensated "decided" weights) and
then the MaskPro learner on those weights with a row-local loss (``loss:lr`` per variant, ``--loss row`` or
``group``, :mod:`maskpro.row_reward`), each through the same ``maskpro prune`` command a user types, and reports
the mean relative row error (``||X(w - s*m)||^2 / ||Xw||^2`` on the dense inputs of every learning token) of the
prior's mask and the learned one. ``--greedy`` adds a ceiling: coordinate descent over every group's C(M, N)
choices with the exact row error, from the prior, on the same weights. ``--eval`` adds quick perplexities
(``maskpro eval --quick``) of the prior and each learned model. Writes ``mask-search-<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskpro.schema import read_meta

from .cpu_quick import timed
from .env import add_output_args, environment, output_path


# The learner's rows (the greedy ceiling builds the same X^T X from them, so both score one prior alike)
N_DOCS, SEQ_LEN, BATCH = 512, 128, 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    p.add_argument("--targets", default="model.layers.1[0-2].*", help="layers to prune (a glob)")
    p.add_argument("--variants", nargs="+", default=["row:1", "group:300", "group:3000"],
                   help="learner runs as loss:lr (row runs with --normalize-adv)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--greedy", action="store_true", help="add the coordinate-descent ceiling")
    p.add_argument("--eval", action="store_true", help="add quick perplexities of the prior and learned models")
    add_output_args(p, "mask-search-cpu.json")


@torch.no_grad()
def greedy_ceiling(model_arg, data_dir, prior_file: Path, device: str, sweeps: int = 2) -> dict:
    """Coordinate descent over every group's 2:4 patterns with the exact row error, from the prior's mask.

    The learner's own :class:`RowTargets` gives the prior's error, G = E H and the energies; the search then
    tracks (E H) and the error change of every accepted swap, so E itself is never formed.
    """
    from safetensors.torch import load_file

    from maskpro import data
    from maskpro.models import find_linears, load_model
    from maskpro.nm import unpack_mask
    from maskpro.row_reward import RowTargets

    model, tok = load_model(model_arg, "float32", device)
    tensors = load_file(str(prior_file))
    layers = find_linears(model, [k[len("mask."):] for k in tensors if k.startswith("mask.")])
    names = list(layers)
    rows = data.learning_batches(tok, N_DOCS, SEQ_LEN, data_dir, None, 1, 0)
    targets = RowTargets(model, [layers[n] for n in names], rows, BATCH, device)
    sources = [tensors[f"decided.{n}"].to(device).float() for n in names]
    masks = [unpack_mask(tensors[f"mask.{n}"], tuple(layers[n].weight.shape)).to(device).float() for n in names]
    targets.bind(sources, masks)
    m = 4
    patterns = torch.tensor([[1.0 if j in c else 0.0 for j in range(m)] for c in itertools.combinations(range(m), 2)],
                            device=device)
    change = []
    for i, (s, mask) in enumerate(zip(sources, masks)):
        h, eh = targets.grams[targets.gram_of[i]], targets.g[i].clone()
        total = torch.zeros(s.shape[0], device=device)
        for _ in range(sweeps):
            for g in range(s.shape[1] // m):
                cols = slice(m * g, m * g + m)
                cur, best, gain = mask[:, cols], mask[:, cols].clone(), torch.zeros(s.shape[0], device=device)
                for p in patterns:
                    d = s[:, cols] * (p - cur)
                    delta = -2 * (d * eh[:, cols]).sum(1) + ((d @ h[cols, cols]) * d).sum(1)
                    better = delta < gain
                    gain = torch.where(better, delta, gain)
                    best[better] = p
                eh -= (s[:, cols] * (best - cur)) @ h[cols, :]
                mask[:, cols] = best
                total += gain
        change.append(total)
    greedy = targets.base + torch.cat(change) / targets.energy
    return {"prior_row_error": float(targets.base.mean()), "greedy_row_error": float(greedy.mean()), "sweeps": sweeps}


def run(a: argparse.Namespace) -> Path:
    common = [*(["--model", a.model] if a.model else []), *(["--data-dir", a.data_dir] if a.data_dir else [])]
    data = ["--data-dir", a.data_dir] if a.data_dir else []
    base = ["--preset", "cpu-quick", "--targets", a.targets, "--device", a.device, "--n-docs", str(N_DOCS),
            "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--checkpoint-every", "100", "-q"]
    rows: list[dict] = []
    result: dict = {"targets": a.targets, "steps": a.steps, "scale": a.scale}
    with tempfile.TemporaryDirectory(prefix="maskpro-mask-search-") as tmp:
        tmp = Path(tmp)
        prior_file = None
        if a.eval:
            row = {"variant": "sparsegpt (prior)", "prune_s": timed(
                ["prune", *common, *base, "--method", "sparsegpt", "--out", str(tmp / "sparsegpt")])}
            row["perplexity"] = quick_eval(tmp / "sparsegpt", data, tmp)
            rows.append(row)
        for variant in a.variants:
            loss, lr = variant.split(":")
            wd = tmp / f"wd-{loss}-{lr}"
            wd.mkdir()
            if prior_file is not None:  # the prior is cached by its settings: every variant reuses the first's
                shutil.copy(prior_file, wd / prior_file.name)
            argv = [*base, "--method", "maskpro", "--learn-on", "sparsegpt", "--loss", loss, "--lr", lr,
                    "--scale", str(a.scale), "--steps", str(a.steps),
                    *(["--normalize-adv"] if loss == "row" else [])]
            out = tmp / f"out-{loss}-{lr}"
            row = {"variant": variant, "prune_argv": ["maskpro", "prune", *argv, "--out", "OUT"],
                   "prune_s": timed(["prune", *common, *argv, "--out", str(out), "--workdir", str(wd)])}
            prior_file = prior_file or wd / "prior.safetensors"
            info = read_meta(out).to_dict().get("learner", {})
            row.update({k: info.get(k) for k in ("baseline_loss", "final_loss", "changed_fraction", "ms_per_step",
                                                 "wall_s")})
            if a.eval:
                row["perplexity"] = quick_eval(out, data, tmp)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if a.greedy and prior_file is not None:
            t0 = time.perf_counter()
            result["greedy"] = greedy_ceiling(a.model, a.data_dir, prior_file, a.device)
            result["greedy"]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(result["greedy"]), flush=True)
    path = output_path(a, "mask-search-cpu.json")
    result.update(rows=rows, env=environment())
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def quick_eval(model_dir: Path, data: list[str], tmp: Path) -> dict:
    """``maskpro eval --quick`` of a model folder: its WikiText-2 and C4 perplexities."""
    scores = tmp / f"{model_dir.name}-eval.json"
    timed(["eval", "--model", str(model_dir), *data, "--quick", "-q", "--json", str(scores)])
    return json.loads(scores.read_text())["perplexity"]


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("mask-search"))
