"""Local evaluation and calibration data: WikiText-2, C4, and where to find them.

Files are read from a data directory laid out like the project's ``shared/data`` (``wikitext2/test.txt``,
``c4/*.jsonl``, one folder per zero-shot task). It is found from, in order: the explicit argument, the
``MASKPRO_DATA`` environment variable, ``../shared/data`` next to the current directory or this checkout.
With network access, ``load_text_hf`` can take the same texts from Hugging Face ``datasets`` instead.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .errors import MaskproError

WIKITEXT2 = "wikitext2/test.txt"
C4_GLOB = "c4/*.jsonl"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory to read from; raises a one-line error naming how to provide one."""
    candidates = [Path(path)] if path else []
    if not path:
        if os.environ.get("MASKPRO_DATA"):
            candidates.append(Path(os.environ["MASKPRO_DATA"]))
        here = Path(__file__).resolve().parent.parent
        candidates += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data",
                       here.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    where = candidates[0] if path else "../shared/data"
    raise MaskproError(f"data directory {where} not found; pass --data-dir DIR or set MASKPRO_DATA "
                       "(it holds wikitext2/test.txt, c4/*.jsonl and the zero-shot task folders)")


def data_file(rel: str, root: str | os.PathLike | None = None) -> Path:
    base = data_dir(root)
    hits = sorted(base.glob(rel)) if any(ch in rel for ch in "*?[") else [base / rel]
    if not hits or not hits[0].is_file():
        raise MaskproError(f"data file {base / rel} is missing; put it there or pass --data-dir pointing "
                           "at a folder laid out like shared/data")
    return hits[0]


def wikitext2_text(root: str | os.PathLike | None = None) -> str:
    """The WikiText-2 raw test split as the standard ``"\\n\\n".join(rows)`` evaluation text.

    The local file holds the rows joined by a single newline; the standard 4358 rows are rebuilt as the
    data manifest describes (a non-empty part P is row P+"\\n" and swallows the following empty part).
    """
    parts = data_file(WIKITEXT2, root).read_text(encoding="utf-8").split("\n")
    rows, i = [], 0
    while i < len(parts):
        if parts[i]:
            rows.append(parts[i] + "\n")
            i += 2
        else:
            rows.append("")
            i += 1
    return "\n\n".join(rows)


def c4_documents(root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> list[str]:
    f = Path(path) if path else data_file(C4_GLOB, root)
    if not f.is_file():
        raise MaskproError(f"calibration file {f} is missing; pass an existing C4-style .jsonl with a 'text' field")
    with f.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


C4_HELDOUT = 256  # the last documents of the local C4 file are never used for calibration or learning


def c4_documents_split(root: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
                       split: str = "train") -> list[str]:
    """Calibration ("train") or held-out ("eval") part of the local C4 file (its last C4_HELDOUT docs)."""
    docs = c4_documents(root, path)
    if len(docs) <= 2 * C4_HELDOUT:
        return docs  # a small user file: no split possible, use it whole
    return docs[:-C4_HELDOUT] if split == "train" else docs[-C4_HELDOUT:]


def c4_eval_text(root: str | os.PathLike | None = None) -> str:
    """Held-out C4 text for perplexity (the last documents of the local file), joined by blank lines."""
    return "\n\n".join(c4_documents_split(root, split="eval"))


def calibration_windows(tokenizer, n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                        root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> torch.Tensor:
    """SparseGPT/Wanda-style calibration: random ``seq_len`` windows of random C4 documents longer than it.

    Returns a (n_samples, seq_len) LongTensor. Documents shorter than the window are skipped, as the
    reference implementations do; when too few are long enough, windows are cut from the concatenated
    documents instead.
    """
    docs = c4_documents_split(root, path)
    rng = random.Random(seed)
    out = []
    tries = 0
    while len(out) < n_samples and tries < 20 * n_samples:
        tries += 1
        ids = tokenizer(docs[rng.randrange(len(docs))], return_tensors="pt").input_ids[0]
        if ids.numel() > seq_len:
            start = rng.randrange(ids.numel() - seq_len)
            out.append(ids[start:start + seq_len])
    if len(out) < n_samples:  # too few long documents: cut windows from the concatenated stream
        stream = torch.cat([tokenizer(d, return_tensors="pt").input_ids[0] for d in docs])
        if stream.numel() <= seq_len:
            raise MaskproError(f"calibration data has only {stream.numel()} tokens; need more than {seq_len}")
        while len(out) < n_samples:
            start = rng.randrange(stream.numel() - seq_len)
            out.append(stream[start:start + seq_len])
    return torch.stack(out)


def learning_batches(tokenizer, n_docs: int = 512, seq_len: int = 128,
                     root: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
                     windows_per_doc: int = 1, seed: int = 0) -> torch.Tensor:
    """MaskPro's training set: the first ``n_docs`` C4 documents longer than ``seq_len`` tokens, truncated.

    ``windows_per_doc=1`` is the official recipe. Larger values cut up to that many consecutive
    ``seq_len`` windows from each document (rows shuffled with ``seed``), so a long run sees more text
    instead of cycling over 512 short rows; ``n_docs=0`` takes every calibration document.
    Returns (rows, seq_len); the learner walks it in fixed minibatches so every minibatch's loss under
    the initial mask can be computed once and reused.
    """
    if windows_per_doc < 1:
        raise MaskproError(f"--windows-per-doc must be at least 1, got {windows_per_doc}")
    rows, used = [], 0
    for doc in c4_documents_split(root, path):
        ids = tokenizer(doc, return_tensors="pt").input_ids[0]
        if ids.numel() > seq_len:
            k = min(windows_per_doc, ids.numel() // seq_len)
            rows += [ids[i * seq_len:(i + 1) * seq_len] for i in range(k)]
            used += 1
            if used == n_docs:
                break
    if used < n_docs:
        raise MaskproError(f"only {used} calibration documents are longer than {seq_len} tokens, "
                           f"{n_docs} asked; lower --n-docs or --seq-len, or pass a bigger file")
    if not rows:
        raise MaskproError(f"no calibration document is longer than {seq_len} tokens; lower --seq-len")
    out = torch.stack(rows)
    if windows_per_doc > 1:
        out = out[torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))]
    return out
