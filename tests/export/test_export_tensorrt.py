"""TensorRT / TensorRT-LLM export: the pure helpers on CPU, the builders where the engines exist.

The tiny ONNX graph below is a real, runnable mini language model with the exporter's input/output contract
(checked with onnx.checker and run with ONNX Runtime). TensorRT and TensorRT-LLM cannot be installed on this
machine; their builds are skipped with the reason, and their "missing engine" errors are tested here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from maskpro.errors import MaskproError
from maskpro.export.tensorrt import (
    PrecisionPlan,
    SparsityReport,
    TrtBuildConfig,
    build_dense_and_sparse,
    build_engine,
    inspector_summary,
    match_candidates,
    onnx_float_dtype,
    onnx_has_qdq,
    parse_inspector_json,
    parse_sparsity_log,
    precision_plan,
    profile_shapes,
    trt_sparse_eligible,
    trtexec_command,
)
from maskpro.export.trtllm import (
    build_trtllm_engine,
    check_trtllm_checkpoint,
    checkpoint_tp_size,
    tp_pattern_problems,
    trtllm_build_command,
    write_trtllm_checkpoint,
)
from maskpro.nm import NM, project

onnx = pytest.importorskip("onnx", reason="the ONNX helpers need the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

VOCAB, HIDDEN, KV_HEADS, HEAD_DIM, LAYERS = 16, 8, 2, 4, 2


def _names(kind: str) -> dict[str, str]:
    if kind == "optimum":  # the names Optimum-style exports use
        return {"batch": "batch_size", "sequence": "sequence_length", "past": "past_sequence_length",
                "total": "past_sequence_length + sequence_length"}
    return {"batch": "batch", "sequence": "sequence", "past": "past_sequence", "total": "total_sequence"}


def tiny_lm(dims: str = "maskpro", dtype=TensorProto.FLOAT, extra_input: bool = False) -> onnx.ModelProto:
    """A runnable mini LM: embeddings + positions -> 2:4 MatMul -> logits (+ mask sum), KV passed through."""
    n = _names(dims) if dims != "anonymous" else {k: "" for k in ("batch", "sequence", "past", "total")}
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[dtype]

    def vi(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, [s if s != "" else None for s in shape])

    rng = np.random.default_rng(0)
    w = project(torch.from_numpy(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)), NM(2, 4))  # (out, K)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np_dtype), "embed"),
             numpy_helper.from_array(rng.standard_normal((64, HIDDEN)).astype(np_dtype), "pos_embed"),
             numpy_helper.from_array(w.numpy().T.astype(np_dtype).copy(), "lm_head.weight_t"),  # MatMul B = W.T
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["tok"]),
             helper.make_node("Gather", ["pos_embed", "position_ids"], ["pos"]),
             helper.make_node("Add", ["tok", "pos"], ["h"]),
             helper.make_node("MatMul", ["h", "lm_head.weight_t"], ["raw_logits"], name="/lm_head/MatMul"),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=dtype),
             helper.make_node("ReduceSum", ["mask_f", "axis1"], ["mask_sum"], keepdims=1),
             helper.make_node("Unsqueeze", ["mask_sum", "axis2"], ["mask_sum3"]),
             helper.make_node("Add", ["raw_logits", "mask_sum3"], ["logits"])]
    inputs = [vi("input_ids", TensorProto.INT64, [n["batch"], n["sequence"]]),
              vi("attention_mask", TensorProto.INT64, [n["batch"], n["total"]]),
              vi("position_ids", TensorProto.INT64, [n["batch"], n["sequence"]])]
    outputs = [vi("logits", dtype, [n["batch"], n["sequence"], VOCAB])]
    for i in range(LAYERS):
        for kv in ("key", "value"):
            inputs.append(vi(f"past_key_values.{i}.{kv}", dtype, [n["batch"], KV_HEADS, n["past"], HEAD_DIM]))
            outputs.append(vi(f"present.{i}.{kv}", dtype, [n["batch"], KV_HEADS, n["past"], HEAD_DIM]))
            nodes.append(helper.make_node("Identity", [f"past_key_values.{i}.{kv}"], [f"present.{i}.{kv}"]))
    if extra_input:
        inputs.append(vi("pixel_values", dtype, ["num_images", 3, 4, 4]))
        outputs.append(vi("pixels_out", dtype, ["num_images", 3, 4, 4]))
        nodes.append(helper.make_node("Identity", ["pixel_values"], ["pixels_out"]))
    graph = helper.make_graph(nodes, "tiny_lm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


CFG = TrtBuildConfig(batch=(1, 2, 4), sequence=(1, 16, 64), past=(0, 32, 128))


def test_profile_shapes_for_the_exporter_contract():
    shapes = profile_shapes(tiny_lm(), CFG)
    assert set(shapes) == {"input_ids", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")}
    assert shapes["input_ids"] == ((1, 1), (2, 16), (4, 64))
    assert shapes["position_ids"] == shapes["input_ids"]
    # the mask covers past + new tokens in every one of min / opt / max
    assert shapes["attention_mask"] == ((1, 1), (2, 48), (4, 192))
    # static KV heads and head_dim are kept, past may be empty (prefill)
    assert shapes["past_key_values.1.value"] == ((1, KV_HEADS, 0, HEAD_DIM), (2, KV_HEADS, 32, HEAD_DIM),
                                                 (4, KV_HEADS, 128, HEAD_DIM))


def test_profile_shapes_run_through_onnxruntime():
    """The min and max shapes are ones the graph really accepts (ONNX Runtime runs them)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the tiny graph")
    model = tiny_lm()
    shapes = profile_shapes(model, CFG)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for which in (0, 2):
        feeds = {}
        for name, s in shapes.items():
            shape = s[which]
            if name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(shape[1]) % 64, shape).astype(np.int64)
            elif name in ("input_ids", "attention_mask"):
                feeds[name] = np.ones(shape, dtype=np.int64)
            else:
                feeds[name] = np.zeros(shape, dtype=np.float32)
        logits = session.run(["logits"], feeds)[0]
        assert logits.shape == (shapes["input_ids"][which][0], shapes["input_ids"][which][1], VOCAB)


