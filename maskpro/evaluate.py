"""Perplexity on WikiText-2 and C4, the way SparseGPT and Wanda report it.

The text is tokenized once, cut into non-overlapping windows of ``seq_len`` tokens (the tail is dropped),
and perplexity is exp of the mean next-token loss over all windows.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from tqdm.auto import tqdm

from . import data
from .errors import MaskproError

log = logging.getLogger(__name__)

PPL_DATASETS = ("wikitext2", "c4")


def eval_text(name: str, root: str | os.PathLike | None = None, source: str = "local") -> str:
    """The evaluation text of a dataset, from local files or (``source="hf"``) Hugging Face datasets."""
    if source == "hf":
        return load_text_hf(name)
    if name == "wikitext2":
        return data.wikitext2_text(root)
    if name == "c4":
        return data.c4_eval_text(root)
    raise MaskproError(f"unknown perplexity dataset {name!r}; choose from {', '.join(PPL_DATASETS)}")


def load_text_hf(name: str) -> str:
    """The same texts from the Hugging Face hub (needs network and the ``datasets`` package)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise MaskproError("--source hf needs the datasets package: pip install datasets") from None
    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    if name == "c4":
        rows = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")["text"][:1100]
        return " ".join(rows)
    raise MaskproError(f"unknown perplexity dataset {name!r}; choose from {', '.join(PPL_DATASETS)}")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, batch_size: int = 4,
               max_windows: int | None = None, progress: bool = True) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MaskproError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len")
    windows = ids[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc=f"ppl@{seq_len}", disable=not progress, unit="batch"):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
    return math.exp(total / (n * (seq_len - 1)))


def evaluate_perplexity(model, tokenizer, datasets=PPL_DATASETS, root=None, seq_len: int = 2048,
                        batch_size: int = 4, max_windows: int | None = None, source: str = "local",
                        progress: bool = True) -> dict[str, float]:
    out = {}
    for name in datasets:
        out[name] = perplexity(model, tokenizer, eval_text(name, root, source), seq_len, batch_size,
                               max_windows, progress)
        log.info("%s perplexity %.3f", name, out[name])
    return out
