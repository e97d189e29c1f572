"""Training text written by the dense model itself, for distilling it into the pruned one.

The local C4 file holds about 1000 documents; a fine-tune that cycles over them many times fits that text,
not the teacher. Text sampled from the teacher (each row starts from the first few tokens of a calibration
row, then the teacher's own next-token distribution at temperature 1, no top-k or top-p) follows the
distribution the student is asked to match, costs only generation time, and is unlimited (the data-free
distillation of LLM-QAT, arXiv 2305.17888). Rows are generated in chunks and the cache in the work
directory is rewritten atomically after each, so a killed job keeps what it made.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_cached, save_tensors
from .errors import MaskproError
from .models import cache_kwarg

log = logging.getLogger(__name__)

CACHE = "selfgen.safetensors"


@torch.no_grad()
def sample_rows(model, prompts: torch.Tensor, seq_len: int, seed: int) -> torch.Tensor:
    """Continue each prompt row to ``seq_len`` tokens by sampling from ``model`` (KV cache, temperature 1).

    End-of-text tokens are kept as sampled and generation goes on after them, as in a packed corpus.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = prompts.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = {cache_kwarg(model): DynamicCache()}  # filled in place, step after step
    out = model(ids, use_cache=True, **cache)
    rows = [ids]
    for _ in range(seq_len - ids.shape[1]):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        rows.append(nxt)
        out = model(nxt, use_cache=True, **cache)
    return torch.cat(rows, dim=1).cpu()


def self_generated_rows(model, starts: torch.Tensor, n_rows: int, seq_len: int, prefix: int = 4, seed: int = 0,
                        batch: int | None = None, workdir: str | Path | None = None, key: dict | None = None,
                        progress: bool = True) -> torch.Tensor:
    """``n_rows`` rows of ``seq_len`` tokens sampled from ``model``, prompted by ``prefix`` tokens of ``starts``.

    ``starts`` (rows of real text, at least ``prefix`` tokens long) are cycled through. With ``workdir``
    the rows are cached there under ``key`` and a rerun continues from the rows already made. ``batch`` rows
    are sampled together (default 256 on a GPU, where a small model's decode step costs the same for 64 or
    256 rows, and 64 on CPU); each batch's noise is keyed by its first row, so ``batch`` is part of the key.
    """
    if n_rows < 1 or not 0 < prefix < seq_len:
        raise MaskproError(f"self-generated text needs rows >= 1 and 0 < prefix < seq-len, got {n_rows} rows, "
                           f"prefix {prefix}, seq-len {seq_len}")
    if starts.shape[0] < 1 or starts.shape[1] < prefix:
        raise MaskproError(f"self-generated text needs prompt rows of at least {prefix} tokens")
    batch = batch or (256 if next(model.parameters()).is_cuda else 64)
    key = {**(key or {}), "seq_len": seq_len, "prefix": prefix, "seed": seed}
    if batch != 64:  # the CPU default is left out, so caches made before the option still match
        key["batch"] = batch
    path = Path(workdir) / CACHE if workdir else None
    made = _load(path, key)
    done = made.shape[0] if made is not None else 0
    parts = [made[:n_rows]] if made is not None else []
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_rows, initial=min(done, n_rows), desc="self-generated text", unit="row",
               disable=not progress)
    try:
        while done < n_rows:
            k = min(batch, n_rows - done)
            idx = torch.arange(done, done + k) % starts.shape[0]
            parts.append(sample_rows(model, starts[idx, :prefix], seq_len, seed * 1_000_003 + done))
            done += k
            if path is not None:
                save_tensors({"rows": torch.cat(parts)}, path, {"key": key})
            bar.update(k)
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(parts)[:n_rows]


def _load(path: Path | None, key: dict) -> torch.Tensor | None:
    hit = load_cached(path, key, "generating again")
    if hit is None:
        return None
    rows = hit[0]["rows"]
    log.info("self-generated text: %d rows made by an earlier run, in %s", rows.shape[0], path)
    return rows
