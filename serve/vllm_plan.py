"""The vLLM-independent half of the maskpro vLLM plugin: what it reads and decides, without importing vLLM.

``maskpro.json`` metadata (cross-checked with config.json's ``"maskpro"`` block), whether an N:M pattern is
also 2:4, and the per-layer plans: a vLLM linear runs 2:4 only if every checkpoint module it holds (all
shards of a fused qkv/gate_up) is a maskpro target, its K shard is a multiple of 4 (row-parallel K splits
must not cut 2:4 groups), the weight is on a CUDA device and the loaded weight really is 2:4.
``checkpoint_plan`` previews those plans for a checkpoint at a tensor-parallel size. The vLLM glue that acts
on them is :mod:`maskpro.serve.vllm_plugin`, which re-exports every name here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from maskpro.errors import MaskproError
from maskpro.schema import METADATA, has_meta, read_meta

METHOD = "maskpro"                 # the --quantization name and quant_method the plugin registers
CONFIG_KEY = "maskpro"             # the block maskpro-export writes into config.json
DENSE_ENV = "MASKPRO_VLLM_DENSE"   # "1" keeps every layer dense
NOT_TARGET = "not a maskpro target"
GROUP = 4                          # the kernels' M: K shards must hold whole groups of 4
# vLLM's fusions for Llama-family models; used when the model class gives vLLM no packed_modules_mapping.
DEFAULT_PACKED: dict[str, list[str]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                        "gate_up_proj": ["gate_proj", "up_proj"]}
# Names of row-parallel linears (K sharded under tensor parallelism) in Llama-family HF models; only
# checkpoint_plan uses this, to preview TP fallbacks without vLLM (vLLM itself passes the real shard sizes).
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj", "w2", "wo", "dense_4h_to_h")

__all__ = ["METHOD", "CONFIG_KEY", "DENSE_ENV", "NOT_TARGET", "GROUP", "DEFAULT_PACKED", "ROW_PARALLEL",
           "MaskproMeta", "LayerPlan", "fits_24", "meta_from_dict", "config_block", "read_maskpro_metadata",
           "cross_check", "claims_quant_config", "metadata_for_model", "hf_module_names", "target_plan",
           "shard_plan", "check_24", "decide_sparse", "checkpoint_plan"]


# ------------------------------------------------------------------------------------------ metadata

@dataclass(frozen=True)
class MaskproMeta:
    """What the plugin needs from ``maskpro.json``: the pattern and the HF names of the pruned linears."""

    n: int
    m: int
    targets: tuple[str, ...]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)
    method: str | None = None

    @property
    def fits_24(self) -> bool:
        return fits_24(self.n, self.m)


@dataclass(frozen=True)
class LayerPlan:
    """Whether one vLLM linear runs on the 2:4 kernels, and if not, why (logged)."""

    sparse: bool
    reason: str = ""


def fits_24(n: int, m: int) -> bool:
    """True if every N:M weight is also 2:4, i.e. no aligned group of 4 along K can hold 3+ non-zeros."""
    if n < 0 or m < 1 or n > m:
        return False
    if GROUP % m == 0:            # m in {1, 2, 4}: a group of 4 holds 4/m whole N:M groups
        return n * (GROUP // m) <= 2
    if m % GROUP == 0:            # m = 8, 12, ...: a group of 4 lies inside one N:M group
        return n <= 2
    return n == 0                 # other m: groups straddle, nothing bounds a group of 4


def meta_from_dict(d: Mapping[str, Any], source: str = "config") -> MaskproMeta | None:
    """Parse ``maskpro.json`` contents (or a quantization_config that carries ``targets``).

    Returns None for a dict that names maskpro but lists no targets (``{"quant_method": "maskpro"}``, the
    config.json block): the caller then reads ``maskpro.json`` from the model folder.
    """
    if not isinstance(d, Mapping):
        raise MaskproError(f"{source} is a {type(d).__name__}, not a JSON object; pass maskpro.json's contents")
    if "targets" not in d:
        return None
    try:
        n, m = int(d["n"]), int(d["m"])
    except (KeyError, TypeError, ValueError):
        raise MaskproError(f"{source} has targets but no integer n and m; re-export with maskpro-export") from None
    targets = d["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise MaskproError(f"{source} has no list of target layer names; re-export with maskpro-export")
    shapes = {k: tuple(int(x) for x in v) for k, v in (d.get("shapes") or {}).items()}
    return MaskproMeta(n=n, m=m, targets=tuple(targets), shapes=shapes, method=d.get("method"))


def config_block(config: Mapping[str, Any] | Any) -> dict | None:
    """The ``"maskpro"`` block of a config.json dict or HF config object, or None."""
    block = config.get(CONFIG_KEY) if isinstance(config, Mapping) else getattr(config, CONFIG_KEY, None)
    return dict(block) if isinstance(block, Mapping) else None


def read_maskpro_metadata(source: str | os.PathLike | Mapping[str, Any]) -> MaskproMeta:
    """Metadata from a maskpro folder (``maskpro.json``, cross-checked with config.json) or a dict.

    Raises a one-line MaskproError when the source is not a maskpro checkpoint or lists no targets.
    """
    if isinstance(source, Mapping):
        meta = meta_from_dict(source)
        if meta is None:
            hint = " (that is config.json's summary block)" if config_block(source) is not None else ""
            raise MaskproError(f"this config lists no maskpro targets{hint}; read the folder's {METADATA} instead")
        return meta
    folder = Path(source)
    if not folder.is_dir():
        raise MaskproError(f"{folder} is not a local folder; pass a folder written by maskpro-export --engine vllm")
    if not has_meta(folder):
        raise MaskproError(f"{folder} has no {METADATA}; it is not a maskpro checkpoint "
                           "(write one with maskpro prune, then maskpro-export --engine vllm)")
    saved = read_meta(folder)
    meta = MaskproMeta(n=saved.nm.n, m=saved.nm.m, targets=saved.targets,
                       shapes={k: tuple(v) for k, v in saved.shapes.items()}, method=saved.method)
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            block = config_block(json.loads(config_path.read_text()))
        except ValueError:
            block = None
        if block is not None:
            cross_check(block, meta, folder)
    return meta


def cross_check(block: Mapping[str, Any], meta: MaskproMeta, folder: Path | str) -> None:
    """config.json's block and maskpro.json must describe the same pruning (else one was edited or copied)."""
    if (block.get("n"), block.get("m")) != (meta.n, meta.m):
        raise MaskproError(f"{folder}: config.json says {block.get('n')}:{block.get('m')} but {METADATA} says "
                           f"{meta.n}:{meta.m}; export the model again")
    count = block.get("num_targets")
    if count is not None and int(count) != len(meta.targets):
        raise MaskproError(f"{folder}: config.json counts {count} targets but {METADATA} lists "
                           f"{len(meta.targets)}; export the model again")


