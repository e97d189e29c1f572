"""A compact decoder for the Llama family (Llama, Mistral, Qwen2, SmolLM) that compiles and replays from graphs.

Why not the transformers model: a decode step there is hundreds of small kernels (norms, rotary, residuals,
cache updates) around the linears, and its attention reads the cache at whatever width the mask has. Here a
decoder block is one small function over plain tensors (gpt-fast's shape): ``torch.compile`` fuses what lies
between the linears (the key's rotary with the cache write, SiLU with the product), the 2:4 linears are the
``maskpro::sp24_mm`` custom op (:mod:`maskpro.serve.sparse_ops`), attention is the split-position decode kernel
over the slot cache, which rotates the query itself (:mod:`maskpro.serve.decode_attention`), each residual add
and the norm after it are one kernel (:mod:`maskpro.serve.rmsnorm`), and one CUDA graph replays a whole step
(:mod:`maskpro.serve.fast_decoder`). Every block has the same shapes, so one compiled
function serves all of them.

The weights are taken from a loaded transformers model (its rotary frequencies too, so every rope scaling it
supports is honoured); q/k/v and gate/up are fused into one product each. A 2:4 layer keeps only its
compressed weight; a layer whose shape the ``mma.sp`` kernel cannot tile stays dense, logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskpro.errors import MaskproError

from .decode_attention import decode_attention, splits_for
from .expand_ahead import ExpandAhead
from .rmsnorm import add_rms_norm, rms_norm
from .rotary import rotate
from .sparse_mma import MAX_TOKENS

log = logging.getLogger(__name__)

FAMILY = ("llama", "mistral", "qwen2")
LINEARS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class Arch:
    """The shapes a Llama-family decoder needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float

    @classmethod
    def of(cls, config) -> Arch:
        kind = getattr(config, "model_type", "?")
        if kind not in FAMILY:
            raise MaskproError(f"the fast runtime covers {', '.join(FAMILY)} models, not {kind!r}; "
                               f"serve it with --runtime transformers")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise MaskproError(f"the fast runtime needs SiLU MLPs, got {config.hidden_act!r}; use "
                               f"--runtime transformers")
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, config.vocab_size,
                   config.rms_norm_eps)


def linear(x: torch.Tensor, spec: tuple) -> torch.Tensor:
    """``x @ W.T + b`` for a layer spec: ("dense", weight, bias) or ("2:4", tiles, positions, bias, out, decode,
    gemm) (the ``maskpro::sp24_mm`` op's configs)."""
    if spec[0] == "dense":
        return F.linear(x, spec[1], spec[2])
    _, tiles, positions, bias, out, decode, gemm = spec
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.maskpro.sp24_mm(x2, tiles, positions, out, decode, gemm).reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias


