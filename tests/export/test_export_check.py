"""maskpro-check on saved folders and ONNX files: the K dimension, transposes, and the refusal message."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maskpro.errors import MaskproError
from maskpro.export.check import check_onnx, check_path, engine_rules
from maskpro.export.cli import check_main
from maskpro.nm import NM, topn_mask


def _sparse(out_f: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(out_f, k, generator=torch.Generator().manual_seed(seed))
    return w * topn_mask(w.abs(), NM(2, 4))


def _graph(tmp_path, w_matmul: torch.Tensor, w_gemm: torch.Tensor, w_transposed: torch.Tensor):
    """x -> MatMul(B=(K,out)) -> Gemm(transB=1, B=(out,K)) -> MatMul(Transpose(W)) : three layouts of a Linear."""
    k = w_matmul.shape[1]
    inits = [numpy_helper.from_array(w_matmul.T.contiguous().numpy(), "fc1.T"),
             numpy_helper.from_array(w_gemm.numpy(), "fc2.weight"),
             numpy_helper.from_array(w_transposed.numpy(), "fc3.weight")]
    nodes = [helper.make_node("MatMul", ["x", "fc1.T"], ["h1"], name="/fc1/MatMul"),
             helper.make_node("Gemm", ["h1", "fc2.weight"], ["h2"], name="/fc2/Gemm", transB=1),
             helper.make_node("Transpose", ["fc3.weight"], ["fc3.T"], name="/fc3/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["h2", "fc3.T"], ["y"], name="/fc3/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w_transposed.shape[0]])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g), str(path))
    return path


def test_onnx_layouts_are_read_along_k(tmp_path):
    good = _graph(tmp_path, _sparse(32, 64), _sparse(48, 32, 1), _sparse(16, 48, 2))
    report = check_onnx(good, NM(2, 4))
    assert report.ok and [(l.out_features, l.in_features) for l in report.layers] == [(32, 64), (48, 32), (16, 48)]
    # The same weights read along the wrong dimension are not 2:4: the layout handling matters.
    wrong = _graph(tmp_path, _sparse(64, 32).T.contiguous(), _sparse(48, 32, 1), _sparse(16, 48, 2))
    assert not check_onnx(wrong, NM(2, 4)).ok


def test_onnx_violation_names_node_row_and_group(tmp_path):
    w = _sparse(48, 32, 1)
    w[5, 8:12] = 1.0  # row 5, third group (columns 8..11) fully dense
    path = _graph(tmp_path, _sparse(32, 64), w, _sparse(16, 48, 2))
    report = check_onnx(path, NM(2, 4))
    bad = report.first_violation
    assert (bad.layer, bad.row, bad.col, bad.count) == ("/fc2/Gemm", 5, 8, 4)
    with pytest.raises(MaskproError, match=r"/fc2/Gemm: group 42 \(row 5, columns 8..11\)"):
        report.raise_if_bad()


def test_engine_rules_flag_shapes_the_kernels_reject():
    assert engine_rules(4096, 4096) == {}
    assert "cusparselt" in engine_rules(4096, 4100)  # K not a multiple of 16
    assert "cusparselt" in engine_rules(40, 4096)


def test_folder_check_table_and_cli(tiny_pruned, capsys):
    report = check_path(tiny_pruned)
    assert report.ok and len(report.targeted) == 14  # 2 layers x 7 linears
    assert check_main([str(tiny_pruned)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "OK: strict 2:4 on all 14" in out


def test_cli_exit_codes_for_broken_and_missing(tiny_pruned, break_pattern, tmp_path, capsys):
    broken, layer, row = break_pattern(tiny_pruned)
    assert check_main([str(broken), "--quiet", "--json", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert f"{layer}: group {row * 128 // 4} (row {row}, columns 0..3) has 4 non-zeros" in err
    assert len(err.strip().splitlines()) == 1
    assert check_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
