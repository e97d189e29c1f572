"""vLLM plugin: the vLLM-independent decisions on real maskpro folders, the custom-op wiring with reference
kernels, and a one-line error without vLLM. Tests that need vLLM or maskpro's real kernels skip, saying why."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskpro.artifacts import save_pruned
from maskpro.errors import MaskproError
from maskpro.export.vllm import write_vllm_checkpoint
from maskpro.models import tiny_llama
from maskpro.nm import NM, topn_mask
from maskpro.oneshot import magnitude_prune
from maskpro.serve import vllm_plugin as vp

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vLLM is not installed here (CPU-only machine); needs pip install vllm==0.26.0 on a Linux GPU host"
LAYERS = 2
PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _prune(out: Path, nm: NM = NM(2, 4), seed: int = 0, targets: list[str] | None = None) -> Path:
    model = tiny_llama(seed=seed, hidden=64, layers=LAYERS, intermediate=128)
    masks = magnitude_prune(model, nm, targets).masks
    return save_pruned(model, None, out, masks, nm, "magnitude")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    return _prune(tmp_path_factory.mktemp("plugin") / "tiny-2of4")


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory) -> Path:
    """The folder vLLM would serve: maskpro-export --engine vllm output."""
    return write_vllm_checkpoint(pruned, tmp_path_factory.mktemp("plugin-vllm") / "tiny-vllm")


@pytest.fixture(scope="module")
def weights(pruned) -> dict[str, torch.Tensor]:
    return load_file(str(pruned / "model.safetensors"))


# ------------------------------------------------------------------------------------------ metadata

def test_reads_real_pruned_and_exported_folders(pruned, exported):
    meta = vp.read_maskpro_metadata(pruned)
    assert (meta.n, meta.m, meta.method) == (2, 4, "magnitude") and meta.fits_24
    expected = {f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PER_LAYER}
    assert set(meta.targets) == expected  # lm_head and embeddings are never targets
    assert meta.shapes["model.layers.0.mlp.down_proj"] == (64, 128)
    again = vp.read_maskpro_metadata(exported)  # cross-checked against config.json's "maskpro" block
    assert again == meta
    assert vp.config_block(json.loads((exported / "config.json").read_text()))["num_targets"] == len(expected)
    assert vp.read_maskpro_metadata(json.loads((pruned / "maskpro.json").read_text())) == meta


def test_config_dicts_without_targets_defer_to_the_folder(exported):
    config = json.loads((exported / "config.json").read_text())
    assert vp.meta_from_dict({"quant_method": "maskpro"}) is None
    assert vp.meta_from_dict(config) is None
    with pytest.raises(MaskproError, match="config.json's summary block"):
        vp.read_maskpro_metadata(config)
    with_targets = {"quant_method": "maskpro", "n": 2, "m": 4, "targets": ["model.layers.0.mlp.up_proj"]}
    assert vp.meta_from_dict(with_targets).targets == ("model.layers.0.mlp.up_proj",)


def test_bad_sources_give_one_line_errors(tmp_path, exported):
    with pytest.raises(MaskproError, match="not a local folder") as e:
        vp.read_maskpro_metadata(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(MaskproError, match="not a maskpro checkpoint"):
        vp.read_maskpro_metadata(tmp_path / "plain")
    with pytest.raises(MaskproError, match="no list of target"):
        vp.meta_from_dict({"n": 2, "m": 4, "targets": []})
    with pytest.raises(MaskproError, match="integer n and m"):
        vp.meta_from_dict({"targets": ["a"]})
    edited = tmp_path / "edited"
    edited.mkdir()
    meta = json.loads((exported / "maskpro.json").read_text())
    dropped = meta["targets"][-1]
    (edited / "maskpro.json").write_text(json.dumps({**meta, "targets": meta["targets"][:-1],
                                                     "shapes": {k: v for k, v in meta["shapes"].items() if k != dropped}}))
    (edited / "config.json").write_text((exported / "config.json").read_text())
    with pytest.raises(MaskproError, match="counts 14 targets"):
        vp.read_maskpro_metadata(edited)


def test_pattern_compatibility_with_2_of_4():
    assert [vp.fits_24(n, m) for n, m in [(2, 4), (1, 4), (1, 2), (2, 8), (1, 8), (0, 4)]] == [True] * 6
    assert [vp.fits_24(n, m) for n, m in [(3, 4), (4, 8), (2, 3), (2, 2), (5, 4)]] == [False] * 5


def test_override_hook_claims_only_maskpro_quant_configs():
    assert vp.claims_quant_config({"quant_method": "maskpro"})
    assert vp.claims_quant_config({"quant_method": "MaskPro"})  # vLLM lower-cases, be as lenient
    assert not vp.claims_quant_config({"quant_method": "compressed-tensors"})
    assert not vp.claims_quant_config(None)


# ------------------------------------------------------------------------------- per-layer decisions

def test_vllm_prefixes_map_to_hf_targets(pruned):
    targets = vp.read_maskpro_metadata(pruned).targets
    assert vp.hf_module_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    for prefix in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj",
                   "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        assert vp.target_plan(prefix, targets) == vp.LayerPlan(True), prefix
    for prefix in ("lm_head", "model.embed_tokens", "model.layers.2.mlp.down_proj"):
        assert vp.target_plan(prefix, targets).reason == vp.NOT_TARGET, prefix
    # A model class's own mapping (vLLM fills packed_modules_mapping) wins over the Llama default.
    assert vp.target_plan("model.layers.0.mlp.fused", targets,
                          {"fused": ["gate_proj", "up_proj", "down_proj"]}).sparse
    # A target stored fused on disk under vLLM's name (Phi-3 style) matches directly.
    assert vp.target_plan("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.qkv_proj"]).sparse


def test_partly_pruned_fused_layer_stays_dense(tmp_path):
    folder = _prune(tmp_path / "partial", targets=["*.q_proj", "*.k_proj", "*.mlp.*"])
    plan = vp.target_plan("model.layers.0.self_attn.qkv_proj", vp.read_maskpro_metadata(folder).targets)
    assert not plan.sparse and "un-pruned shards (v_proj)" in plan.reason


def test_tensor_parallel_shards_must_keep_whole_groups():
    assert vp.shard_plan(64, [192], 128).sparse                      # row-parallel K=128 over TP 2
    plan = vp.shard_plan(6, [64], 24)                                 # K=24 over TP 4: 6 per rank
    assert not plan.sparse and "shard 6 of 24" in plan.reason
    assert not vp.shard_plan(30, [8], 30).sparse                      # not a 2:4 layer at all
    assert not vp.shard_plan(64, [0, 32], 64).sparse


def test_checkpoint_plan_previews_tp_fallbacks(pruned, tmp_path):
    plans = vp.checkpoint_plan(pruned, tp_size=2)
    assert set(plans) == {f"model.layers.{i}.{p}" for i in range(LAYERS)
                          for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert all(p.sparse for p in plans.values())
    # TP 32: o_proj K=64 -> 2 per rank, down_proj K=128 -> 4 per rank; column-parallel layers keep K.
    plans = vp.checkpoint_plan(pruned, tp_size=32)
    assert not plans["model.layers.0.self_attn.o_proj"].sparse
    assert plans["model.layers.0.mlp.down_proj"].sparse and plans["model.layers.0.self_attn.qkv_proj"].sparse
    assert "does not split" in vp.checkpoint_plan(pruned, tp_size=3)["model.layers.0.self_attn.o_proj"].reason


def test_loaded_weights_are_checked_for_2_of_4(weights):
    for key, w in weights.items():
        if key.endswith("_proj.weight"):
            assert vp.check_24(w, key) is None, key
    w = weights["model.layers.1.mlp.down_proj.weight"].clone()
    w[5, 8:12] = 1.0
    assert "1 groups of 4 with more than 2" in vp.check_24(w, "down_proj")
    assert "K=6" in vp.check_24(torch.zeros(2, 6))


def test_final_decision_needs_cuda_and_honours_the_dense_switch(weights, monkeypatch):
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    monkeypatch.delenv(vp.DENSE_ENV, raising=False)
    plan = vp.decide_sparse(w, vp.LayerPlan(True), "q_proj")
    assert not plan.sparse and "need CUDA" in plan.reason
    assert vp.decide_sparse(w, vp.LayerPlan(True), allow_cpu=True).sparse
    assert vp.decide_sparse(w, vp.LayerPlan(False, "why"), allow_cpu=True).reason == "why"
    monkeypatch.setenv(vp.DENSE_ENV, "1")
    assert vp.decide_sparse(w, vp.LayerPlan(True), allow_cpu=True).reason == f"{vp.DENSE_ENV} is set"


# --------------------------------------------------------------------------- kernels (reference stand-in)

def _ref_compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test stand-in for compress_24: the 2 kept values per group of 4 and their positions."""
    out, k = weight.shape
    keep = topn_mask((weight != 0).to(torch.int8) * 2 + 1, NM(2, 4))
    values = weight[keep].reshape(out, k // 2)
    meta = keep.reshape(out, k // 4, 4).nonzero()[:, 2].to(torch.uint8).reshape(out, k // 4, 2)
    return values, meta


def _ref_linear(x, values, meta, bias, out_features, in_features):
    dense = torch.zeros(out_features, in_features // 4, 4, dtype=values.dtype)
    dense.scatter_(2, meta.long(), values.reshape(out_features, in_features // 4, 2))
    return torch.nn.functional.linear(x, dense.reshape(out_features, in_features), bias)


@pytest.fixture
def ref_kernels(monkeypatch):
    monkeypatch.setattr(vp, "_kernels", lambda: (_ref_compress, _ref_linear))


def test_custom_op_matches_dense_on_real_weights(weights, ref_kernels):
    torch.manual_seed(0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = weights[f"{name}.weight"]
        values, meta = vp.compress_weight(w)
        x = torch.randn(5, w.shape[1])
        bias = torch.randn(w.shape[0])
        got = vp.sparse_linear_24(x, values, meta, bias, *w.shape)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias))
        assert torch.equal(vp.sparse_linear_24(x, values, meta, None, *w.shape), x @ w.T)
    with pytest.raises(MaskproError, match="expects 128"):
        vp.sparse_linear_24(torch.randn(2, 64), values, meta, None, 64, 128)


def test_custom_op_is_opaque_to_torch_compile(weights, ref_kernels):
    """vLLM compiles the model; the op's fake impl must give shapes so the kernel choice stays at run time."""
    w = weights["model.layers.0.mlp.gate_proj.weight"]
    values, meta = vp.compress_weight(w)
    op = vp._register_op()
    torch.library.opcheck(op, (torch.randn(3, w.shape[1]), values, meta, None, *w.shape),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda x: vp.sparse_linear_24(x, values, meta, None, *w.shape), backend="eager",
                       fullgraph=True, dynamic=True)
    for tokens in (1, 7):
        x = torch.randn(tokens, w.shape[1])
        torch.testing.assert_close(fn(x), x @ w.T)


def test_mma_op_matches_dense_and_is_opaque_to_torch_compile(weights):
    """The op over the mma.sp fragment order: on CPU (and past 16 tokens) it expands the same bytes."""
    from maskpro.serve.sparse24 import compress_24
    from maskpro.serve.sparse_mma import mma_layout

    w = weights["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)  # its in_features tile by 128
    tiles, positions = mma_layout(*compress_24(w))
    op = vp._register_mma_op()
    torch.library.opcheck(op, (torch.randn(3, w.shape[1], dtype=w.dtype), tiles, positions, None, *w.shape),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda x: vp.sparse_linear_24_mma(x, tiles, positions, None, *w.shape), backend="eager",
                       fullgraph=True, dynamic=True)
    bias = torch.randn(w.shape[0], dtype=w.dtype)
    for tokens in (1, 20):
        x = torch.randn(tokens, w.shape[1], dtype=w.dtype)
        assert torch.equal(fn(x), x @ w.T)
        torch.testing.assert_close(vp.sparse_linear_24_mma(x, tiles, positions, bias, *w.shape), x @ w.T + bias)
    with pytest.raises(MaskproError, match=f"expects {w.shape[1]}"):
        vp.sparse_linear_24_mma(torch.randn(2, 8, dtype=w.dtype), tiles, positions, None, *w.shape)


def test_compress_output_shape_is_checked(monkeypatch):
    monkeypatch.setattr(vp, "_kernels", lambda: (lambda w: (w, w), _ref_linear))
    with pytest.raises(MaskproError, match="expected \\(8, 8\\)"):
        vp.compress_weight(torch.zeros(8, 16))


def test_missing_kernels_are_a_one_line_error(monkeypatch):
    from maskpro.serve import sparse_linear as kernels

    monkeypatch.delattr(kernels, "compress_24")  # an install whose runtime lacks the kernels
    with pytest.raises(MaskproError, match="no compress_24/sparse_linear") as e:
        vp.compress_weight(torch.zeros(4, 8))
    assert "\n" not in str(e.value)


def test_real_maskpro_kernels_round_trip(weights):
    w = weights["model.layers.0.mlp.up_proj.weight"]
    values, meta = vp.compress_weight(w)  # fails, rather than skips, if the runtime lost its kernels
    x = torch.randn(4, w.shape[1])
    torch.testing.assert_close(vp.sparse_linear_24(x, values, meta, None, *w.shape), x @ w.T)


# ---------------------------------------------------------------------------------------------- vLLM

def test_module_imports_without_vllm():
    code = ("import sys, maskpro.serve.vllm_plugin as p; assert 'vllm' not in sys.modules, 'vllm imported'; "
            "print(p.METHOD)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "maskpro"


def test_register_without_vllm_names_the_install_command():
    """In a child process where ``import vllm`` fails (its ``sys.modules`` entry is None), so it runs whether or
    not vLLM is installed: ``register`` and the lazy class names say how to install it, in one line."""
    code = ("import json, sys; sys.modules['vllm'] = None\n"
            "import maskpro.serve.vllm_plugin as vp\n"
            "from maskpro.errors import MaskproError\n"
            "out = {}\n"
            "try:\n    vp.register()\nexcept MaskproError as e:\n    out['register'] = str(e)\n"
            "try:\n    vp.MaskproVllmConfig\nexcept AttributeError as e:\n    out['attribute'] = str(e)\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "pip install vllm==0.26.0" in out["register"] and "\n" not in out["register"]
    assert "pip install vllm" in out["attribute"]


def test_entry_point_is_declared():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "maskpro"]
    assert [ep.value for ep in eps] == ["maskpro.serve.vllm_plugin:register"], "reinstall: pip install -e ."


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_register_with_vllm(exported):  # pragma: no cover - runs only where vLLM is installed
    from vllm.model_executor.layers.quantization import get_quantization_config

    vp.register()
    vp.register()  # re-entrant, as vLLM's plugin docs require
    cls = get_quantization_config("maskpro")
    assert cls is vp.MaskproVllmConfig
    assert cls.get_config_filenames() == ["maskpro.json"]
    config = cls.from_config(json.loads((exported / "maskpro.json").read_text()))
    assert config.get_name() == "maskpro" and len(config.targets) == 14
    assert cls.override_quantization_method({"quant_method": "maskpro"}, None) == "maskpro"
    assert cls.override_quantization_method({"quant_method": "fp8"}, "maskpro") is None
    deferred = cls.from_config({"quant_method": "maskpro"})
    deferred.maybe_update_config(str(exported))
    assert deferred.targets == config.targets
    with pytest.raises(MaskproError, match="not 2:4"):
        cls.from_config({"n": 4, "m": 8, "targets": ["a"]})


def _vllm_config(exported: Path):
    vp.register()
    config = vp.MaskproVllmConfig.from_config(json.loads((exported / "maskpro.json").read_text()))
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                     "gate_up_proj": ["gate_proj", "up_proj"]}  # what vLLM's Llama sets
    return config


def _fake_tp(monkeypatch, rank: int, size: int) -> None:
    """Tensor-parallel rank and size without torch.distributed (vLLM's layers and parameters ask for them)."""
    import vllm.model_executor.layers.linear as vllm_linear
    import vllm.model_executor.parameter as vllm_parameter

    for module in (vllm_linear, vllm_parameter):
        monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)


@pytest.fixture
def tp1(monkeypatch):
    if HAS_VLLM:
        _fake_tp(monkeypatch, 0, 1)


@pytest.fixture
def cpu_sparse(monkeypatch, ref_kernels, tp1):
    """Let the sparse path run on CPU with the reference kernels (vLLM's own layer code is still real)."""
    decide = vp.decide_sparse
    monkeypatch.setattr(vp, "decide_sparse", lambda w, plan, name="weight", **kw: decide(w, plan, name, allow_cpu=True))


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_linear_layers_load_compress_and_match_dense(exported, weights, cpu_sparse):  # pragma: no cover
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear, UnquantizedLinearMethod)

    config = _vllm_config(exported)
    w = {k.removesuffix(".weight"): v for k, v in weights.items()}
    pre = "model.layers.1"
    qkv = QKVParallelLinear(64, 16, 4, 2, bias=False, quant_config=config, prefix=f"{pre}.self_attn.qkv_proj",
                            disable_tp=True, params_dtype=torch.float32)
    for shard in "qkv":
        qkv.weight.weight_loader(qkv.weight, w[f"{pre}.self_attn.{shard}_proj"], shard)
    gate_up = MergedColumnParallelLinear(64, [128, 128], bias=False, quant_config=config,
                                         prefix=f"{pre}.mlp.gate_up_proj", disable_tp=True, params_dtype=torch.float32)
    for i, shard in enumerate(("gate_proj", "up_proj")):
        gate_up.weight.weight_loader(gate_up.weight, w[f"{pre}.mlp.{shard}"], i)
    down = RowParallelLinear(128, 64, bias=False, quant_config=config, prefix=f"{pre}.mlp.down_proj",
                             disable_tp=True, params_dtype=torch.float32)
    down.weight.weight_loader(down.weight, w[f"{pre}.mlp.down_proj"])
    other = RowParallelLinear(128, 64, bias=False, quant_config=config, prefix="model.layers.7.mlp.down_proj",
                              disable_tp=True, params_dtype=torch.float32)
    assert isinstance(other.quant_method, UnquantizedLinearMethod)
    expected = {qkv: torch.cat([w[f"{pre}.self_attn.{s}_proj"] for s in "qkv"]),
                gate_up: torch.cat([w[f"{pre}.mlp.gate_proj"], w[f"{pre}.mlp.up_proj"]]),
                down: w[f"{pre}.mlp.down_proj"]}
    torch.manual_seed(0)
    for layer, dense in expected.items():
        assert type(layer.quant_method).__name__ == "MaskproLinearMethod"
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.maskpro_sparse and not hasattr(layer, "weight")
        assert layer.maskpro_values.shape == (dense.shape[0], dense.shape[1] // 2)
        x = torch.randn(3, dense.shape[1])
        out, _ = layer(x)
        torch.testing.assert_close(out, x @ dense.T)
    assert config.summary() == {"sparse": 3, "dense_targets": 0, "not_targets": 1}


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_tensor_parallel_shards(exported, weights, cpu_sparse, monkeypatch):  # pragma: no cover
    import vllm.model_executor.layers.linear as vllm_linear

    _fake_tp(monkeypatch, 1, 2)
    config = _vllm_config(exported)
    name = "model.layers.0.mlp.down_proj"
    dense = weights[f"{name}.weight"]
    down = vllm_linear.RowParallelLinear(128, 64, bias=False, quant_config=config, prefix=name,
                                         reduce_results=False, params_dtype=torch.float32)
    down.weight.weight_loader(down.weight, dense)  # rank 1 of 2 keeps K columns 64..127
    down.quant_method.process_weights_after_loading(down)
    x = torch.randn(2, 64)
    torch.testing.assert_close(down(x)[0], x @ dense[:, 64:].T)

    _fake_tp(monkeypatch, 1, 4)
    tiny = {"n": 2, "m": 4, "targets": ["model.layers.0.mlp.down_proj"]}
    config = vp.MaskproVllmConfig.from_config(tiny)
    odd = vllm_linear.RowParallelLinear(24, 8, bias=False, quant_config=config, prefix=name,
                                        reduce_results=False, params_dtype=torch.float32)
    odd.weight.data.zero_()
    odd.quant_method.process_weights_after_loading(odd)
    assert not odd.maskpro_sparse and "K shard 6 of 24" in config.decisions[name].reason
    torch.testing.assert_close(odd(torch.ones(1, 6))[0], torch.zeros(1, 8))


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_dense_fallback_on_cpu_and_non_linear_layers(exported, weights, tp1):  # pragma: no cover
    from vllm.model_executor.layers.linear import RowParallelLinear

    config = _vllm_config(exported)
    name = "model.layers.0.self_attn.o_proj"
    o = RowParallelLinear(64, 64, bias=False, quant_config=config, prefix=name, disable_tp=True,
                          params_dtype=torch.float32)
    o.weight.weight_loader(o.weight, weights[f"{name}.weight"])
    o.quant_method.process_weights_after_loading(o)  # CPU tensors: 2:4 kernels need CUDA
    assert not o.maskpro_sparse and "need CUDA" in config.decisions[name].reason
    x = torch.randn(2, 64)
    torch.testing.assert_close(o(x)[0], x @ weights[f"{name}.weight"].T)
    assert config.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_finds_the_config_both_ways(exported):  # pragma: no cover
    """vLLM's own get_quant_config: --quantization maskpro globs maskpro.json; hf-overrides defers to it."""
    import pickle
    from types import SimpleNamespace

    from transformers import AutoConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    vp.register()
    hf_config = AutoConfig.from_pretrained(str(exported))
    model_config = SimpleNamespace(quantization="maskpro", quantization_config=None, hf_config=hf_config,
                                   hf_overrides={}, model=str(exported), revision=None)
    config = get_quant_config(model_config, SimpleNamespace(download_dir=None))
    assert isinstance(config, vp.MaskproVllmConfig) and len(config.targets) == 14
    again = pickle.loads(pickle.dumps(config))  # vLLM ships its config to worker processes
    assert type(again) is vp.MaskproVllmConfig and again.targets == config.targets
    code = "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); print(type(c).__name__, len(c.targets))"
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(config), capture_output=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.decode().split()[-2:] == ["MaskproVllmConfig", "14"], out.stderr.decode()[-2000:]

    hf_config.quantization_config = {"quant_method": "maskpro"}  # what --hf-overrides would set
    deferred = get_quant_config(model_config, SimpleNamespace(download_dir=None))
    assert deferred.meta is None
    deferred.maybe_update_config(str(exported), hf_config=hf_config)
    assert deferred.targets == config.targets
