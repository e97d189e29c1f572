"""Model shapes the benchmarks time or build: named Llama configs, ``NAME:LAYERS`` cuts and any HF config.json.

Speed does not depend on weight values, so a random-weight model at a real model's shapes measures what that
model would cost. ``llama2-7b:8`` is Llama-2-7B's layer shapes with 8 of its 32 decoder layers (for machines
where the whole model does not fit).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from maskpro.errors import MaskproError


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-family model's linear shapes and memory."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False

    @property
    def heads_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linears as name -> (in_features K, out_features N)."""
        h, d = self.hidden_size, self.heads_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate_size), "up_proj": (h, self.intermediate_size),
                "down_proj": (self.intermediate_size, h)}

    def linear_shapes(self) -> dict[str, list[str]]:
        """Distinct shapes ``"KxN"`` (in x out) with the layer names that have them, in layer order."""
        out: dict[str, list[str]] = {}
        for name, (k, n) in self.linear_layers().items():
            out.setdefault(f"{k}x{n}", []).append(name)
        return out

    def linear_weights(self) -> int:
        """Weights in all decoder linears (what a 2:4 mask covers)."""
        return self.num_hidden_layers * sum(k * n for k, n in self.linear_layers().values())

    def parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = self.hidden_size * (2 * self.num_hidden_layers + 1)
        return self.linear_weights() + embed + norms

    def llama_config(self, max_position_embeddings: int = 4096):
        from transformers import LlamaConfig

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return LlamaConfig(**fields, max_position_embeddings=max_position_embeddings)


CONFIGS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("tiny", 64, 128, 2, 4, 2, 256, tie_word_embeddings=True),
    ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
    ModelShape("llama-1b", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_word_embeddings=True),  # Llama-3.2-1B
    ModelShape("llama2-7b", 4096, 11008, 32, 32, 32, 32000),
    ModelShape("llama2-13b", 5120, 13824, 40, 40, 40, 32000),
)}


def _from_hf_config(path: Path) -> ModelShape:
    d = json.loads(path.read_text())
    d = d.get("text_config", d)
    try:
        return ModelShape(path.parent.name, d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                          d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"],
                          d["vocab_size"], d.get("head_dim"), bool(d.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise MaskproError(f"{path} has no {e.args[0]}; maskpro-bench reads Llama-style configs "
                           "(hidden_size, intermediate_size, num_attention_heads, ...)") from None


def resolve(spec: str) -> ModelShape:
    """``NAME``, ``NAME:LAYERS`` (fewer decoder layers), or a model folder / config.json / .gguf path."""
    name, _, layers = spec.partition(":")
    if name in CONFIGS:
        shape = CONFIGS[name]
        if layers:
            if not layers.isdigit() or int(layers) < 1:
                raise MaskproError(f"bad config {spec!r}: the part after ':' is a layer count, e.g. {name}:8")
            shape = dataclasses.replace(shape, name=spec, num_hidden_layers=int(layers))
        return shape
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return _from_hf_config(path)
    if (path / "config.json").is_file():
        return _from_hf_config(path / "config.json")
    if path.exists() or spec.endswith(".gguf") or spec == "smollm2-135m-instruct":
        from maskpro.models import resolve_model_path

        return _from_hf_config(resolve_model_path(spec) / "config.json")
    raise MaskproError(f"unknown model config {spec!r}; use one of {', '.join(CONFIGS)} (optionally NAME:LAYERS) "
                       "or a model folder with a config.json")


def build_random_model(shape: ModelShape, device: str, dtype: torch.dtype, seed: int = 0):
    """A Llama with random weights at ``shape``, built directly in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(shape.llama_config(), dtype=dtype).eval()


def prune_24_(model) -> None:
    """Magnitude 2:4 on every decoder linear in place (which weights are kept does not change speed)."""
    from maskpro.models import find_linears
    from maskpro.nm import NM, topn_mask

    with torch.no_grad():
        for mod in find_linears(model).values():
            mod.weight.mul_(topn_mask(mod.weight.abs(), NM(2, 4)))