def test_profile_shapes_understands_optimum_names_and_unnamed_axes():
    expected = profile_shapes(tiny_lm(), CFG)
    assert profile_shapes(tiny_lm("optimum"), CFG) == expected
    assert profile_shapes(tiny_lm("anonymous"), CFG) == expected  # falls back to the known axes


def test_profile_shapes_refuses_an_unknown_dynamic_dim():
    with pytest.raises(MaskproError, match=r"pixel_values axis 0 is dynamic \(num_images\)") as e:
        profile_shapes(tiny_lm(extra_input=True), CFG)
    assert "\n" not in str(e.value)


def test_profile_shapes_reads_a_path_without_its_weights(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(tiny_lm(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    (tmp_path / "model.onnx.data").unlink()  # only the graph is read
    assert profile_shapes(path, CFG) == profile_shapes(tiny_lm(), CFG)
    with pytest.raises(MaskproError, match="does not exist"):
        profile_shapes(tmp_path / "missing.onnx", CFG)


@pytest.mark.parametrize("kwargs,msg", [({"batch": (2, 1, 4)}, "batch must be"), ({"sequence": (0, 1, 2)}, "sequence"),
                                        ({"past": (0, 1)}, "past must be"), ({"precision": "int4"}, "not one of"),
                                        ({"optimization_level": 6}, "0..5"), ({"log_level": "loud"}, "log_level")])
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(MaskproError, match=msg):
        TrtBuildConfig(**kwargs)


def test_onnx_dtype_and_qdq_detection():
    assert onnx_float_dtype(tiny_lm()) == "fp32"
    assert onnx_float_dtype(tiny_lm(dtype=TensorProto.FLOAT16)) == "fp16"
    assert not onnx_has_qdq(tiny_lm())
    m = tiny_lm()
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
                                numpy_helper.from_array(np.array(0, dtype=np.int8), "z")])
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["embed", "s", "z"], ["embed_q"]))
    assert onnx_has_qdq(m)


