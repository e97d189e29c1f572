"""vLLM checkpoints for a maskpro model: the dense one every vLLM loads, and the folder writing that
the compressed format (:mod:`.sparse24`) shares.

Confirmed by reading the ``compressed_tensors`` quantization code in vLLM's own PyPI wheels (0.7.0 ...
0.33.0) and vllm PRs 12417, 13198, 36799; no vLLM was run here.

* Dense (:func:`write_vllm_checkpoint`): the model's own architecture, zeros stored in place, no
  ``quantization_config``. Loads in every vLLM that supports the architecture, on dense kernels (no
  speed-up). The only format current vLLM (0.19.0 and later; read up to 0.33.0) loads: from 0.22.0 any
  ``sparsity_config`` with targets raises "Sparsity support has been removed from compressed-tensors", and
  a ``"dense"``-format 2:4 ``sparsity_config`` takes the same path, so the dense checkpoint carries none.
* compressed-tensors ``sparse-24-bitmask``: see :mod:`.sparse24` for the vLLM releases that run it.

Both folders keep ``maskpro.json`` and ``masks.safetensors`` for a future N:M plugin and always write
``model.safetensors.index.json``. vLLM loads every ``*.safetensors`` in a local folder unless that index
names the weight files (``DefaultModelLoader._prepare_weights``), so the masks would otherwise be loaded
as weights. config.json gets a small ``"maskpro"`` block, a key vLLM and transformers ignore.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from maskpro.artifacts import MASKS, METADATA, read_metadata, seal
from maskpro.checkpoint import atomic_path, save_json
from maskpro.errors import MaskproError
from maskpro.models import parse_dtype
from maskpro.nm import NM
from maskpro.pattern_check import check_saved

INDEX = "model.safetensors.index.json"
CONFIG_KEY = "maskpro"          # the block in config.json; vLLM and transformers leave unknown keys alone
SHARD_BYTES = 512 * 1024 ** 2  # small shards keep the writers near one copy of the model in memory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_QUANT_KEYS = ("quantization_config", "compression_config")

__all__ = ["write_vllm_checkpoint", "verify_vllm_checkpoint"]


# ------------------------------------------------------------------------------------ dense checkpoint

def write_vllm_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                          max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Dense HF checkpoint (zeros in place) that every current vLLM loads; returns ``out``.

    ``dtype`` ("fp16", "bf16", "fp32") casts the floating-point weights; None keeps the source's. Pruned
    zeros are written as +0.0 (same values; -0.0 breaks the sparse kernels of vLLMs without PR 13198).
    """
    src, out = Path(src), Path(out)
    meta, _ = check_source(src, out)
    cast = parse_dtype(dtype) if dtype is not None else None
    targets = set(meta["targets"])

    def convert(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        if key.removesuffix(".weight") in targets:
            t = positive_zeros(t)
        return {key: t}

    with atomic_path(out) as tmp:
        tmp.mkdir()
        copy_side_files(src, tmp)
        write_weights(read_tensors(src), convert, tmp, max_shard_bytes)
        config = read_config(src)
        if cast is not None:
            _set_dtype(config, cast)
        config[CONFIG_KEY] = config_block(meta, "dense")
        save_json(config, tmp / "config.json")
        export = {"format": "vllm-dense", "dtype": _dtype_name(cast) if cast else "source"}
        seal(tmp, {**meta, "export": export})
        check_saved(tmp)  # the written weights still hold the pattern (a cast never adds non-zeros)
    return out


def verify_vllm_checkpoint(src: str | os.PathLike, out: str | os.PathLike,
                           text_or_ids: str | list[int] | torch.Tensor, *, max_tokens: int = 256) -> dict:
    """Reload ``out`` with plain ``AutoModelForCausalLM`` and compare its logits with ``src`` on real tokens.

    Both models are loaded in ``out``'s dtype, so a correct export gives identical logits.
    """
    from transformers import AutoModelForCausalLM

    src, out = Path(src), Path(out)
    for folder in (src, out):
        require_folder(folder)
    ids = _token_ids(src, text_or_ids, max_tokens)
    dtype = _config_dtype(read_config(out))
    nm, layers = check_saved(out)
    logits = []
    for folder in (src, out):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits.float()[0])
        del model
    a, b = logits
    return {
        "tokens": int(ids.shape[1]),
        "dtype": _dtype_name(dtype),
        "max_abs_diff": float((a - b).abs().max()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "identical": bool(torch.equal(a, b)),
        "pattern": str(nm),
        "layers_checked": layers,
    }


def _token_ids(src: Path, text_or_ids: str | list[int] | torch.Tensor, max_tokens: int) -> torch.Tensor:
    if isinstance(text_or_ids, str):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError):
            raise MaskproError(f"{src} has no tokenizer to encode the text; pass token ids instead") from None
        ids = tok(text_or_ids, return_tensors="pt").input_ids
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise MaskproError("no tokens to compare; pass some text or token ids")
    return ids[:, :max_tokens]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _set_dtype(config: dict, dtype: torch.dtype) -> None:
    name = _dtype_name(dtype)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    if isinstance(config.get("text_config"), dict):
        _set_dtype(config["text_config"], dtype)


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return parse_dtype(name)


