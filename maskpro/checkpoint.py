"""Atomic file writes: a crash or kill never leaves a half-written checkpoint or result behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import MaskproError
from .integrity import check_safetensors

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` in one rename (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def save_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict | None = None) -> None:
    """safetensors with JSON metadata in its header, written atomically (one file = one consistent state)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"maskpro": json.dumps(meta or {})})


def read_tensor_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata :func:`save_tensors` wrote, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("maskpro", "{}"))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path)), read_tensor_meta(path)


def load_cached(path: str | os.PathLike | None, key: dict, redo: str = "computing it again"
                ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of a work-directory cache that :func:`save_tensors` wrote with ``{"key": key, ...}``
    metadata, or None when it is absent, was written for another key, or is damaged (each said in one log line,
    ending with ``redo``)."""
    if path is None or not Path(path).is_file():
        return None
    name = Path(path).name
    try:
        check_safetensors(path)
        if read_tensor_meta(path).get("key") != key:
            log.info("%s was made with other settings; %s", name, redo)
            return None
        return load_tensors(path)
    except MaskproError as e:
        log.warning("%s; %s", e, redo)
        return None


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short sha256 of the tensors' bytes: what a checkpoint records of the masks and data it was made for."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
