"""A model made ready for the embedded engine: device and dtype, tokenizer and weights, the runtime that runs
them (maskpro's fast Llama-family decoder or transformers), the 2:4 sparse linears, and the KV cache decode
steps run over.

KV cache and CUDA graphs (``EngineConfig.kv_cache``, ``cuda_graphs``): on a CUDA GPU the running batch lives
in a static per-row slot cache (:mod:`maskpro.serve.slot_cache`) whose decode steps replay CUDA graphs; on
CPU, for models whose cache is not plain full attention, or when the slots would not fit, the engine keeps a
dynamic cache (``kv_cache="static"`` forces slots, eager on CPU, and fails where they are not possible).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskpro.errors import MaskproError
from maskpro.schema import has_meta, read_meta

from .batch import cache_joinable
from .config import STATIC_CACHE_SHARE, EngineConfig
from .slot_cache import PREFILL_GRAPH_TOKENS, SlotCache, SlotDecoder, cache_bytes

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_dtype", "choose_runtime", "logits_width",
           "cuda_graphs_info"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaskproError(f"--device {name} asked, but torch sees no CUDA GPU; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise MaskproError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from maskpro.models import parse_dtype

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return parse_dtype(name)


def logits_width(model) -> int:
    """Size of the vocabulary axis of the model's logits (may exceed len(tokenizer))."""
    out = model.get_output_embeddings()
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


@dataclass
class LoadedModel:
    """A model ready to serve, and what the engine reports about how it was loaded."""

    path: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    decode_tokenizer: Any          # the worker thread's own copy of ``tokenizer``
    model: torch.nn.Module
    runtime: str                   # "fast" | "transformers"
    sparsity: dict
    load_s: float
    maskpro_meta: dict | None      # the export's maskpro.json (format, n, m, method, source model)
    max_context: int
    max_prompt_tokens: int
    eos_ids: set[int]
    pad_id: int
    logits_to_keep: bool           # the model's forward can compute the last position's logits only
    cache_kw: str                  # the forward's keyword for the KV cache
    decoder: SlotDecoder | None = None   # None: the dynamic cache
    kv_cache: dict = field(default_factory=dict)