def block_decode(x: torch.Tensor, h: torch.Tensor, w: dict, next_norm: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 arch: Arch, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One block for one token per row: residual ``x`` [B, hidden] and its normed ``h`` in; the new residual
    and its norm under ``next_norm`` (the next block's, or the final one) out. Writes the row's K/V at ``pos``."""
    b = x.shape[0]
    q_size, kv_size = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    q, k, v = linear(h, w["qkv"]).split((q_size, kv_size, kv_size), dim=-1)
    k = rotate(k.view(b, arch.kv_heads, arch.head_dim), cos, sin)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v.view(b, arch.kv_heads, arch.head_dim)
    # the query is rotated inside the attention kernel (one kernel less per block)
    attn = decode_attention(q.view(b, arch.heads, arch.head_dim), k_cache, v_cache, pos + 1, splits, cos=cos,
                            sin=sin)
    # each residual add and the norm after it: one kernel of a whole row per program (serve/rmsnorm.py)
    x, h2 = add_rms_norm(x, linear(attn.reshape(b, q_size), w["o"]), w["mlp_norm"], arch.eps)
    gate, up = linear(h2, w["gate_up"]).chunk(2, dim=-1)
    return add_rms_norm(x, linear(F.silu(gate) * up, w["down"]), next_norm, arch.eps)


def block_prefill(x: torch.Tensor, w: dict, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, arch: Arch) -> torch.Tensor:
    """One block over right-padded prompts ``x`` [B, T, hidden]: causal attention within each row (padding only
    follows real tokens, so it never reaches them), K/V written to columns ``0 .. T-1`` of ``slots`` [B] (a
    device tensor, so one captured prefill serves any free slots)."""
    b, t, _ = x.shape
    q_size, kv_size = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    h = rms_norm(x, w["attn_norm"], arch.eps)
    q, k, v = linear(h, w["qkv"]).split((q_size, kv_size, kv_size), dim=-1)
    q = rotate(q.view(b, t, arch.heads, arch.head_dim).transpose(1, 2), cos, sin)
    k = rotate(k.view(b, t, arch.kv_heads, arch.head_dim).transpose(1, 2), cos, sin)
    v = v.view(b, t, arch.kv_heads, arch.head_dim).transpose(1, 2)
    cols = torch.arange(t, device=x.device)
    k_cache[slots[:, None], :, cols[None, :]] = k.transpose(1, 2)
    v_cache[slots[:, None], :, cols[None, :]] = v.transpose(1, 2)
    gqa = {"enable_gqa": True} if arch.heads != arch.kv_heads else {}
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    x = x + linear(attn.transpose(1, 2).reshape(b, t, q_size), w["o"])
    gate, up = linear(rms_norm(x, w["mlp_norm"], arch.eps), w["gate_up"]).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, w["down"])


def _fused(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight.data for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.data if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(linears, biases)])
    return weight, bias


class FastLM(nn.Module):
    """The decoder's weights and its two entry points, :meth:`decode` and :meth:`prefill` (see module doc)."""

    def __init__(self, arch: Arch, embed: torch.Tensor, blocks: list[dict], norm: torch.Tensor,
                 lm_head: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, capacity: int):
        super().__init__()
        self.arch, self.embed, self.blocks, self.norm, self.lm_head = arch, embed, blocks, norm, lm_head
        self.capacity = capacity
        pos = torch.arange(capacity, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rope_scale).to(embed.dtype)
        self.sin = (emb.sin() * rope_scale).to(embed.dtype)
        # replaced by their compiled forms (fast_decoder.compile_blocks)
        self.block_fn, self.prefill_fn = block_decode, block_prefill
        self.sms = (torch.cuda.get_device_properties(embed.device).multi_processor_count
                    if embed.device.type == "cuda" else 1)
        self.fallbacks: dict[str, str] = {}
        self.layers24: list[dict[str, nn.Module]] = [{} for _ in blocks]
        self.configured: int | None = None   # the token count the 2:4 specs are set for (configure)
        self.expand_ahead = None  # an ExpandAhead where from_hf made one (2:4 layers on a GPU)

    @classmethod
    def from_hf(cls, model: nn.Module, capacity: int, sparse: bool = True, expand_ahead: bool = True) -> FastLM:
        """Take a loaded transformers Llama-family model's weights. With ``sparse``, every q/k/v, o, gate/up and
        down product whose weight is 2:4 keeps only its compressed form (paths planned by :meth:`plan`); the
        dense weights are released as each layer is converted. ``expand_ahead`` (GPU) expands prefill's 2:4
        layers one block ahead on a side stream (:mod:`maskpro.serve.expand_ahead`; two blocks' dense bytes of
        buffers), instead of in line before each product."""
        from .sparse_ops import Weight24

        arch = Arch.of(model.config)
        window = getattr(model.config, "sliding_window", None)
        if window and (model.config.model_type == "mistral" or getattr(model.config, "use_sliding_window", False)) \
                and capacity > window:
            raise MaskproError(f"the fast runtime attends over whole contexts; this model slides a {window}-token "
                               f"window, so keep prompts plus new tokens within {window} or use --runtime "
                               f"transformers")
        base = model.model
        fallbacks: dict[str, str] = {}

        def spec(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
            why = _not_sparse(weight) if sparse else "dense model"
            if why is None:
                return ("2:4", Weight24(weight, bias))
            kind = name.split(".")[-1]
            if sparse and kind not in fallbacks:
                log.warning("%s stays dense: %s", kind, why)
                fallbacks[kind] = why
            return ("dense", weight, bias)

        blocks = []
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = _fused([mlp.gate_proj, mlp.up_proj])
            blocks.append({"attn_norm": layer.input_layernorm.weight.data,
                           "qkv": spec(f"{i}.qkv", *qkv),
                           "o": spec(f"{i}.o", attn.o_proj.weight.data, attn.o_proj.bias),
                           "mlp_norm": layer.post_attention_layernorm.weight.data,
                           "gate_up": spec(f"{i}.gate_up", *gate_up),
                           "down": spec(f"{i}.down", mlp.down_proj.weight.data, mlp.down_proj.bias)})
            # release what this layer no longer needs now (the fused members; with ``sparse`` every dense
            # weight), so converting never holds two copies of the model
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj) + (
                    (attn.o_proj, mlp.down_proj) if sparse else ()):
                m.weight = None
        rotary = base.rotary_emb
        fast = cls(arch, base.embed_tokens.weight.data, blocks, base.norm.weight.data,
                   model.lm_head.weight.data, rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)),
                   capacity)
        fast.fallbacks = fallbacks
        # 2:4 layers become plain specs of tensors, for one token count at a time (see configure)
        fast.layers24 = [{k: w[k][1] for k in LINEARS if w[k][0] == "2:4"} for w in fast.blocks]
        if expand_ahead and any(fast.layers24) and fast.embed.is_cuda:
            fast.expand_ahead = ExpandAhead(fast.layers24, fast.embed.device)
        fast.configure(1)
        return fast

    def plan(self, buckets) -> dict:
        """Time each 2:4 shape's paths (:func:`maskpro.serve.sparse_ops.plan`) for the decode ``buckets`` and
        prefill, once per shape, and run the fastest; returns {"OUTxIN": timings and choices}."""
        from .sparse_ops import plan

        planned: dict[tuple[int, int], object] = {}   # shape -> the layer that was timed
        reports = {}
        for layers in self.layers24:
            for layer in layers.values():
                key = (layer.out_features, layer.in_features)
                if key not in planned:
                    reports[f"{key[0]}x{key[1]}"] = plan(layer, buckets)
                    planned[key] = layer
                layer.choice, layer.prefill = dict(planned[key].choice), planned[key].prefill
        self.configured = None   # the plan changed the paths: set every spec again
        self.configure(1)
        return reports

    def configure(self, tokens: int) -> None:
        """Set every 2:4 layer's spec for steps of ``tokens`` tokens (its kernel config for that token count),
        before such a step is traced or captured."""
        if tokens == self.configured:  # eager steps (CPU) call this per step; the specs are already set
            return
        for w, layers in zip(self.blocks, self.layers24):
            for key, layer in layers.items():
                w[key] = ("2:4", layer.tiles, layer.positions, layer.bias, layer.out_features,
                          *layer.args_for(tokens))
        self.configured = tokens

    def decode(self, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, k_cache: list[torch.Tensor],
               v_cache: list[torch.Tensor]) -> torch.Tensor:
        """One token per row (``ids``, ``pos`` [B]) into slots ``rows`` [B] (``0 .. B-1``: attention reads the
        first B slots); float32 logits [B, vocab]."""
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        splits = splits_for(ids.shape[0], self.arch.kv_heads, k_cache[0].shape[2], self.sms)
        x = F.embedding(ids, self.embed)
        h = rms_norm(x, self.blocks[0]["attn_norm"], self.arch.eps)
        for i, w in enumerate(self.blocks):
            nxt = self.blocks[i + 1]["attn_norm"] if i + 1 < len(self.blocks) else self.norm
            x, h = self.block_fn(x, h, w, nxt, k_cache[i], v_cache[i], rows, pos, cos, sin, self.arch, splits)
        return F.linear(h, self.lm_head).float()

    def prefill(self, ids: torch.Tensor, last: torch.Tensor, slots: torch.Tensor, k_cache: list[torch.Tensor],
                v_cache: list[torch.Tensor]) -> torch.Tensor:
        """Right-padded prompts ``ids`` [B, T] into ``slots`` [B]; float32 logits at positions ``last`` [B]."""
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = F.embedding(ids, self.embed)
        ahead = self.expand_ahead
        # past the decode kernels' token range each 2:4 layer is expanded for cuBLAS; one block ahead, on a side
        # stream, that work hides behind the products (serve/expand_ahead.py)
        blocks = (ahead.blocks(self.blocks, self.layers24) if ahead is not None and ahead.enabled
                  and ids.numel() > MAX_TOKENS and ids.is_cuda else self.blocks)
        for i, w in enumerate(blocks):
            x = self.prefill_fn(x, w, k_cache[i], v_cache[i], slots, cos, sin, self.arch)
        h = x[torch.arange(ids.shape[0], device=ids.device), last]
        return F.linear(rms_norm(h, self.norm, self.arch.eps), self.lm_head).float()

    def weight_bytes(self) -> int:
        """Bytes of every weight this decoder holds (compressed 2:4 layers at their compressed size)."""
        tensors = [self.embed, self.norm, self.lm_head]
        for w in self.blocks:
            for v in w.values():
                tensors += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, torch.Tensor)]
        unique = {t.data_ptr(): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())


def _not_sparse(weight: torch.Tensor) -> str | None:
    """Why a weight cannot be served compressed (None: it can)."""
    from maskpro.nm import violations

    from .sparse24 import NM24

    n, k = weight.shape
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"the mma.sp kernel takes fp16 or bf16 weights, not {weight.dtype}"
    if n % 16 or k % 128:
        return f"the mma.sp kernel tiles out % 16 == 0 and in % 128 == 0, not {n}x{k}"
    if violations(weight, NM24).numel():
        return "its weight is not 2:4 along the input"
    return None
