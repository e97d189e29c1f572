"""A stand-in model at a real model's shapes with random weights, saved as a folder servers load.

  maskpro-bench random-model --config llama2-7b --tokenizer DIR --out /tmp/llama2-7b-2of4
  maskpro-bench random-model --config llama2-7b --tokenizer DIR --out /tmp/llama2-7b-dense --dense

Serving speed, memory and soak runs need no trained weights: random weights at Llama-2-7B's shapes cost what
Llama-2-7B costs. The weights are pruned 2:4 by magnitude and saved as a maskpro folder (masks, metadata,
file hashes: what ``maskpro-serve`` and ``maskpro-export`` read), or saved dense with ``--dense`` (the
baseline for ``vllm serve``). The vocabulary is the tokenizer's, so every id it produces is valid. Built on
the GPU when there is one (seconds), in fp16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maskpro.errors import MaskproError

from .configs import resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="llama2-7b", help="model shapes (a name of maskpro-bench's configs, "
                                                         "NAME:LAYERS, or a config.json)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (its vocabulary sets the model's)")
    p.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--dense", action="store_true", help="save dense, unpruned weights")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(a: argparse.Namespace) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskpro.artifacts import save_pruned
    from maskpro.checkpoint import atomic_path
    from maskpro.models import parse_dtype
    from maskpro.nm import NM
    from maskpro.oneshot import magnitude_prune

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise MaskproError(f"{out} exists; pick another --out or pass --overwrite")
    if not (Path(a.tokenizer) / "tokenizer_config.json").is_file():
        raise MaskproError(f"{a.tokenizer} has no tokenizer_config.json; --tokenizer takes a tokenizer folder "
                           "(any HF model folder has one)")
    shape = resolve(a.config)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    config = shape.llama_config()
    config.vocab_size = len(tok)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tok, key, None))
    dtype = parse_dtype(a.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    print(f"built {shape.name} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"vocabulary {config.vocab_size}) on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    if a.dense:  # like save_pruned, replace --out in one rename: a failed save leaves the old folder whole
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    else:
        masks = magnitude_prune(model, NM(2, 4)).masks
        save_pruned(model, tok, out, masks, NM(2, 4), "magnitude", {"random_weights": shape.name})
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    print(json.dumps({"out": str(out), "config": shape.name, "dense": a.dense, "vocab_size": config.vocab_size}))
    return out


if __name__ == "__main__":
    import sys

    from .cli import main_for

    sys.exit(main_for("random-model"))
