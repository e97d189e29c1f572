"""vLLM plugin: serve maskpro 2:4 checkpoints through maskpro's own 2:4 kernels.

Pinned to vLLM 0.26.0, the release the GPU machine runs: there it registers, finds its config and loads a
checkpoint; serving under CUDA graphs is not verified yet. Written first against vLLM 0.33.0's source; what was
checked, on a CPU machine: the vLLM-independent parts (``vllm_plan``) with real maskpro folders, and the vLLM glue
against the Python source of the 0.33.0 wheel put on PYTHONPATH (no ``vllm._C``, no GPU, no engine):
registration, vLLM's ``get_quant_config`` finding the config both ways, real ``QKVParallelLinear`` /
``MergedColumnParallelLinear`` / ``RowParallelLinear`` layers loading, compressing (with stand-in reference
kernels) and matching the dense output, the tensor-parallel fallback, pickling. Serve a model once on a
CUDA GPU with vLLM before relying on it (the API may also differ in other vLLM releases).

Why a plugin: vLLM 0.19.0 and later dropped 2:4 compressed-tensors (vllm PR 36799), so the dense checkpoint
written by ``maskpro-export --engine vllm`` (``maskpro.export.vllm``) runs on dense kernels. This plugin
registers a quantization method ``"maskpro"`` whose linear method loads the same dense weights, then
compresses every maskpro target to (values, meta) with ``maskpro.serve.sparse_linear.compress_24``. Where
the GPU runs maskpro's ``mma.sp`` kernel (sm_80+, NVRTC) and the shape tiles (out % 16, in % 128), those bytes
are stored in the kernel's fragment order and run with ``sparse_linear_mma`` (the kernel at 1-16 tokens, 1.5-1.8x
cuBLAS on Llama-2-7B shapes; beyond, the weight expanded into one buffer all layers share, so no dense copy
is held and every size vLLM captures in a CUDA graph replays); otherwise with ``sparse_linear`` (the Triton kernel at
1-16 tokens). Nothing in the checkpoint changes.

Enable it
    ``pip install maskpro`` registers the entry point (group ``vllm.general_plugins``, name ``maskpro``,
    value ``maskpro.serve.vllm_plugin:register``); vLLM calls ``register()`` in every process it starts.
    Then ``vllm serve runs/smollm2-vllm --quantization maskpro``. vLLM reads the target list from
    ``maskpro.json`` (our ``get_config_filenames``). Or, without the flag,
    ``--hf-overrides '{"quantization_config": {"quant_method": "maskpro"}}'``; the targets then come from
    ``maskpro.json`` via ``maybe_update_config``.
    There is no automatic selection: vLLM calls ``override_quantization_method`` only when the HF config
    already has a ``quantization_config`` (``ModelConfig._verify_quantization``), and the maskpro
    checkpoint has none on purpose (transformers and plugin-less vLLM must still load it).
    ``MASKPRO_VLLM_DENSE=1`` keeps every layer dense (A/B timing, debugging).

vLLM API used (paths in the 0.33.0 wheel, ``vllm/...``)
    * ``plugins/__init__.py``: ``load_general_plugins()`` loads group ``"vllm.general_plugins"`` in every
      process (engine args, engine core, workers) and calls each entry point with no arguments; filter
      by name with ``VLLM_PLUGINS``. ``register()`` must be re-entrant (documented: design/plugin_system).
    * ``model_executor/layers/quantization/__init__.py``: ``register_quantization_config(name)`` class
      decorator (adds the name to ``QUANTIZATION_METHODS`` and the platform's ``supported_quantization``;
      the class must subclass ``QuantizationConfig``); ``get_quantization_config(name)``.
    * ``model_executor/layers/quantization/base_config.py``: ``QuantizationConfig`` with abstract
      ``get_name()``, ``get_supported_act_dtypes()``, classmethod ``get_min_capability()``, staticmethod
      ``get_config_filenames()``, classmethod ``from_config(config)``, ``get_quant_method(layer, prefix)``;
      optional classmethod ``override_quantization_method(hf_quant_cfg, user_quant, hf_config=None)``,
      ``apply_vllm_mapper(hf_to_vllm_mapper)``, ``maybe_update_config(model_name, hf_config, revision)``;
      attribute ``packed_modules_mapping`` (filled from the model class, e.g. Llama's ``qkv_proj`` ->
      ``q/k/v_proj``, ``gate_up_proj`` -> ``gate/up_proj``).
    * ``model_executor/layers/linear.py``: ``LinearMethodBase.create_weights(layer,
      input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
      **extra_weight_attrs)``, ``apply(layer, x, bias=None)``, ``process_weights_after_loading(layer)``
      (from ``QuantizeMethodBase``); ``LinearBase.__init__`` raises if ``get_quant_method`` returns None for
      a linear layer, so non-targets get ``UnquantizedLinearMethod``; the layer picks ``weight_loader_v2``
      only for class names in ``WEIGHT_LOADER_V2_SUPPORTED`` (``register_weight_loader_v2_supported_method``).
      ``RowParallelLinear`` shards K as ``divide(input_size, tp_size)``.
    * ``model_executor/model_loader/weight_utils.py``: ``get_quant_config`` uses the HF config's
      ``quantization_config`` if present, else globs ``*.json`` in the model folder for names ending in
      ``get_config_filenames()`` and passes that file's JSON to ``from_config``.
    * ``config/vllm.py``: ``_get_quantization_config`` checks ``get_min_capability`` (CUDA/ROCm only) and
      that the model dtype is in ``get_supported_act_dtypes``, then calls ``maybe_update_config``.
    * ``config/model.py``: ``_verify_quantization`` (override hooks only when a quantization_config exists).
    * ``model_executor/layers/vocab_parallel_embedding.py``, ``attention/attention.py``,
      ``fused_moe/routed_experts.py`` also call ``get_quant_method``; we return None there (embeddings,
      lm_head, attention and MoE experts stay vLLM's unquantized methods).

Per layer: a linear runs 2:4 only if every checkpoint module it holds (all shards of a fused qkv/gate_up)
is a maskpro target, its K shard is a multiple of 4 (row-parallel K splits must not cut 2:4 groups), the
weight is on a CUDA device, the loaded weight really is 2:4, and ``compress_24`` accepts it. Anything else
runs vLLM's dense path, with the reason logged once. The kernel call is a torch custom op
(``maskpro_vllm::sparse_linear_24``) so torch.compile treats it as opaque and ``sparse_linear`` keeps
choosing its kernel per token count at run time (vLLM drops shape guards, so a traced branch would stick).
Not handled: LoRA on sparse layers (LoRA reads ``base_layer.weight``, removed after compression); CPU weight
offloading (the compressed tensors stay on the GPU). ``sparse_linear`` must not synchronize or time kernels
while a CUDA graph is being captured (vLLM captures one graph per batch size; eager mode:
``--enforce-eager``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from maskpro.artifacts import METADATA
from maskpro.errors import MaskproError

# The vLLM-independent decisions, re-exported: tests and callers use them from here. The glue below looks
# them up in this module's namespace at call time, so patching ``vllm_plugin.decide_sparse`` takes effect.
from .vllm_plan import (  # noqa: F401
    CONFIG_KEY,
    DEFAULT_PACKED,
    DENSE_ENV,
    GROUP,
    METHOD,
    NOT_TARGET,
    ROW_PARALLEL,
    LayerPlan,
    MaskproMeta,
    check_24,
    checkpoint_plan,
    claims_quant_config,
    config_block,
    cross_check,
    decide_sparse,
    fits_24,
    hf_module_names,
    meta_from_dict,
    metadata_for_model,
    read_maskpro_metadata,
    shard_plan,
    target_plan,
)

# A child of vLLM's "vllm" logger, so lines reach vLLM's handler (it does not propagate to the root logger).
log = logging.getLogger("vllm.plugins.maskpro")

VLLM_VERSION = "0.26.0"            # the vLLM it runs with on the GPU machine (pinned)
OP_NAME = "maskpro_vllm::sparse_linear_24"
OP_NAME_MMA = "maskpro_vllm::sparse_linear_24_mma"
MIN_CAPABILITY = 80                # Ampere: first GPUs with 2:4 sparse tensor cores

__all__ = ["MaskproMeta", "LayerPlan", "read_maskpro_metadata", "meta_from_dict", "config_block",
           "claims_quant_config", "fits_24", "hf_module_names", "target_plan", "shard_plan", "check_24",
           "decide_sparse", "checkpoint_plan", "compress_weight", "sparse_linear_24", "sparse_linear_24_mma",
           "register", "vllm_classes"]


# ------------------------------------------------------------------------------------------- kernels

def _kernels() -> tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., Tensor]]:
    """maskpro's (compress_24, sparse_linear), imported late: the plugin must import without them."""
    try:
        from . import sparse_linear as kernels
    except ImportError as e:
        raise MaskproError(f"maskpro.serve.sparse_linear does not import ({str(e).splitlines()[0]}); "
                           "reinstall maskpro") from None
    compress, linear = getattr(kernels, "compress_24", None), getattr(kernels, "sparse_linear", None)
    if compress is None or linear is None:
        raise MaskproError("maskpro.serve.sparse_linear has no compress_24/sparse_linear; "
                           "install a maskpro release with the 2:4 kernels")
    return compress, linear