def test_precision_plan_per_tensorrt_version():
    # 10.x: an fp32 graph is lowered with the (deprecated) weak-typing flag; an fp16 graph builds strongly typed
    weak = precision_plan("fp16", "fp32", False, 10)
    assert isinstance(weak, PrecisionPlan) and not weak.strongly_typed and weak.builder_flags == ("FP16",)
    assert precision_plan("bf16", "fp32", False, 10).builder_flags == ("BF16",)
    assert precision_plan("fp16", "fp16", False, 10).strongly_typed
    assert precision_plan("fp16", "fp16", False, 11).builder_flags == ()
    # 11.x has no FP16 flag: the ONNX dtype is the engine dtype
    with pytest.raises(MaskproError, match="export the ONNX with --dtype fp16"):
        precision_plan("fp16", "fp32", False, 11)
    with pytest.raises(MaskproError, match="Q/DQ"):
        precision_plan("int8", "fp32", False, 10)
    assert precision_plan("int8", "fp32", True, 11).strongly_typed
    with pytest.raises(MaskproError, match="too old"):
        precision_plan("fp16", "fp16", False, 8)
    with pytest.raises(MaskproError, match="weights are fp16 but precision bf16"):
        precision_plan("bf16", "fp16", False, 10)


@pytest.mark.parametrize("shape,dtype,ok,why", [
    ((2048, 2048), "fp16", True, "eligible"),
    ((2048, 2048), torch.float16, True, "eligible"),
    ((2048, 2048), "int8", True, "eligible"),
    ((2048, 2048), "bf16", True, "bf16 is not named"),
    ((2048, 2048), "fp32", False, "FP16 or INT8"),
    ((2048, 2046), "fp16", False, "multiple of 4"),
    ((64, 576), "fp16", True, "small layer"),
])
def test_trt_sparse_eligible(shape, dtype, ok, why):
    eligible, reason = trt_sparse_eligible(*shape, dtype)
    assert eligible is ok and why in reason


def test_trt_sparse_eligible_needs_ampere():
    assert trt_sparse_eligible(2048, 2048, "fp16", compute_capability=(7, 5)) == (
        False, "sm_75 has no sparse tensor cores (TensorRT sparse tactics need sm80+)")
    assert trt_sparse_eligible(2048, 2048, "fp16", compute_capability=(9, 0))[0]
    with pytest.raises(MaskproError, match="unknown dtype"):
        trt_sparse_eligible(8, 8, "int3")


# A build log in the format trtexec prints (TensorRT Developer Guide, "Sparsity"; NVIDIA/TensorRT#2169,
# #4054), written for this test with names of the exporter's ONNX nodes, followed by a second build whose
# pair of lines must win. The raw-logger form has no "[I] [TRT]" prefix.
SAMPLE_LOG = """\
[09/16/2026-09:55:37] [I] [TRT] Detected 7 inputs and 5 output network tensors.
[09/16/2026-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math: /model/layers.0/mlp/up_proj/MatMul, /model/layers.0/mlp/down_proj/MatMul + /model/layers.0/Add_1, /lm_head/MatMul
[09/16/2026-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /model/layers.0/mlp/down_proj/MatMul + /model/layers.0/Add_1
[09/16/2026-09:55:38] [I] Engine built in 31.19 sec.
"""
SECOND_BUILD = [
    "[INFO] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3",
    "[INFO] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3",
]


def test_parse_sparsity_log():
    r = parse_sparsity_log(SAMPLE_LOG)
    assert r.logged
    assert r.eligible == ["/model/layers.0/mlp/up_proj/MatMul",
                          "/model/layers.0/mlp/down_proj/MatMul + /model/layers.0/Add_1", "/lm_head/MatMul"]
    assert r.picked == ["/model/layers.0/mlp/down_proj/MatMul + /model/layers.0/Add_1"]
    assert r.not_picked == ["/model/layers.0/mlp/up_proj/MatMul", "/lm_head/MatMul"]
    assert r.to_dict()["eligible"] == 3 and r.to_dict()["picked"] == 1
    last = parse_sparsity_log(SAMPLE_LOG.splitlines() + SECOND_BUILD)
    assert (last.eligible, last.picked, last.not_picked) == (["conv1", "conv2", "conv3"], ["conv2", "conv3"],
                                                              ["conv1"])