def claims_quant_config(hf_quant_cfg: Any) -> bool:
    """True for a quantization_config whose quant_method is "maskpro" (what our override hook answers)."""
    return isinstance(hf_quant_cfg, Mapping) and str(hf_quant_cfg.get("quant_method", "")).lower() == METHOD


def metadata_for_model(model: str, revision: str | None, hf_config: Any = None) -> MaskproMeta:
    """maskpro.json of a local folder or a Hugging Face repo (the hf-overrides path has no other source)."""
    if os.path.isdir(model):
        meta = read_maskpro_metadata(model)
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=model, filename=METADATA, revision=revision)
        except Exception as e:  # network, auth, missing file: all mean "no metadata here"
            raise MaskproError(f"cannot fetch {METADATA} for {model} ({type(e).__name__}); pass a local "
                               "folder written by maskpro-export --engine vllm") from None
        meta = read_maskpro_metadata(Path(path).parent)
    block = config_block(hf_config) if hf_config is not None else None
    if block is not None:
        cross_check(block, meta, model)
    return meta


# ------------------------------------------------------------------------------------ per-layer plans

def hf_module_names(prefix: str, packed: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The checkpoint module names behind a vLLM layer prefix: itself, or the shards of a fused layer."""
    packed = packed or DEFAULT_PACKED
    parent, _, leaf = prefix.rpartition(".")
    if leaf in packed:
        return [f"{parent}.{shard}" if parent else shard for shard in packed[leaf]]
    return [prefix]


def target_plan(prefix: str, targets: Sequence[str] | frozenset[str],
                packed: Mapping[str, Sequence[str]] | None = None) -> LayerPlan:
    """Sparse only if every module the layer holds is a target; a partly pruned fused layer is not 2:4."""
    targets = targets if isinstance(targets, (set, frozenset)) else frozenset(targets)
    if prefix in targets:  # stored fused on disk under the vLLM name (e.g. Phi-3's qkv_proj)
        return LayerPlan(True)
    names = hf_module_names(prefix, packed)
    hit = [n for n in names if n in targets]
    if len(hit) == len(names):
        return LayerPlan(True)
    if not hit:
        return LayerPlan(False, NOT_TARGET)
    missing = ", ".join(n.rpartition(".")[2] for n in names if n not in targets)
    return LayerPlan(False, f"fused layer with un-pruned shards ({missing}); its weight is not 2:4")


def shard_plan(input_size_per_partition: int, output_partition_sizes: Sequence[int],
               input_size: int | None = None) -> LayerPlan:
    """A rank's shard keeps whole 2:4 groups only if its K is a multiple of 4 (row-parallel splits K)."""
    k = int(input_size_per_partition)
    total = int(input_size) if input_size is not None else k
    if k <= 0 or any(int(o) <= 0 for o in output_partition_sizes):
        return LayerPlan(False, f"empty shard (K={k}, outputs={list(output_partition_sizes)})")
    if total % GROUP:
        return LayerPlan(False, f"K={total} is not a multiple of {GROUP}")
    if k % GROUP:
        return LayerPlan(False, f"tensor-parallel K shard {k} of {total} is not a multiple of {GROUP}; "
                                "2:4 groups would straddle ranks (use a tensor-parallel size that keeps it)")
    return LayerPlan(True)


def check_24(weight: Tensor, name: str = "weight") -> str | None:
    """None if every aligned group of 4 along K has at most 2 non-zeros, else why not (one line)."""
    if weight.dim() != 2:
        return f"{name} is {weight.dim()}-D, not a 2-D linear weight"
    if weight.shape[1] % GROUP:
        return f"{name} has K={weight.shape[1]}, not a multiple of {GROUP}"
    counts = (weight != 0).reshape(-1, GROUP).sum(dim=1)
    bad = int((counts > 2).sum())
    if bad:
        return f"{name} has {bad} groups of 4 with more than 2 non-zeros; the loaded weight is not 2:4"
    return None


def _force_dense() -> bool:
    return os.environ.get(DENSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def decide_sparse(weight: Tensor, plan: LayerPlan, name: str = "weight", *, allow_cpu: bool = False) -> LayerPlan:
    """Final per-layer decision after loading: the static plan, the device, then the real weight's pattern."""
    if _force_dense():
        return LayerPlan(False, f"{DENSE_ENV} is set")
    if not plan.sparse:
        return plan
    if weight.device.type != "cuda" and not allow_cpu:
        return LayerPlan(False, f"weight is on {weight.device.type}; maskpro's 2:4 kernels need CUDA "
                                "(on CPU they would only decompress)")
    bad = check_24(weight, name)
    if bad:
        return LayerPlan(False, bad)
    return LayerPlan(True)


def checkpoint_plan(source: str | os.PathLike | Mapping[str, Any] | MaskproMeta, tp_size: int = 1,
                    packed: Mapping[str, Sequence[str]] | None = None) -> dict[str, LayerPlan]:
    """Preview, without vLLM, which fused vLLM layers of a maskpro checkpoint would run 2:4 at a TP size.

    Keys are vLLM prefixes (``...self_attn.qkv_proj``). Row-parallel layers are recognised by name
    (``ROW_PARALLEL``, Llama-family naming); vLLM itself passes the real shard sizes at load time.
    """
    if tp_size < 1:
        raise MaskproError(f"tensor-parallel size {tp_size} must be at least 1")
    meta = source if isinstance(source, MaskproMeta) else read_maskpro_metadata(source)
    packed = packed or DEFAULT_PACKED
    fused_of = {shard: fused for fused, shards in packed.items() for shard in shards}
    plans: dict[str, LayerPlan] = {}
    for name in meta.targets:
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}.{fused_of[leaf]}" if leaf in fused_of and parent else name
        if prefix in plans:
            continue
        plan = target_plan(prefix, meta.targets, packed)
        shape = meta.shapes.get(name)
        if plan.sparse and shape is not None:
            k = shape[1]
            row = prefix.rpartition(".")[2] in ROW_PARALLEL
            if row and k % tp_size:
                plan = LayerPlan(False, f"K={k} does not split over tensor-parallel size {tp_size}")
            else:
                plan = shard_plan(k // tp_size if row else k, [shape[0]], k)
        plans[prefix] = plan
    return plans