def compress_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(values, meta) for a dense 2:4 weight, through maskpro's ``compress_24``."""
    compress, _ = _kernels()
    values, meta = compress(weight)
    out, k = weight.shape
    if tuple(values.shape) != (out, k // 2):
        raise MaskproError(f"compress_24 returned values of shape {tuple(values.shape)}, expected {(out, k // 2)}")
    return values, meta


def _mma_kernels() -> tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., Tensor],
                            Callable[[int, int], bool]] | None:
    """maskpro's (mma_layout, sparse_linear_mma, fits(out, in)) for the ``mma.sp`` decode kernel, or None where
    this process cannot run it (no CUDA GPU with sparse tensor cores and NVRTC, or an older maskpro)."""
    try:
        from . import sparse_linear, sparse_mma
    except ImportError:
        return None
    if not (hasattr(sparse_linear, "sparse_linear_mma") and sparse_mma.available()):
        return None
    return (sparse_mma.mma_layout, sparse_linear.sparse_linear_mma,
            lambda out, k: sparse_mma.mma_ok(out, k, sparse_mma.DEFAULT_CONFIG))


_OPS: dict[str, Any] = {}


def _custom_op(name: str, linear_of: Callable[[], Callable[..., Tensor]]) -> Any:
    """Register ``name`` once per process as a custom op around ``linear_of()``: opaque to torch.compile, which
    vLLM runs by default, so the kernel choice per token count stays a run-time branch."""
    if name in _OPS:
        return _OPS[name]

    def impl(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], out_features: int,
             in_features: int) -> Tensor:
        return linear_of()(x, a, b, bias, out_features, in_features)

    op = torch.library.custom_op(name, impl, mutates_args=())

    @op.register_fake
    def _fake(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], out_features: int,
              in_features: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    _OPS[name] = op
    return op