# The formats of logs users posted from real builds (layer lists shortened): trtexec 8.x with --verbose
# (NVIDIA/TensorRT#2169, 2022: eligible MatMuls and a Gemm, none picked; #4054, 2024: fused "Conv + Relu"
# names), the Python logger of TensorRT 8.0 (NVIDIA/TensorRT#1403) and an empty pair (pytorch/TensorRT#1340).
PUBLIC_LOGS = {
    "trtexec-8.4-none-picked": (
        "[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, "
        "MatMul_69, Gemm_725\n"
        "[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:\n",
        ["Conv_22", "MatMul_51", "MatMul_69", "Gemm_725"], []),
    "trtexec-8.6-fused": (
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, "
        "Conv_619 + Relu_620, Conv_621 + Add_627 + Relu_628\n"
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
        "Conv_621 + Add_627 + Relu_628\n",
        ["MatMul_401", "Conv_619 + Relu_620", "Conv_621 + Add_627 + Relu_628"], ["Conv_621 + Add_627 + Relu_628"]),
    "python-logger-8.0": (
        "[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: Conv_0\n"
        "[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:\n",
        ["Conv_0"], []),
    "trtexec-empty": (
        "[09/16/2022-09:55:37] [I] [TRT] Total Activation Memory: 7864832\n"
        "[09/16/2022-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math:\n"
        "[09/16/2022-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:\n"
        "[09/16/2022-09:55:38] [I] Engine built in 31.1935 sec.\n",
        [], []),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_LOGS))
def test_parse_sparsity_log_on_public_log_formats(name):
    text, eligible, picked = PUBLIC_LOGS[name]
    r = parse_sparsity_log(text)
    assert r.logged and r.eligible == eligible and r.picked == picked
    assert r.not_picked == [n for n in eligible if n not in picked]


def test_parse_sparsity_log_empty_and_missing():
    empty = parse_sparsity_log(["[I] [TRT] (Sparsity) Layers eligible for sparse math:",
                                "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:"])
    assert empty.logged and empty.eligible == [] and empty.picked == []
    none = parse_sparsity_log("[I] [TRT] Total Activation Memory: 7864832\n")
    assert not none.logged and none.eligible == []
    half = parse_sparsity_log(SAMPLE_LOG.splitlines()[:2])  # eligible line only: the build did not finish
    assert not half.logged and len(half.eligible) == 3


# Inspector JSON written for this test in the documented format: the kDETAILED layer example of the TensorRT
# Developer Guide ("Engine Inspector"), the HasSparseWeights field, sparse tactic name and "\x1e"-joined
# Metadata quoted in NVIDIA/TensorRT#4020, and the Myelin layer type of trex's examples. The "gemm" layer's
# type string is illustrative; the parser does not depend on it.
SAMPLE_INSPECTOR = {
    "Layers": [
        {"Name": "/model/layers.0/mlp/down_proj/MatMul + /model/layers.0/Add_1", "LayerType": "gemm",
         "Inputs": [{"Name": "h", "Location": "Device", "Dimensions": [-1, -1, 1536],
                     "Format/Datatype": "N/A due to dynamic shapes"}],
         "Outputs": [{"Name": "o", "Location": "Device", "Dimensions": [-1, -1, 576],
                      "Format/Datatype": "N/A due to dynamic shapes"}],
         "Weights": {"Type": "Half", "Count": 884736}, "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_gemm_sparse_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "TacticValue": "0x1",
         "Metadata": "[ONNX Layer: /model/layers.0/mlp/down_proj/MatMul]\x1e[ONNX Layer: /model/layers.0/Add_1]"},
        {"Name": "Conv_276 + Add_277 + Relu_278", "LayerType": "CaskConvolution", "HasSparseWeights": 1,
         "Weights": {"Type": "Int8", "Count": 589824},
         "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs",
         "Metadata": "[ONNX Layer: Conv_276]"},
        {"Name": "Conv_0 + Relu_1", "LayerType": "CaskConvolution", "AllowSparse": 0,
         "TacticName": "trt_turing_cutlass_image_network_first_layer_hmma_fprop_f16f16f32_nhwc_nhwc"},
        {"Name": "{ForeignNode[/model/layers.1/self_attn/q_proj/MatMul.../model/norm/Mul_1]}",
         "LayerType": "Myelin", "TacticValue": "0x0000000000000000"},
    ],
    "Bindings": ["input_ids", "logits"],
}


