"""The saved result of pruning: a plain Hugging Face model folder plus maskpro's masks and metadata.

Layout of ``out_dir``:
  config.json, model.safetensors, tokenizer files   masked weights; ``AutoModelForCausalLM.from_pretrained``
  maskpro.json                                      N, M, method, target layers, data, steps, source model
  masks.safetensors                                 one packed bitmask (uint8) per target layer
  maskpro.json's "files"                            size and sha256 of every other file, checked on read

The folder is built in a temporary directory and renamed into place, so an interrupted save never leaves
a half-written model where a good one was.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import torch

from . import __version__
from .checkpoint import atomic_path, load_tensors, save_json, save_tensors
from .errors import MaskproError
from .integrity import check_safetensors, verify_files
from .nm import NM, pack_mask, unpack_mask
from .schema import FORMAT, METADATA, SavedMeta, read_meta, write_meta

MASKS = "masks.safetensors"


def save_pruned(model, tokenizer, out_dir: str | os.PathLike, masks: dict[str, torch.Tensor], nm: NM,
                method: str, info: dict | None = None) -> Path:
    """Save masked model + tokenizer + packed masks + metadata atomically; returns the folder."""
    out_dir = Path(out_dir)
    packed, shapes = {}, {}
    for name, mask in masks.items():
        packed[name], shapes[name] = pack_mask(mask.cpu())
    meta = {
        "format": FORMAT,
        "n": nm.n, "m": nm.m,
        "method": method,
        "targets": list(masks),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "source_model": getattr(model.config, "_name_or_path", None),
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "maskpro_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(info or {}),
    }
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_tensors(packed, tmp / MASKS, {"shapes": meta["shapes"]})
        _write_weight_index(tmp)
        seal(tmp, meta)
    return out_dir


def seal(folder: Path, meta: SavedMeta | dict) -> None:
    """Write the folder's metadata with the size and sha256 of every other file (:func:`maskpro.schema.write_meta`):
    the last write of any folder maskpro makes, so the record covers everything in it."""
    write_meta(folder, meta)


def _write_weight_index(folder: Path) -> None:
    """List the weight files in ``model.safetensors.index.json`` when transformers wrote a single file.

    vLLM loads every ``*.safetensors`` of a folder that has no index, and would take ``masks.safetensors``
    for weights; the index tells it (and any loader) which files hold the model.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists() or not single.is_file():
        return
    with safe_open(str(single), framework="pt") as fh:
        keys = list(fh.keys())
    save_json({"metadata": {"total_size": single.stat().st_size}, "weight_map": {k: single.name for k in keys}},
              index)


def read_metadata(folder: str | os.PathLike) -> dict:
    """The folder's metadata as its JSON dict (through :func:`maskpro.schema.read_meta`, which checks it)."""
    return read_meta(folder).to_dict()


def load_masks(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The boolean masks (True = kept) saved with a pruned model."""
    meta = read_meta(folder)
    path = Path(folder) / MASKS
    if not path.is_file():
        raise MaskproError(f"{path} is missing; the maskpro output in {folder} is incomplete, prune again")
    if meta.files and MASKS in meta.files:
        verify_files(folder, {MASKS: meta.files[MASKS]}, METADATA)
    check_safetensors(path)
    packed, _ = load_tensors(path)
    return {name: unpack_mask(packed[name], tuple(meta.shapes[name])) for name in meta.targets}