def load_model(config: EngineConfig) -> LoadedModel:
    """Load ``config.model`` onto its device, swap in the sparse runtime and set up the KV cache (CUDA graphs
    are captured here, before the first request)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskpro.models import cache_kwarg, resolve_model_path

    path = resolve_model_path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # the worker thread decodes while other threads encode, which one tokenizer object cannot do safely
    # (see maskpro.serve.prompts)
    decode_tokenizer = copy.deepcopy(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model = model.to(device).eval()
    runtime = choose_runtime(config, model, device)
    sparsity = _sparsify(config, model, device, runtime)
    load_s = round(time.perf_counter() - t0, 2)
    maskpro_meta = _read_meta(path)
    max_context = int(getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", 0)
                      or 0) or 1 << 20
    eos_ids = _eos_ids(model, tokenizer)
    loaded = LoadedModel(
        path=path, device=device, dtype=dtype, tokenizer=tokenizer, decode_tokenizer=decode_tokenizer,
        model=model, runtime=runtime, sparsity=sparsity, load_s=load_s, maskpro_meta=maskpro_meta,
        max_context=max_context,
        max_prompt_tokens=min(config.max_prompt_tokens or max_context - 1, max_context - 1),
        eos_ids=eos_ids, pad_id=_pad_id(tokenizer, eos_ids),
        logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
        cache_kw=cache_kwarg(model))
    loaded.decoder, loaded.kv_cache = _slot_decoder(loaded, config)
    return loaded


def choose_runtime(config: EngineConfig, model, device: torch.device) -> str:
    """'fast' (maskpro's compiled Llama-family decoder) or 'transformers', from ``config.runtime``."""
    from .fast_model import FAMILY

    kind = getattr(model.config, "model_type", "?")
    if config.runtime == "fast":  # on CPU it runs eagerly (what the CPU tests exercise)
        return "fast"
    auto = (config.runtime == "auto" and device.type == "cuda" and kind in FAMILY
            and config.kv_cache != "dynamic")
    return "fast" if auto else "transformers"


def _sparsify(config: EngineConfig, model, device: torch.device, runtime: str) -> dict:
    """Swap 2:4 linears for the sparse runtime (the transformers runtime only); returns the sparsity report."""
    if runtime == "fast":
        return {"backend": "fast", "layers": 0}  # filled when the fast decoder takes the weights
    if not config.sparse:
        return {"backend": "dense", "reason": "sparse runtime disabled (--no-sparse)", "layers": 0}
    from .sparse_linear import TOKEN_BUCKETS, sparsify, token_bucket

    graphs_wanted = config.cuda_graphs and device.type == "cuda" and config.kv_cache != "dynamic"
    # decode steps and short prefills replayed from graphs are planned by device time (no host launch cost)
    graphed = ({token_bucket(1 << i) for i in range(config.max_batch_size.bit_length() + 1)}
               | {t for t in TOKEN_BUCKETS if t <= PREFILL_GRAPH_TOKENS}) if graphs_wanted else set()
    return dict(sparsify(model, graph_buckets=tuple(sorted(graphed))))


def _fast_decoder(m: LoadedModel, config: EngineConfig) -> tuple[SlotDecoder, dict]:
    """The fast runtime's decoder over a static slot cache; the transformers model's linears are released
    as it takes their weights (2:4 ones compressed only, with ``config.sparse``)."""
    from .fast_decoder import for_engine

    capacity = min(m.max_context, m.max_prompt_tokens + config.max_new_tokens)
    decoder, m.sparsity, kv = for_engine(m.model, config.max_batch_size, capacity, m.dtype, m.device,
                                         config.sparse, config.cuda_graphs)
    return decoder, kv


def _slot_decoder(m: LoadedModel, config: EngineConfig) -> tuple[SlotDecoder | None, dict]:
    """The static slot cache and its decoder where ``kv_cache`` allows it; else (None, why not)."""
    from transformers import DynamicCache

    if m.runtime == "fast":
        return _fast_decoder(m, config)
    mode = config.kv_cache
    if mode == "dynamic" or (mode == "auto" and m.device.type != "cuda"):
        return None, {"kind": "dynamic", "why": "kv_cache=dynamic" if mode == "dynamic" else "not on a GPU"}
    probe = DynamicCache(config=m.model.config)
    with torch.inference_mode():
        m.model(input_ids=torch.tensor([[m.pad_id]], device=m.device), use_cache=True, **{m.cache_kw: probe})
    attn = getattr(m.model.config, "_attn_implementation", None)
    why = ("the model's KV cache is not plain full attention" if not cache_joinable(probe) else
           f"attention implementation {attn!r} takes no 4D mask (use sdpa or eager)"
           if attn not in ("sdpa", "eager") else None)
    if why is None:
        k = probe.layers[0].keys
        slots, capacity = config.max_batch_size, min(m.max_context, m.max_prompt_tokens + config.max_new_tokens)
        need = cache_bytes(len(probe.layers), slots, capacity, k.shape[1], k.shape[3], k.dtype)
        free = torch.cuda.mem_get_info(m.device)[0] if m.device.type == "cuda" else None
        if free is not None and need > STATIC_CACHE_SHARE * free:
            why = (f"a static KV cache for {slots} rows x {capacity} tokens needs {need / 2**30:.1f} GiB, more "
                   f"than half the free {free / 2**30:.1f} GiB; lower --max-batch-size, --max-prompt-tokens "
                   f"or --max-tokens")
    if why is not None:
        if mode == "static":
            raise MaskproError(f"kv_cache=static is not possible: {why}")
        log.warning("using the dynamic KV cache: %s", why)
        return None, {"kind": "dynamic", "why": why}
    cache = SlotCache(len(probe.layers), slots, capacity, k.shape[1], k.shape[3], k.dtype, m.device)
    graphs = config.cuda_graphs and m.device.type == "cuda"
    decoder = SlotDecoder(m.model, cache, graphs, m.logits_to_keep)
    t0 = time.perf_counter()
    with torch.inference_mode():
        decoder.warmup()
    log.info("static KV cache: %d slots x %d tokens, %.2f GiB; decode %s", slots, capacity,
             need / 2**30, f"from CUDA graphs ({decoder.captured} captured in "
                               f"{time.perf_counter() - t0:.1f} s)" if graphs else "eager")
    return decoder, {"kind": "static", "slots": slots, "capacity_tokens": capacity,
                     "bytes": need, "gib": round(need / 2**30, 3)}


def cuda_graphs_info(decoder: SlotDecoder | None, config: EngineConfig, device: torch.device,
                     kv_cache: dict) -> dict:
    """Whether decode steps replay CUDA graphs, and why not where they do not (what /health reports)."""
    requested = bool(config.cuda_graphs)
    if decoder is not None and decoder.graphs:
        return {"requested": requested, "active": True, "captured": decoder.captured,
                "prefill": {"active": decoder.prefill_graphs, "captured": decoder.prefills_captured}}
    why = ("not requested (--no-cuda-graphs)" if not requested else "not on a GPU" if device.type != "cuda"
           else f"capture failed: {decoder.capture_failed}" if decoder is not None and decoder.capture_failed
           else f"needs the static KV cache ({kv_cache.get('why')})")
    return {"requested": requested, "active": False, "why": why}


def _read_meta(path: Path) -> dict | None:
    """What /health shows of the folder's maskpro metadata (None for a plain HF folder)."""
    if not has_meta(path):
        return None
    meta = read_meta(path)
    return {"format": meta.format, "n": meta.nm.n, "m": meta.nm.m, "method": meta.method,
            **({"source_model": meta.get("source_model")} if "source_model" in meta.extra else {})}


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def _pad_id(tokenizer, eos_ids: set[int]) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, *sorted(eos_ids)):
        if value is not None:
            return int(value)
    return 0
