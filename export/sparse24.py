"""The compressed-tensors ``sparse-24-bitmask`` checkpoint of a 2:4 maskpro model, and which vLLM runs it.

Confirmed by reading the ``compressed_tensors`` quantization code in vLLM's own PyPI wheels (0.7.0 ...
0.33.0) and vllm PRs 12417, 13198, 36799; no vLLM was run here. "2:4 kernels" are CUTLASS sparse GEMMs,
which need compute capability 9.0 (Hopper) and a CUDA >= 12.2 build.

* ``sparse-24-bitmask`` (:func:`write_sparse24_bitmask`), 2:4, unquantized: runs on the 2:4 kernels in
  vLLM 0.7.3 through 0.18.1 (read in 0.7.3, 0.8.0, 0.9.2, 0.10.2, each x.0 from 0.11.0 to 0.18.0, and
  0.18.1).
  0.7.0 lacks the format and 0.7.2 sends unquantized 2:4 layers to the dense path (PR 12417), which has no
  parameters for the bitmask tensors. PR 36799 turned ``CompressedTensors24`` into a stub raising
  "Sparse24 models are no longer supported by vLLM": first release 0.19.0. From 0.22.0 any
  ``sparsity_config`` with targets raises "Sparsity support has been removed from compressed-tensors"
  (read in 0.22.0, 0.24.0, 0.33.0); newer vLLM loads the dense checkpoint of :mod:`.vllm`.
  transformers does not decompress a ``sparse-24-bitmask`` folder (5.23 with compressed-tensors 0.20.0
  loads the target weights as random init, and only a load report says so), so use the dense checkpoint
  with transformers.
* compressed-tensors ships ``Sparse24BitMaskCompressor`` up to 0.14.0.1, which requires
  ``transformers<5``; 0.15.0 removed it. 0.20.0 keeps ``Sparse24BitMaskConfig``, the format name and
  ``pack_bitmasks``/``unpack_bitmasks``. This module writes the tensors with those (the same bytes
  0.14.0.1's compressor writes). :func:`verify_sparse24_bitmask` decompresses with that compressor when
  it is importable, else with ``unpack_bitmasks``.

The folder is written with the same reader, shard writer and side files as the dense checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from maskpro.artifacts import MASKS, read_metadata, seal
from maskpro.checkpoint import atomic_path, load_tensors, save_json
from maskpro.errors import MaskproError
from maskpro.nm import NM, topn_mask, unpack_mask

from .vllm import (CONFIG_KEY, SHARD_BYTES, check_source, config_block, copy_side_files, nbytes, positive_zeros,
                   read_config, read_tensors, require_folder, write_weights)

SPARSE24 = "sparse-24-bitmask"
QUANT_METHOD = "compressed-tensors"  # the quant_method vLLM and transformers dispatch on

__all__ = ["write_sparse24_bitmask", "verify_sparse24_bitmask"]


def write_sparse24_bitmask(src: str | os.PathLike, out: str | os.PathLike, *,
                           max_shard_bytes: int = SHARD_BYTES) -> Path:
    """compressed-tensors ``sparse-24-bitmask`` checkpoint (vLLM 0.7.3-0.18.1, llm-compressor); returns ``out``.

    Each target weight ``W`` (rows x cols) becomes ``<layer>.compressed`` (rows x cols/2, the kept values in
    row order), ``<layer>.bitmask`` (uint8, rows x ceil(cols/8), little-endian bits, 1 = kept) and
    ``<layer>.shape`` (int64, 2x1); every other tensor is copied unchanged.
    """
    ct = _compressed_tensors()
    src, out = Path(src), Path(out)
    meta, nm = check_source(src, out)
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
        copy_side_files(src, tmp)
        write_weights(read_tensors(src), convert, tmp, max_shard_bytes)
        config = read_config(src)
        sparsity = _sparsity_config(ct, linears, targets, zeros / max(total, 1))
        config[ct.quant_key] = {
            ct.version_key: ct.version,
            ct.method_key: QUANT_METHOD,
            ct.sparsity_key: sparsity.model_dump(),
        }
        config[CONFIG_KEY] = config_block(meta, SPARSE24)
        save_json(config, tmp / "config.json")
        seal(tmp, {**meta, "export": {"format": SPARSE24}})
    return out


def verify_sparse24_bitmask(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Decompress every target of ``out`` with compressed-tensors and compare it bit for bit with ``src``.

    Pruned zeros are compared as +0.0 (the format cannot store the sign of a dropped zero); their count in
    the source is reported as ``negative_zeros``. Non-target tensors must be copied bit-exactly.
    """
    ct = _compressed_tensors()
    src, out = Path(src), Path(out)
    require_folder(src)
    require_folder(out)
    meta = read_metadata(src)
    qcfg = read_config(out).get(ct.quant_key) or {}
    scfg = qcfg.get(ct.sparsity_key) or {}
    if scfg.get("format") != SPARSE24:
        raise MaskproError(f"{out}/config.json has no {SPARSE24} sparsity_config; "
                           "write it with write_sparse24_bitmask first")
    config = ct.SparsityCompressionConfig.load_from_registry(SPARSE24, **scfg)
    decompress, decompressor = _decompressor(ct, config)
    targets = set(meta["targets"])
    produced = dict(read_tensors(out, lazy=True))
    report = {"decompressor": decompressor, "targets": len(targets), "bit_exact": 0, "mismatched": [],
              "negative_zeros": 0, "other_tensors": 0, "other_mismatched": [], "compressed_bytes": 0,
              "dense_bytes": 0, "missing": []}
    for key, t in read_tensors(src):
        name = key.removesuffix(".weight")
        if name in targets and key.endswith(".weight"):
            parts = {p: produced.get(f"{name}.{p}") for p in ("compressed", "bitmask", "shape")}
            if any(v is None for v in parts.values()):
                report["missing"].append(name)
                continue
            parts = {p: get() for p, get in parts.items()}
            dense = decompress(parts)
            report["negative_zeros"] += int(((t == 0) & torch.signbit(t)).sum()) if t.is_floating_point() else 0
            if _same_bits(dense, positive_zeros(t)):
                report["bit_exact"] += 1
            else:
                report["mismatched"].append(name)
            report["compressed_bytes"] += sum(nbytes(v) for v in parts.values())
            report["dense_bytes"] += nbytes(t)
        else:
            report["other_tensors"] += 1
            got = produced.get(key)
            if got is None or not _same_bits(got(), t):
                report["other_mismatched"].append(key)
    report["ratio"] = report["compressed_bytes"] / max(report["dense_bytes"], 1)
    report["ok"] = (report["bit_exact"] == len(targets) and not report["mismatched"]
                    and not report["missing"] and not report["other_mismatched"])
    return report


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


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
        f"{name}.compressed": positive_zeros(w[keep]).reshape(rows, cols // 2),
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
