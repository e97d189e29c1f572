"""The export bar on the real model: SmolLM2 2:4 from the learner -> check -> ONNX -> onnxruntime parity
-> vLLM checkpoint -> reload -> same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskpro.data import wikitext2_text
from maskpro.export.cli import check_main, export_main

pytestmark = pytest.mark.slow


def test_smollm2_learner_to_onnx_and_vllm(smollm2_pruned, smollm2_tokenizer, tmp_path, capsys):
    assert check_main([str(smollm2_pruned), "--quiet"]) == 0
    assert "OK: strict 2:4 on all 210 targeted layers" in capsys.readouterr().out

    onnx_dir = tmp_path / "onnx"
    assert export_main([str(smollm2_pruned), "--engine", "onnx", "--out", str(onnx_dir), "--quiet"]) == 0
    report = json.loads((onnx_dir / "export-report.json").read_text())
    parity = report["parity"]
    print(f"\nSmolLM2 ONNX parity: max abs logit error {parity['max_abs_logit_error']:.2e} "
          f"(logits up to {parity['max_logit_magnitude']:.1f}), greedy {parity['new_tokens']} tokens identical: "
          f"{parity['greedy_identical']}, export {report['total_s']} s")
    assert report["onnx_check"]["ok"] and report["onnx_check"]["layers"] == 210
    assert parity["greedy_identical"] and parity["max_abs_logit_error"] < 1e-3
    assert check_main([str(onnx_dir), "--quiet"]) == 0

    vllm_dir = tmp_path / "vllm"
    assert export_main([str(smollm2_pruned), "--engine", "vllm", "--out", str(vllm_dir), "--quiet"]) == 0
    ids = smollm2_tokenizer(wikitext2_text().strip()[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        src = AutoModelForCausalLM.from_pretrained(str(smollm2_pruned), dtype=torch.float32)(ids).logits
        out = AutoModelForCausalLM.from_pretrained(str(vllm_dir), dtype=torch.float32)(ids).logits
    assert torch.equal(src, out)