def test_parse_inspector_json_detailed():
    layers = parse_inspector_json(json.dumps(SAMPLE_INSPECTOR))
    gemm, conv_dense_pick, first, myelin = layers
    assert gemm.has_sparse_weights and gemm.sparse_tactic and gemm.weights_type == "Half"
    assert gemm.onnx_layers == ["/model/layers.0/mlp/down_proj/MatMul", "/model/layers.0/Add_1"]
    assert conv_dense_pick.has_sparse_weights and not conv_dense_pick.sparse_tactic  # eligible, dense kernel won
    assert first.has_sparse_weights is False  # the 8.x "AllowSparse" spelling
    assert myelin.has_sparse_weights is None and not myelin.sparse_tactic
    s = inspector_summary(layers)
    assert s["with_sparse_weights"] == [gemm.name, conv_dense_pick.name]
    assert s["sparse_tactics"] == [gemm.name] and s["myelin_layers"] == 1 and s["detailed"]


def test_parse_inspector_json_names_only_and_garbage():
    layers = parse_inspector_json({"Layers": ["Conv_0 + Relu_1", "MaxPool_2"], "Bindings": ["x", "y"]})
    assert [l.name for l in layers] == ["Conv_0 + Relu_1", "MaxPool_2"]
    assert not inspector_summary(layers)["detailed"]
    with pytest.raises(MaskproError, match="not TensorRT inspector JSON"):
        parse_inspector_json('{"layers": []}')


# A real trtexec --exportLayerInfo file, built without --profilingVerbosity=detailed (names only), in the
# file's own formatting: farabimahmud/detr-logs-trtexec, detr-layer-info.json (DETR-ResNet50, INT8), its first
# ten and last layers kept. It holds fused "+" names, pointwise "PWN(...)" groups, a Myelin "ForeignNode"
# region and the "__myl_" kernels inside it, none of which carry a type or tactic at this verbosity.
PUBLIC_INSPECTOR_NAMES_ONLY = (
    '{"Layers": ["/model/model/Transpose_1_output_0"\n,"/model/model/Transpose_1_output_0_clone_1"\n'
    ',"/Constant_5_output_0"\n,"Reformatting CopyNode for Input Tensor 0 to PWN(PWN(/Sub), PWN(/Div))"\n'
    ',"PWN(PWN(/Sub), PWN(/Div))"\n'
    ',"/model/model/backbone/conv_encoder/model/layer1/0/conv3/Conv + onnx::Mul_4134 + '
    '/model/model/backbone/conv_encoder/model/layer1/0/bn3/Mul + onnx::Add_4136 + '
    '/model/model/backbone/conv_encoder/model/layer1/0/bn3/Add"\n'
    ',"Reformatting CopyNode for Input Tensor 1 to {ForeignNode[ONNXTRT_castHelper_772.../Gather_3]}"\n'
    ',"__myl_CastReshCast_myl816_0"\n,"__myl_MoveSlicSlicSlicSlic_myl816_1"\n,"/ArgMax"\n'
    ',"PWN(/Mul_2)"\n],\n"Bindings": ["image"\n,"boxes"\n,"logits"\n,"classes"\n]}\n')


def test_parse_inspector_json_on_a_public_names_only_file():
    layers = parse_inspector_json(PUBLIC_INSPECTOR_NAMES_ONLY)
    assert len(layers) == 11 and layers[5].name.count(" + ") == 4 and layers[-1].name == "PWN(/Mul_2)"
    assert all(l.layer_type is None and l.tactic is None and l.has_sparse_weights is None for l in layers)
    s = inspector_summary(layers)
    assert s == {"layers": 11, "detailed": False, "with_sparse_weights": [], "sparse_tactics": [],
                 "myelin_layers": 0}


def test_match_candidates_splits_fused_names():
    report = parse_sparsity_log(SAMPLE_LOG)
    m = match_candidates(["/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul",
                          "/model/layers.0/self_attn/q_proj/MatMul"], report)
    assert m == {"candidates": 3, "eligible": 2, "picked": 1,
                 "not_eligible": ["/model/layers.0/self_attn/q_proj/MatMul"]}
    assert match_candidates(["a"], SparsityReport())["not_eligible"] == ["a"]


