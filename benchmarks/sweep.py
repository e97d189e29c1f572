"""MaskPro hyper-parameter sweep from one SparseGPT prior: WikiText-2 perplexity after each setting.

  python -m benchmarks.sweep --configs "dense:10:50:2000" "sparsegpt:10:50:2000"

Each config is ``learn_on:scale:lr:steps[:seq_len[:batch]]``. SparseGPT runs once; every config starts from
its mask (on the dense or on SparseGPT's compensated weights). Results go to benchmarks/results/sweep-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .env import RESULTS, environment, merge_json
from maskpro import data
from maskpro.evaluate import evaluate_perplexity
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, load_model
from maskpro.nm import NM
from maskpro.oneshot import calibrated_prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--recon", action="store_true", help="also OBS re-fit the kept weights after each config")
    p.add_argument("--lr-schedule", default="linear")
    p.add_argument("--tag", default="smollm2-2of4")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nm = NM(2, 4)
    model, tok = load_model(a.model, a.dtype, device)
    layers = find_linears(model)
    dense = {n: m.weight.data.clone() for n, m in layers.items()}
    calib = data.calibration_windows(tok, a.calib_samples, 2048, 0, a.data_dir)
    t0 = time.perf_counter()
    sg = calibrated_prune(model, calib, nm, "sparsegpt", keep_decided=True)
    sg_s = time.perf_counter() - t0
    env = environment()
    out = RESULTS / f"sweep-{a.tag}.json"
    rows = {"sparsegpt": {"prune_s": sg_s, **evaluate_perplexity(model, tok, ["wikitext2"], a.data_dir)}}
    merge_json(out, {"device": env["device"], "env": env, "rows": rows})
    print(json.dumps(rows), flush=True)
    for spec in a.configs:
        parts = spec.split(":")
        learn_on, scale, lr, steps = parts[0], float(parts[1]), float(parts[2]), int(parts[3])
        seq_len = int(parts[4]) if len(parts) > 4 else 128
        bs = int(parts[5]) if len(parts) > 5 else 32
        src = dense if learn_on == "dense" else {n: sg.decided[n].to(device) for n in layers}
        for n, m in layers.items():
            m.weight.data = src[n].clone()
        batches = data.learning_batches(tok, 512, seq_len, a.data_dir)
        cfg = LearnerConfig(steps=steps, lr=lr, scale=scale, batch_size=bs, checkpoint_every=10**9, log_every=500,
                            lr_schedule=a.lr_schedule)
        learner = MaskProLearner(model, layers, sg.masks, batches, cfg, weights=src, progress=False)
        res = learner.run(resume=False)
        learner.finish(res.masks)
        changed = sum(int((res.masks[n] != sg.masks[n]).sum()) for n in layers) / sum(
            v.numel() for v in res.masks.values())
        row = {"learn_on": learn_on, "scale": scale, "lr": lr, "lr_schedule": a.lr_schedule, "steps": steps, "seq_len": seq_len, "batch": bs,
               "wall_s": res.wall_s, "ms_per_step": res.ms_per_step, "changed_fraction": changed,
               "residual_last500": sum(res.residuals[-500:]) / len(res.residuals[-500:]),
               **evaluate_perplexity(model, tok, ["wikitext2"], a.data_dir, progress=False)}
        if a.recon:
            for n, m in layers.items():
                m.weight.data = dense[n].clone()
            calibrated_prune(model, calib, nm, "sparsegpt", fixed_masks=res.masks, progress=False)
            row["recon_wikitext2"] = evaluate_perplexity(model, tok, ["wikitext2"], a.data_dir,
                                                         progress=False)["wikitext2"]
        merge_json(out, {"rows": {spec: row}})
        print(json.dumps({spec: row}), flush=True)


if __name__ == "__main__":
    main()
