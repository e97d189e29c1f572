"""maskpro-export --engine onnx: a KV-cache graph, checked, and run in real onnxruntime sessions."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskpro.errors import PatternError
from maskpro.export.check import check_path
from maskpro.export.cli import export_main
from maskpro.export.onnx import DATA_FILE, ONNX_FILE, OnnxExportConfig, _session, export_onnx, onnx_step


@pytest.fixture(scope="module")
def exported(tiny_pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    return out, export_onnx(tiny_pruned, out, OnnxExportConfig(parity_prompt_tokens=48, parity_new_tokens=12))


def test_graph_has_kv_cache_io_and_external_weights(exported):
    out, report = exported
    model = onnx.load(str(out / ONNX_FILE), load_external_data=False)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outs = [o.name for o in model.graph.output]
    assert ins["input_ids"] == ["batch", "sequence"] and ins["attention_mask"] == ["batch", "total_sequence"]
    assert ins["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert outs[:3] == ["logits", "present.0.key", "present.0.value"] and len(outs) == 5
    assert (out / DATA_FILE).stat().st_size > 1_000_000 and (out / ONNX_FILE).stat().st_size < 200_000
    assert report["onnx_check"]["ok"] and report["onnx_check"]["layers"] == 14
    assert (out / "tokenizer.json").is_file() and (out / "maskpro.json").is_file()


def test_parity_with_pytorch_on_real_text(exported):
    out, report = exported
    p = json.loads((out / "export-report.json").read_text())["parity"]
    assert p == report["parity"]
    assert p["max_abs_logit_error"] < 1e-3 and p["prefill_argmax_agreement"] == 1.0
    assert p["greedy_identical"] and len(p["greedy_tokens_onnx"]) == 12


def test_left_padded_batch_matches_pytorch(exported, tiny_pruned):
    """Dynamic batch: two prompts of different lengths, left-padded, prefill then one cached decode step."""
    out, _ = exported
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pruned), dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is 5 tokens, padded on the left
    session = _session(out / ONNX_FILE)
    logits, past = onnx_step(session, 2, ids, mask, [], model.config, np.float32)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    real = mask.bool()
    assert np.abs(logits[real.numpy()] - ref.logits[real].numpy()).max() < 1e-3
    nxt = torch.tensor([[7], [11]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step, _ = onnx_step(session, 2, nxt, mask2, past, model.config, np.float32)
    with torch.no_grad():
        from maskpro.models import cache_kwarg

        ref2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1,
                     **{cache_kwarg(model): ref.past_key_values}).logits
    assert np.abs(step - ref2.numpy()).max() < 1e-3


def test_fp16_export_runs_in_onnxruntime(tiny_pruned, tmp_path):
    report = export_onnx(tiny_pruned, tmp_path / "fp16", OnnxExportConfig(dtype="fp16", parity_prompt_tokens=32,
                                                                          parity_new_tokens=6))
    model = onnx.load(str(tmp_path / "fp16" / ONNX_FILE), load_external_data=False)
    assert {i.data_type for i in model.graph.initializer if i.name.endswith(".T")} == {onnx.TensorProto.FLOAT16}
    par = report["parity"]
    # fp16 keeps 11 significant bits: a few units in the last place at the largest logit is rounding, more is a bug
    assert par["max_abs_logit_error"] <= 4 * 2**-11 * par["max_logit_magnitude"], par
    assert par["greedy_identical"] and par["prefill_argmax_agreement"] >= 0.95, par
    assert check_path(tmp_path / "fp16").ok


@pytest.mark.parametrize("engine", ["onnx", "trt", "vllm", "sparse24", "trtllm"])
def test_every_export_refuses_a_broken_pattern(tiny_pruned, break_pattern, tmp_path, capsys, engine):
    broken, layer, row = break_pattern(tiny_pruned)
    out = tmp_path / "out"
    assert export_main([str(broken), "--engine", engine, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{layer}: group {row * 128 // 4} (row {row}, columns 0..3)" in err
    assert not out.exists()


def test_trt_without_tensorrt_fails_before_the_onnx_export(tiny_pruned, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    out = tmp_path / "trt"
    t0 = time.perf_counter()
    assert export_main([str(tiny_pruned), "--engine", "trt", "--out", str(out), "--quiet", "--no-parity"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("maskpro-export: error: cannot build a TensorRT engine")
    assert "--engine onnx --dtype fp16" in err and not out.exists()
    assert time.perf_counter() - t0 < 5  # no ONNX export ran first


def test_failed_export_keeps_the_previous_output(exported, tiny_pruned, break_pattern, tmp_path):
    out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    broken, _, _ = break_pattern(tiny_pruned)
    with pytest.raises(PatternError, match="the pattern is broken"):
        export_onnx(broken, out)
    assert sorted(p.name for p in out.iterdir()) == before and check_path(out).ok