def test_trtexec_command(tmp_path):
    cfg = TrtBuildConfig(workspace_bytes=4 << 30, timing_cache=tmp_path / "t.cache", batch=(1, 1, 2),
                         sequence=(1, 4, 8), past=(0, 4, 8))
    shapes = profile_shapes(tiny_lm(), cfg)
    weak = trtexec_command("m.onnx", tmp_path / "m.plan", cfg, shapes, precision_plan("fp16", "fp32", False, 10))
    assert "--fp16" in weak and "--sparsity=enable" in weak and "--stronglyTyped" not in weak
    assert "--memPoolSize=workspace:4096M" in weak and f"--timingCacheFile={tmp_path / 't.cache'}" in weak
    mins = next(a for a in weak if a.startswith("--minShapes="))
    assert "input_ids:1x1" in mins and "attention_mask:1x1" in mins and "past_key_values.0.key:1x2x0x4" in mins
    assert "attention_mask:2x16" in next(a for a in weak if a.startswith("--maxShapes="))
    strong = trtexec_command("m.onnx", "m.plan", TrtBuildConfig(sparse=False), {},
                             precision_plan("fp16", "fp16", False, 10))
    assert "--stronglyTyped" in strong and "--fp16" not in strong and "--sparsity=enable" not in strong
    assert "--stronglyTyped" not in trtexec_command("m.onnx", "m.plan", cfg, {},
                                                     precision_plan("fp16", "fp16", False, 11), trt_major=11)


# ----------------------------------------------------------------------------------- engine builders

def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except (ImportError, OSError):
        return False