# ------------------------------------------------------------------------------- folder reading/writing

def check_source(src: Path, out: Path) -> tuple[dict, NM]:
    """Refuse bad input before anything is written; returns the metadata and the checked pattern."""
    require_folder(src)
    meta = read_metadata(src)
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise MaskproError(f"output {out} would replace the source {src}; pass a new folder as out")
    if out.exists() and not out.is_dir():
        raise MaskproError(f"output {out} exists and is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise MaskproError(f"output {out} exists and is not a maskpro export; pass a new folder or remove it")
    config = read_config(src)
    if any(k in config for k in _QUANT_KEYS):
        raise MaskproError(f"{src}/config.json has a quantization_config; export the unquantized "
                           "maskpro model (the folder written by maskpro prune)")
    try:
        nm, _ = check_saved(src)
    except MaskproError as e:
        raise type(e)(f"not exporting {src}: {e}") from None
    return meta, nm


def require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise MaskproError(f"{folder} is not a folder; pass the folder written by maskpro prune")
    if not (folder / "config.json").is_file():
        raise MaskproError(f"{folder} has no config.json; pass a Hugging Face model folder")


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files: those named by the index, else every one except the masks."""
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if f.name != MASKS)
    if not files or not all(f.is_file() for f in files):
        raise MaskproError(f"{folder} has no complete set of model *.safetensors; save the model again")
    return files


def read_tensors(folder: Path, lazy: bool = False) -> Iterator[tuple[str, object]]:
    """(name, tensor) one at a time from the model files; with ``lazy``, (name, loader) without reading."""
    from safetensors import safe_open

    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if lazy:
                    yield key, (lambda f=f, key=key: _load_one(f, key))
                else:
                    yield key, fh.get_tensor(key)


def _load_one(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def write_weights(tensors: Iterator[tuple[str, torch.Tensor]],
                   convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
                   folder: Path, max_shard_bytes: int) -> None:
    """Convert and write tensors in order, one shard in memory at a time, then the index vLLM filters by."""
    parts: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    weight_map: dict[str, int] = {}
    for key, t in tensors:
        for name, value in convert(key, t).items():
            n = nbytes(value)
            if shard and size + n > max_shard_bytes:
                parts.append(_write_shard(shard, folder, len(parts)))
                shard, size = {}, 0
            shard[name] = value.contiguous()
            weight_map[name] = len(parts)
            size += n
            total += n
    if shard or not parts:
        parts.append(_write_shard(shard, folder, len(parts)))
    names = ["model.safetensors"] if len(parts) == 1 else \
        [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, name in zip(parts, names):
        os.replace(part, folder / name)
    save_json({"metadata": {"total_size": total},
               "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}, folder / INDEX)


def _write_shard(tensors: dict[str, torch.Tensor], folder: Path, number: int) -> Path:
    """One shard under a temporary name; renamed once the number of shards is known."""
    from safetensors.torch import save_file

    path = folder / f".shard-{number:05d}.safetensors.part"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, masks: every top-level file that is not a weight."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in ("config.json", METADATA):
            continue
        if f.name != MASKS and f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)


def config_block(meta: dict, fmt: str) -> dict:
    """What a future N:M plugin needs to find the pattern; the full target list lives in maskpro.json."""
    return {"format": meta.get("format"), "n": meta["n"], "m": meta["m"], "method": meta.get("method"),
            "num_targets": len(meta["targets"]), "metadata_file": METADATA, "masks_file": MASKS,
            "checkpoint": fmt}


def positive_zeros(t: torch.Tensor) -> torch.Tensor:
    """-0.0 -> +0.0 (magnitude masking leaves -0.0 where it zeroes negative weights)."""
    if not t.is_floating_point():
        return t
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
