"""vLLM checkpoints for a maskpro model, and which vLLM release loads which.

Confirmed by reading the ``compressed_tensors`` quantization code in vLLM's own PyPI wheels (0.7.0 ...
0.33.0) and vllm PRs 12417, 13198, 36799; no vLLM was run here. "2:4 kernels" are CUTLASS sparse GEMMs,
which need compute capability 9.0 (Hopper) and a CUDA >= 12.2 build.

* Dense (:func:`write_vllm_checkpoint`): the model's own architecture, zeros stored in place, no
  ``quantization_config``. Loads in every vLLM that supports the architecture, on dense kernels (no
  speed-up). The only format current vLLM (0.19.0 and later; read up to 0.33.0) loads.
* compressed-tensors ``sparse-24-bitmask`` (:func:`write_sparse24_bitmask`), 2:4, unquantized: runs on
  the 2:4 kernels in vLLM 0.7.3 through 0.18.1 (read in 0.7.3, 0.8.0, 0.9.2, 0.10.2, each x.0 from
  0.11.0 to 0.18.0, and 0.18.1).
  0.7.0 lacks the format and 0.7.2 sends unquantized 2:4 layers to the dense path (PR 12417), which has no
  parameters for the bitmask tensors. PR 36799 (March 2026) turned ``CompressedTensors24`` into a
  stub raising "Sparse24 models are no longer supported by vLLM": first release 0.19.0. From 0.22.0 any
  ``sparsity_config`` with targets raises "Sparsity support has been removed from compressed-tensors"
  (read in 0.22.0, 0.24.0, 0.33.0). A ``"dense"``-format 2:4 ``sparsity_config`` takes the same path, so
  the dense checkpoint carries none. transformers does not decompress a ``sparse-24-bitmask`` folder
  (tried: 5.23 with compressed-tensors 0.20.0). The target weights load as random init and only a load
  report says so, so use the dense checkpoint with transformers.
* compressed-tensors ships ``Sparse24BitMaskCompressor`` up to 0.14.0.1, which requires
  ``transformers<5``; 0.15.0 removed it. 0.20.0 keeps ``Sparse24BitMaskConfig``, the format name and
  ``pack_bitmasks``/``unpack_bitmasks``. This module writes the tensors with those (the same bytes
  0.14.0.1's compressor writes). :func:`verify_sparse24_bitmask` decompresses with that compressor when
  it is importable, else with ``unpack_bitmasks``.

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
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

from maskpro.artifacts import MASKS, METADATA, check_saved, read_metadata, seal
from maskpro.checkpoint import atomic_path, load_tensors, save_json
from maskpro.errors import MaskproError
from maskpro.models import parse_dtype
from maskpro.nm import NM, topn_mask, unpack_mask

INDEX = "model.safetensors.index.json"
SPARSE24 = "sparse-24-bitmask"
QUANT_METHOD = "compressed-tensors"  # the quant_method vLLM and transformers dispatch on
CONFIG_KEY = "maskpro"          # the block in config.json; vLLM and transformers leave unknown keys alone
SHARD_BYTES = 512 * 1024 ** 2  # small shards keep the writers near one copy of the model in memory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_QUANT_KEYS = ("quantization_config", "compression_config")

__all__ = ["write_vllm_checkpoint", "write_sparse24_bitmask", "verify_vllm_checkpoint",
           "verify_sparse24_bitmask"]


# ---------------------------------------------------------------------------------------------- writers

def write_vllm_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                          max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Dense HF checkpoint (zeros in place) that every current vLLM loads; returns ``out``.

    ``dtype`` ("fp16", "bf16", "fp32") casts the floating-point weights; None keeps the source's. Pruned
    zeros are written as +0.0 (same values; sparse kernels once broke on -0.0, vllm PR 13198).
    """
    src, out = Path(src), Path(out)
    meta, _ = _check_source(src, out)
    cast = parse_dtype(dtype) if dtype is not None else None
    targets = set(meta["targets"])

    def convert(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        if key.removesuffix(".weight") in targets:
            t = _positive_zeros(t)
        return {key: t}

    with atomic_path(out) as tmp:
        tmp.mkdir()
        _copy_side_files(src, tmp)
        _write_weights(_read_tensors(src), convert, tmp, max_shard_bytes)
        config = _read_config(src)
        if cast is not None:
            _set_dtype(config, cast)
        config[CONFIG_KEY] = _config_block(meta, "dense")
        save_json(config, tmp / "config.json")
        export = {"format": "vllm-dense", "dtype": _dtype_name(cast) if cast else "source"}
        seal(tmp, {**meta, "export": export})
        check_saved(tmp)  # the written weights still hold the pattern (a cast never adds non-zeros)
    return out


def write_sparse24_bitmask(src: str | os.PathLike, out: str | os.PathLike, *,
                           max_shard_bytes: int = SHARD_BYTES) -> Path:
    """compressed-tensors ``sparse-24-bitmask`` checkpoint (vLLM 0.7.3-0.18.1, llm-compressor); returns ``out``.

    Each target weight ``W`` (rows x cols) becomes ``<layer>.compressed`` (rows x cols/2, the kept values in
    row order), ``<layer>.bitmask`` (uint8, rows x ceil(cols/8), little-endian bits, 1 = kept) and
    ``<layer>.shape`` (int64, 2x1); every other tensor is copied unchanged.
    """
    ct = _compressed_tensors()
    src, out = Path(src), Path(out)
    meta, nm = _check_source(src, out)
    if (nm.n, nm.m) != (2, 4):
        raise MaskproError(f"{src} is {nm} sparse; sparse-24-bitmask stores only 2:4, "
                           "use write_vllm_checkpoint for other patterns")
    targets = set(meta["targets"])
    linears = _linear_names(src)
    packed_masks, _ = load_tensors(src / MASKS) if (src / MASKS).is_file() else ({}, {})
    zeros = total = 0

    def convert(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal zeros, total
        if t.is_floating_point():
            zeros += int((t == 0).sum())
            total += t.numel()
        name = key.removesuffix(".weight")
        if name not in targets or not key.endswith(".weight"):
            return {key: t}
        stored = unpack_mask(packed_masks[name], tuple(t.shape)) if name in packed_masks else None
        return _compress_24(name, t, stored, ct)

    with atomic_path(out) as tmp:
        tmp.mkdir()
        _copy_side_files(src, tmp)
        _write_weights(_read_tensors(src), convert, tmp, max_shard_bytes)
        config = _read_config(src)
        sparsity = _sparsity_config(ct, linears, targets, zeros / max(total, 1))
        config[ct.quant_key] = {
            ct.version_key: ct.version,
            ct.method_key: QUANT_METHOD,
            ct.sparsity_key: sparsity.model_dump(),
        }
        config[CONFIG_KEY] = _config_block(meta, SPARSE24)
        save_json(config, tmp / "config.json")
        seal(tmp, {**meta, "export": {"format": SPARSE24}})
    return out


# ------------------------------------------------------------------------------------------- verifiers

def verify_vllm_checkpoint(src: str | os.PathLike, out: str | os.PathLike,
                           text_or_ids: str | list[int] | torch.Tensor, *, max_tokens: int = 256) -> dict:
    """Reload ``out`` with plain ``AutoModelForCausalLM`` and compare its logits with ``src`` on real tokens.

    Both models are loaded in ``out``'s dtype, so a correct export gives identical logits.
    """
    from transformers import AutoModelForCausalLM

    src, out = Path(src), Path(out)
    for folder in (src, out):
        _require_folder(folder)
    ids = _token_ids(src, text_or_ids, max_tokens)
    dtype = _config_dtype(_read_config(out))
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


def verify_sparse24_bitmask(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Decompress every target of ``out`` with compressed-tensors and compare it bit for bit with ``src``.

    Pruned zeros are compared as +0.0 (the format cannot store the sign of a dropped zero); their count in
    the source is reported as ``negative_zeros``. Non-target tensors must be copied bit-exactly.
    """
    ct = _compressed_tensors()
    src, out = Path(src), Path(out)
    _require_folder(src)
    _require_folder(out)
    meta = read_metadata(src)
    qcfg = _read_config(out).get(ct.quant_key) or {}
    scfg = qcfg.get(ct.sparsity_key) or {}
    if scfg.get("format") != SPARSE24:
        raise MaskproError(f"{out}/config.json has no {SPARSE24} sparsity_config; "
                           "write it with write_sparse24_bitmask first")
    config = ct.SparsityCompressionConfig.load_from_registry(SPARSE24, **scfg)
    decompress, decompressor = _decompressor(ct, config)
    targets = set(meta["targets"])
    produced = dict(_read_tensors(out, lazy=True))
    report = {"decompressor": decompressor, "targets": len(targets), "bit_exact": 0, "mismatched": [],
              "negative_zeros": 0, "other_tensors": 0, "other_mismatched": [], "compressed_bytes": 0,
              "dense_bytes": 0, "missing": []}
    for key, t in _read_tensors(src):
        name = key.removesuffix(".weight")
        if name in targets and key.endswith(".weight"):
            parts = {p: produced.get(f"{name}.{p}") for p in ("compressed", "bitmask", "shape")}
            if any(v is None for v in parts.values()):
                report["missing"].append(name)
                continue
            parts = {p: get() for p, get in parts.items()}
            dense = decompress(parts)
            report["negative_zeros"] += int(((t == 0) & torch.signbit(t)).sum()) if t.is_floating_point() else 0
            if _same_bits(dense, _positive_zeros(t)):
                report["bit_exact"] += 1
            else:
                report["mismatched"].append(name)
            report["compressed_bytes"] += sum(_nbytes(v) for v in parts.values())
            report["dense_bytes"] += _nbytes(t)
        else:
            report["other_tensors"] += 1
            got = produced.get(key)
            if got is None or not _same_bits(got(), t):
                report["other_mismatched"].append(key)
    report["ratio"] = report["compressed_bytes"] / max(report["dense_bytes"], 1)
    report["ok"] = (report["bit_exact"] == len(targets) and not report["mismatched"]
                    and not report["missing"] and not report["other_mismatched"])
    return report


# ------------------------------------------------------------------------------------------- internals

def _check_source(src: Path, out: Path) -> tuple[dict, NM]:
    """Refuse bad input before anything is written; returns the metadata and the checked pattern."""
    _require_folder(src)
    meta = read_metadata(src)
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise MaskproError(f"output {out} would replace the source {src}; pass a new folder as out")
    if out.exists() and not out.is_dir():
        raise MaskproError(f"output {out} exists and is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise MaskproError(f"output {out} exists and is not a maskpro export; pass a new folder or remove it")
    config = _read_config(src)
    if any(k in config for k in _QUANT_KEYS):
        raise MaskproError(f"{src}/config.json has a quantization_config; export the unquantized "
                           "maskpro model (the folder written by maskpro prune)")
    try:
        nm, _ = check_saved(src)
    except MaskproError as e:
        raise type(e)(f"not exporting {src}: {e}") from None
    return meta, nm


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise MaskproError(f"{folder} is not a folder; pass the folder written by maskpro prune")
    if not (folder / "config.json").is_file():
        raise MaskproError(f"{folder} has no config.json; pass a Hugging Face model folder")


def _read_config(folder: Path) -> dict:
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


def _read_tensors(folder: Path, lazy: bool = False) -> Iterator[tuple[str, object]]:
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


def _write_weights(tensors: Iterator[tuple[str, torch.Tensor]],
                   convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
                   folder: Path, max_shard_bytes: int) -> None:
    """Convert and write tensors in order, one shard in memory at a time, then the index vLLM filters by."""
    parts: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    weight_map: dict[str, int] = {}
    for key, t in tensors:
        for name, value in convert(key, t).items():
            n = _nbytes(value)
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


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, masks: every top-level file that is not a weight."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in ("config.json", METADATA):
            continue
        if f.name != MASKS and f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)


def _config_block(meta: dict, fmt: str) -> dict:
    """What a future N:M plugin needs to find the pattern; the full target list lives in maskpro.json."""
    return {"format": meta.get("format"), "n": meta["n"], "m": meta["m"], "method": meta.get("method"),
            "num_targets": len(meta["targets"]), "metadata_file": METADATA, "masks_file": MASKS,
            "checkpoint": fmt}


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


def _positive_zeros(t: torch.Tensor) -> torch.Tensor:
    """-0.0 -> +0.0 (magnitude masking leaves -0.0 where it zeroes negative weights)."""
    if not t.is_floating_point():
        return t
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _compress_24(name: str, w: torch.Tensor, stored: torch.Tensor | None, ct) -> dict[str, torch.Tensor]:
    """One weight -> (compressed, bitmask, shape): keep every non-zero, fill to exactly 2 of 4 from the mask."""
    if w.dim() != 2:
        raise MaskproError(f"layer {name} has a {w.dim()}-D weight; sparse-24-bitmask needs 2-D linear weights")
    score = (w != 0).to(torch.int8) * 2
    if stored is not None:
        score = score + stored.to(torch.int8)
    keep = topn_mask(score, NM(2, 4), name)
    rows, cols = w.shape
    return {
        f"{name}.shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        f"{name}.compressed": _positive_zeros(w[keep]).reshape(rows, cols // 2),
        f"{name}.bitmask": ct.pack_bitmasks(keep.cpu()),
    }


def _sparsity_config(ct, linears: list[str], targets: set[str], global_sparsity: float):
    """The sparsity_config llm-compressor writes: targets ["Linear"] plus ignored layer names, or names."""
    others = [n for n in linears if n not in targets]
    if len(targets) >= len(others):
        chosen, ignore = ["Linear"], others
    else:
        chosen, ignore = sorted(targets), []
    return ct.SparsityCompressionConfig.load_from_registry(
        SPARSE24, targets=chosen, ignore=ignore, global_sparsity=global_sparsity,
        sparsity_structure=ct.SparsityStructure.TWO_FOUR.value)


def _linear_names(src: Path) -> list[str]:
    """Every nn.Linear of the architecture, from a weightless (meta-device) instance; targets must be among them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise MaskproError(f"cannot build the model in {src} to list its linear layers "
                           f"({str(e).splitlines()[0]}); use write_vllm_checkpoint") from None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = set(read_metadata(src)["targets"]) - set(names)
    if missing:
        raise MaskproError(f"target {sorted(missing)[0]} is not an nn.Linear of the model in {src}; "
                           "sparse-24-bitmask covers linear layers only")
    return names


def _decompressor(ct, config) -> tuple[Callable[[dict], torch.Tensor], str]:
    """compressed-tensors' own Sparse24BitMaskCompressor where installed (<= 0.14), else its unpack helper."""
    try:
        from compressed_tensors.compressors import Sparse24BitMaskCompressor  # removed in 0.15.0
    except ImportError:
        def decompress(parts: dict) -> torch.Tensor:
            shape = [int(x) for x in parts["shape"].flatten().tolist()]
            keep = ct.unpack_bitmasks(parts["bitmask"], shape)
            dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
            dense[keep] = parts["compressed"].flatten()
            return dense
        return decompress, f"compressed-tensors {ct.version} unpack_bitmasks"
    compressor = Sparse24BitMaskCompressor(config=config)
    return compressor.decompress_weight, f"compressed-tensors {ct.version} Sparse24BitMaskCompressor"


def _compressed_tensors() -> SimpleNamespace:
    """The compressed-tensors names this module uses (imported late: the package takes seconds to load)."""
    try:
        import compressed_tensors
        from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME,
                                             QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME)
        from compressed_tensors.config import SparsityCompressionConfig, SparsityStructure
        from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    except ImportError:
        raise MaskproError("the sparse-24-bitmask export needs compressed-tensors; "
                           "run: pip install compressed-tensors==0.20.0") from None
    return SimpleNamespace(version=compressed_tensors.__version__, quant_key=QUANTIZATION_CONFIG_NAME,
                           sparsity_key=SPARSITY_CONFIG_NAME, version_key=COMPRESSION_VERSION_NAME,
                           method_key=QUANTIZATION_METHOD_NAME,
                           SparsityCompressionConfig=SparsityCompressionConfig,
                           SparsityStructure=SparsityStructure, pack_bitmasks=pack_bitmasks,
                           unpack_bitmasks=unpack_bitmasks)


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