@pytest.mark.skipif(_have("tensorrt") and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present, so the build does not stop early")
def test_build_engine_without_tensorrt_is_one_line_and_keeps_the_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(tiny_lm(), str(path))
    for call in (lambda: build_engine(path, tmp_path / "model.plan"),
                 lambda: build_dense_and_sparse(path, tmp_path / "engines")):
        with pytest.raises(MaskproError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "pip install tensorrt==" in msg and f"{path} is kept" in msg
        assert "not installed" in msg or "no CUDA GPU" in msg
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with pytest.raises(MaskproError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "x.plan")


@pytest.mark.gpu
@pytest.mark.skipif(not _have("tensorrt"), reason="TensorRT is not installed (pip install tensorrt on a GPU machine)")
def test_build_engine_on_gpu(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU for TensorRT")
    path = tmp_path / "model.onnx"
    onnx.save_model(tiny_lm(dtype=TensorProto.FLOAT16), str(path))
    cfg = TrtBuildConfig(batch=(1, 1, 2), sequence=(1, 4, 8), past=(0, 4, 8), timing_cache=tmp_path / "t.cache")
    report = build_engine(path, tmp_path / "model.plan", cfg)
    assert (tmp_path / "model.plan").stat().st_size == report["engine_bytes"] > 0
    assert (tmp_path / "t.cache").is_file() and (tmp_path / "model.report.json").is_file()
    assert report["sparsity"]["log"]["logged"]
    assert report["sparsity"]["onnx_2of4_matmuls"]["candidates"] == 1


# ----------------------------------------------------------------------------------------- TensorRT-LLM

SMOL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3}


def test_tp_pattern_problems():
    assert tp_pattern_problems(SMOL, 1) == []
    assert tp_pattern_problems(SMOL, 3) == []  # 576/3 = 192 and 1536/3 = 512 stay multiples of 4
    assert tp_pattern_problems(SMOL, 2) == ["9 attention heads / 3 KV heads do not split over tp 2"]
    odd = {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 40}
    assert tp_pattern_problems(odd, 2) == []
    assert tp_pattern_problems(odd, 4) == ["down_proj K=40 / tp 4 = 10 is not a multiple of 4"]
    assert tp_pattern_problems(dict(odd, intermediate_size=42), 4)[0] == "down_proj K=42 does not split into 4 " \
        "equal shards"
    assert "has no hidden_size" in tp_pattern_problems({"num_attention_heads": 4, "intermediate_size": 8}, 2)[0]


def test_trtllm_build_command():
    cmd = trtllm_build_command("ckpt", "engine", max_batch_size=4, max_input_len=512, max_seq_len=1024, tp=2)
    assert cmd[:5] == ["trtllm-build", "--checkpoint_dir", "ckpt", "--output_dir", "engine"]
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs["--max_batch_size"] == "4" and pairs["--max_input_len"] == "512"
    assert pairs["--max_seq_len"] == "1024" and pairs["--workers"] == "2"
    assert "--weight_sparsity" in cmd and cmd[cmd.index("--gemm_plugin") + 1] == "disable"
    dense = trtllm_build_command("ckpt", "engine", sparse=False)
    assert "--weight_sparsity" not in dense and "--gemm_plugin" not in dense
    forced = trtllm_build_command("ckpt", "engine", gemm_plugin="auto", timing_cache="t.cache")
    assert forced[forced.index("--gemm_plugin") + 1] == "auto" and "--input_timing_cache" in forced
    with pytest.raises(MaskproError, match="exceeds max_seq_len"):
        trtllm_build_command("c", "e", max_input_len=4096, max_seq_len=2048)
    with pytest.raises(MaskproError, match="tp must be >= 1"):
        trtllm_build_command("c", "e", tp=0)


def _fake_checkpoint(folder, tp=1, break_one=False):
    """A checkpoint-shaped folder (config.json + rank*.safetensors) as TensorRT-LLM writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM",
                                                    "mapping": {"world_size": tp, "tp_size": tp}}))
    for rank in range(tp):
        qkv = project(torch.randn(48, 32), NM(2, 4))
        if break_one and rank == 0:
            qkv[3, 4:8] = 1.0
        save_file({"transformer.layers.0.attention.qkv.weight": qkv.half(),
                   "transformer.layers.0.mlp.fc.weight": project(torch.randn(64, 32), NM(2, 4)).half(),
                   "transformer.layers.0.input_layernorm.weight": torch.ones(32).half(),
                   "transformer.vocab_embedding.weight": torch.randn(100, 32).half()},
                  str(folder / f"rank{rank}.safetensors"))
    return folder


def test_check_trtllm_checkpoint(tmp_path):
    good = check_trtllm_checkpoint(_fake_checkpoint(tmp_path / "good", tp=2))
    assert len(good["sparse"]) == 4 and good["broken"] == [] and len(good["dense"]) == 2
    bad = check_trtllm_checkpoint(_fake_checkpoint(tmp_path / "bad", break_one=True))
    assert bad["broken"] == ["rank0:transformer.layers.0.attention.qkv.weight"]
    assert checkpoint_tp_size(tmp_path / "good") == 2
    with pytest.raises(MaskproError, match="no rank"):
        check_trtllm_checkpoint(tmp_path)


@pytest.mark.skipif(_have("tensorrt_llm"), reason="tensorrt_llm is installed, so conversion does not stop early")
def test_write_trtllm_checkpoint_without_tensorrt_llm(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(SMOL))
    with pytest.raises(MaskproError) as e:
        write_trtllm_checkpoint(hf, tmp_path / "ckpt", "fp16")
    msg = str(e.value)
    assert "\n" not in msg and "pip install tensorrt-llm==" in msg and f"{hf} is kept" in msg
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(MaskproError, match="not one of fp16"):
        write_trtllm_checkpoint(hf, tmp_path / "ckpt", "int4")
    with pytest.raises(MaskproError, match="tensor parallelism 2 breaks"):
        write_trtllm_checkpoint(hf, tmp_path / "ckpt", "fp16", tp_size=2)


@pytest.mark.skipif(shutil.which("trtllm-build") is not None and torch.cuda.is_available(),
                    reason="trtllm-build and a GPU are present, so the build does not stop early")
def test_build_trtllm_engine_without_trtllm_build(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "ckpt", tp=2)
    with pytest.raises(MaskproError, match="written for tp 2, not 1"):
        build_trtllm_engine(ckpt, tmp_path / "engine", tp=1)
    with pytest.raises(MaskproError) as e:
        build_trtllm_engine(ckpt, tmp_path / "engine")
    assert "\n" not in str(e.value) and "pip install tensorrt-llm==" in str(e.value)
    assert not (tmp_path / "engine").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _have("tensorrt_llm"), reason="TensorRT-LLM is not installed (pip install tensorrt-llm on a "
                    "GPU machine)")
def test_trtllm_checkpoint_and_engine_on_gpu(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (pip install tensorrt-llm<=1.2.1)")
    if shutil.which("trtllm-build") is None:
        pytest.skip("this TensorRT-LLM has no trtllm-build (TensorRT backend removed)")
    ckpt = write_trtllm_checkpoint(tiny_model_dir, tmp_path / "ckpt", "fp16")
    report = build_trtllm_engine(ckpt["checkpoint"], tmp_path / "engine", max_input_len=32, max_seq_len=64)
    assert report["engine_bytes"] > 0 and (tmp_path / "engine" / "build.log").is_file()