def _register_op() -> Any:
    """The op over (values, meta): maskpro's ``sparse_linear`` (Triton decode kernel, else dense)."""
    return _custom_op(OP_NAME, lambda: _kernels()[1])


def _register_mma_op() -> Any:
    """The op over the ``mma.sp`` fragment order: maskpro's ``sparse_linear_mma`` (which expands the weight
    into one shared buffer where the kernel cannot run)."""
    def linear() -> Callable[..., Tensor]:
        from .sparse_linear import sparse_linear_mma

        return sparse_linear_mma
    return _custom_op(OP_NAME_MMA, linear)


def _checked(x: Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise MaskproError(f"input has {x.shape[-1]} features, the layer expects {in_features}")


def sparse_linear_24(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, out_features: int,
                     in_features: int) -> Tensor:
    """``x @ W.T + bias`` for a compressed 2:4 ``W`` through the custom op (and so through ``sparse_linear``)."""
    _checked(x, in_features)
    return _register_op()(x, values, meta, bias, int(out_features), int(in_features))


def sparse_linear_24_mma(x: Tensor, tiles: Tensor, positions: Tensor, bias: Tensor | None, out_features: int,
                         in_features: int) -> Tensor:
    """The same for a ``W`` kept only in the ``mma.sp`` fragment order (``sparse_linear_mma``: the ``mma.sp``
    kernel at 1-16 tokens, the expanded weight on cuBLAS beyond)."""
    _checked(x, in_features)
    return _register_mma_op()(x, tiles, positions, bias, int(out_features), int(in_features))


# ---------------------------------------------------------------------------------------- vLLM glue

def _require_vllm() -> None:
    try:
        import vllm.model_executor.layers.linear  # noqa: F401
        import vllm.model_executor.layers.quantization  # noqa: F401
    except ImportError as e:
        raise MaskproError(f"the maskpro vLLM plugin needs vLLM ({str(e).splitlines()[0]}); "
                           f"run: pip install vllm=={VLLM_VERSION}") from None


_CLASSES: tuple[type, type] | None = None
_REGISTERED = False
_LOGGED: set[tuple[str, str]] = set()


def _log_once(prefix: str, plan: LayerPlan, level: int = logging.INFO) -> None:
    """One line per (layer kind, reason): a 32-layer model would otherwise log each fallback 32 times."""
    kind = re.sub(r"\.\d+\.", ".N.", prefix)
    key = (kind, re.sub(r"\d+", "N", plan.reason))
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.log(level, "maskpro: %s runs dense: %s", kind, plan.reason)


def vllm_classes() -> tuple[type, type]:
    """(MaskproVllmConfig, MaskproLinearMethod), built on first use because their bases live in vLLM."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    _require_vllm()
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class MaskproLinearMethod(LinearMethodBase):
        """Loads the dense weight like vLLM's unquantized method, then swaps it for 2:4 values + meta."""

        def __init__(self, quant_config: "MaskproVllmConfig", prefix: str) -> None:
            self.quant_config = quant_config
            self.prefix = prefix
            self.dense = UnquantizedLinearMethod()  # same parameters, loader and fallback kernels as vLLM

        def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int, output_size: int,
                           params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
            self.dense.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                      output_size, params_dtype, **extra_weight_attrs)
            layer.maskpro_plan = shard_plan(input_size_per_partition, output_partition_sizes, input_size)
            layer.maskpro_shape = (int(sum(output_partition_sizes)), int(input_size_per_partition))
            layer.maskpro_sparse = False
            layer.maskpro_kernel = ""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            weight = layer.weight.data
            plan = decide_sparse(weight, layer.maskpro_plan, self.prefix)
            mma = _mma_kernels() if plan.sparse and weight.dtype in (torch.float16, torch.bfloat16) else None
            mma = mma if mma is not None and mma[2](*weight.shape) else None
            if plan.sparse:
                try:
                    (_register_op if mma is None else _register_mma_op)()
                    values, meta = compress_weight(weight)
                    if mma is not None:  # the same bytes in the instruction's fragment order
                        values, meta = mma[0](values, meta)
                        from .sparse_ops import reserve_layer

                        reserve_layer(*weight.shape, weight.dtype, weight.device)  # before vLLM captures graphs
                except Exception as e:  # a shape or dtype the kernels refuse: serve it dense instead
                    plan = LayerPlan(False, f"compress_24 refused it ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0] if str(e) else ''})")
            self.quant_config.decisions[self.prefix] = plan
            if not plan.sparse:
                _log_once(self.prefix, plan)
                self.dense.process_weights_after_loading(layer)
                return
            delattr(layer, "weight")  # the dense copy is what 2:4 saves; apply() never reads it
            layer.maskpro_kernel = "mma" if mma is not None else "triton"
            names = ("maskpro_tiles", "maskpro_positions") if mma is not None else ("maskpro_values", "maskpro_meta")
            for name, t in zip(names, (values, meta)):
                layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            layer.maskpro_sparse = True

        def apply(self, layer: torch.nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
            if layer.maskpro_sparse:
                out, k = layer.maskpro_shape
                if layer.maskpro_kernel == "mma":
                    return sparse_linear_24_mma(x, layer.maskpro_tiles, layer.maskpro_positions, bias, out, k)
                return sparse_linear_24(x, layer.maskpro_values, layer.maskpro_meta, bias, out, k)
            return self.dense.apply(layer, x, bias)

    class MaskproVllmConfig(QuantizationConfig):
        """The "maskpro" quantization method: which linears are 2:4 targets (from maskpro.json)."""

        def __init__(self, meta: MaskproMeta | None = None) -> None:
            super().__init__()
            self.meta = meta
            self.targets: frozenset[str] = frozenset(meta.targets) if meta else frozenset()
            self.decisions: dict[str, LayerPlan] = {}

        def __repr__(self) -> str:
            pattern = f"{self.meta.n}:{self.meta.m}" if self.meta else "?"
            return f"MaskproVllmConfig(pattern={pattern}, targets={len(self.targets)})"

        def get_name(self) -> str:
            return METHOD

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            # fp32 too: the plugin must not refuse a model whose layers would simply fall back to dense.
            return [torch.float16, torch.bfloat16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return MIN_CAPABILITY

        @staticmethod
        def get_config_filenames() -> list[str]:
            return [METADATA]

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> "MaskproVllmConfig":
            meta = meta_from_dict(config, METADATA)
            if meta is not None and not meta.fits_24:
                raise MaskproError(f"this checkpoint is {meta.n}:{meta.m} sparse, which is not 2:4; serve it "
                                   "without --quantization maskpro (dense)")
            return cls(meta)

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                         hf_config: Any = None) -> str | None:
            # vLLM asks every registered method, custom ones first, for any quantized checkpoint: stay cheap.
            return METHOD if claims_quant_config(hf_quant_cfg) else None

        def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
            if self.meta is None:  # hf-overrides path: quantization_config had no targets
                meta = metadata_for_model(model_name, revision, hf_config)
                if not meta.fits_24:
                    raise MaskproError(f"{model_name} is {meta.n}:{meta.m} sparse, which is not 2:4; serve it "
                                       "without the maskpro quantization")
                self.meta, self.targets = meta, frozenset(meta.targets)
            elif hf_config is not None and config_block(hf_config) is not None:
                cross_check(config_block(hf_config), self.meta, model_name)

        def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
            # Models that rename HF modules (e.g. a language_model. prefix) map our HF target names too.
            if self.targets:
                self.targets = frozenset(hf_to_vllm_mapper.apply_list(sorted(self.targets)))

        def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
            if not isinstance(layer, LinearBase):
                return None  # embeddings, lm_head, attention, MoE experts: vLLM's own methods
            if self.meta is None:
                raise MaskproError(f"no maskpro targets known for layer {prefix}; pass a folder with {METADATA}")
            plan = target_plan(prefix, self.targets, self.packed_modules_mapping or None)
            if not plan.sparse:
                self.decisions[prefix] = plan
                if plan.reason != NOT_TARGET:
                    _log_once(prefix, plan)
                return UnquantizedLinearMethod()
            return MaskproLinearMethod(self, prefix)

        def summary(self) -> dict[str, int]:
            """After loading: linears on 2:4, targets that fell back to dense, and non-target linears."""
            plans = self.decisions.values()
            other = sum(p.reason == NOT_TARGET for p in plans)
            sparse = sum(p.sparse for p in plans)
            return {"sparse": sparse, "dense_targets": len(self.decisions) - sparse - other, "not_targets": other}

    # Module-level names, so pickle (vLLM ships its config to worker processes) finds the classes.
    for cls in (MaskproVllmConfig, MaskproLinearMethod):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _CLASSES = (MaskproVllmConfig, MaskproLinearMethod)
    return _CLASSES


def register() -> None:
    """``vllm.general_plugins`` entry point: register the "maskpro" quantization method (re-entrant)."""
    global _REGISTERED
    config_cls, method_cls = vllm_classes()
    if _REGISTERED:
        return
    from vllm.model_executor.layers import linear as vllm_linear
    from vllm.model_executor.layers.quantization import register_quantization_config

    # Same weight loader as UnquantizedLinearMethod, whose ModelWeightParameter we create.
    add_v2 = getattr(vllm_linear, "register_weight_loader_v2_supported_method", None)
    if add_v2 is not None:
        add_v2(method_cls)
    elif method_cls.__name__ not in getattr(vllm_linear, "WEIGHT_LOADER_V2_SUPPORTED", [method_cls.__name__]):
        vllm_linear.WEIGHT_LOADER_V2_SUPPORTED.append(method_cls.__name__)
    register_quantization_config(METHOD)(config_cls)
    _register_op()
    _register_mma_op()
    _REGISTERED = True
    log.debug("maskpro: registered quantization method %r", METHOD)


def __getattr__(name: str) -> Any:
    """``MaskproVllmConfig`` / ``MaskproLinearMethod`` on demand (pickle looks them up by module name)."""
    if name in ("MaskproVllmConfig", "MaskproLinearMethod"):
        try:
            config_cls, method_cls = vllm_classes()
        except MaskproError as e:
            raise AttributeError(str(e)) from None
        return config_cls if name == "MaskproVllmConfig" else method_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
