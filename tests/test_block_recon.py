"""Block-wise reconstruction: masks stay, kept weights move, the model gets closer to dense; bad input errors."""

import json
import logging

import pytest
import torch

from maskpro.block_recon import BlockReconConfig, reconstruct_blocks
from maskpro.cli import main
from maskpro.errors import MaskproError
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM
from maskpro.oneshot import magnitude_prune


def _logit_error(model, dense_model, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - dense_model(input_ids=ids).logits).pow(2).mean())


def test_blocks_move_kept_weights_only_and_approach_dense():
    dense_model = tiny_llama(seed=1, layers=3)
    model = tiny_llama(seed=1, layers=3)
    dense = {n: m.weight.data.clone() for n, m in find_linears(dense_model).items()}
    masks = magnitude_prune(model, NM(2, 4)).masks
    pruned = {n: m.weight.data.clone() for n, m in find_linears(model).items()}
    calib = torch.randint(0, 256, (32, 128), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))
    before = _logit_error(model, dense_model, held_out)

    report = reconstruct_blocks(model, dense, masks, calib, BlockReconConfig(epochs=3, lr=3e-3, micro_batch=4),
                                batch=8,
                                progress=False)

    assert [b["block"] for b in report["blocks"]] == [0, 1, 2]
    assert all(b["mse_after"] < b["mse_before"] for b in report["blocks"])
    for n, m in find_linears(model).items():
        w = m.weight.data
        assert torch.equal(w[~masks[n]], torch.zeros_like(w[~masks[n]])), n  # pruned entries stay exactly 0
        assert not torch.equal(w, pruned[n]), n                              # kept entries were re-fitted
    assert _logit_error(model, dense_model, held_out) < 0.6 * before         # and it generalises


def test_bad_settings_and_missing_dense_weights_are_one_line_errors():
    model = tiny_llama()
    masks = magnitude_prune(model, NM(2, 4)).masks
    calib = torch.randint(0, 256, (2, 16))
    with pytest.raises(MaskproError, match="lr > 0"):
        reconstruct_blocks(model, {}, masks, calib, BlockReconConfig(lr=0))
    with pytest.raises(MaskproError, match="no layer or dense weight for model.layers.0"):
        reconstruct_blocks(model, {}, masks, calib, progress=False)


def test_cli_prunes_and_refits_blocks(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "wanda-block"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--reconstruct", "block",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--recon-epochs", "2", "--data-dir", str(data_root),
                 "--out", str(out), "-q"]) == 0
    meta = json.loads((out / "maskpro.json").read_text())
    assert meta["method"] == "wanda+block"
    assert meta["reconstructed"]["method"] == "block" and len(meta["reconstructed"]["blocks"]) == 2
    assert main(["check", "--model", str(out)]) == 0
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--reconstruct", "block",
                 "--recon-lr", "-1", "--out", str(tmp_path / "bad"), "-q"]) == 2
    assert not (tmp_path / "bad").exists()


def test_maskpro_learns_on_refitted_sparsegpt_weights_and_resumes_without_refitting(
        tiny_model_dir, data_root, tmp_path, monkeypatch, caplog, capsys):
    out, work = tmp_path / "mp-refit", tmp_path / "work"
    args = ["prune", "--model", str(tiny_model_dir), "--method", "maskpro", "--learn-on", "sparsegpt-block",
            "--init", "sparsegpt", "--batch-size", "2", "--seq-len", "16", "--n-docs", "8", "--calib-samples", "4",
            "--calib-seq-len", "64", "--recon-epochs", "1", "--data-dir", str(data_root), "--workdir", str(work),
            "--checkpoint-every", "2", "-q"]
    with caplog.at_level(logging.INFO, logger="maskpro"):
        assert main(args + ["--steps", "4", "--out", str(out)]) == 0
    phases = [r.getMessage() for r in caplog.records if r.name == "maskpro" and "done in" not in r.getMessage()]
    assert phases == ["[1/4] calibration windows", "[2/4] prior mask (sparsegpt)", "[3/4] block re-fit before learning",
                      "[4/4] MaskPro learner (4 steps)"]
    meta = json.loads((out / "maskpro.json").read_text())
    assert meta["method"] == "maskpro@sparsegpt-block" and meta["learner"]["steps"] == 4
    assert len(meta["refit_before_learning"]["blocks"]) == 2
    assert main(["check", "--model", str(out)]) == 0
    assert (work / "refit-source.safetensors").is_file()

    def no_refit(*_a, **_k):
        raise AssertionError("the resumed run re-fitted the blocks again")

    def no_prior(*_a, **_k):
        raise AssertionError("the resumed run computed the prior again")

    monkeypatch.setattr("maskpro.pipeline.reconstruct_blocks", no_refit)  # a resume reads the saved weights
    monkeypatch.setattr("maskpro.pipeline.prune", no_prior)  # ... and the saved prior
    assert main(args + ["--steps", "6", "--out", str(tmp_path / "mp-refit-6")]) == 0
    meta6 = json.loads((tmp_path / "mp-refit-6" / "maskpro.json").read_text())
    assert meta6["learner"]["steps"] == 6 and meta6["refit_before_learning"] == meta["refit_before_learning"]
    capsys.readouterr()
    # other learner settings: refused before the prior (no_prior would raise) with one line
    assert main(args + ["--steps", "6", "--lr", "7", "--out", str(tmp_path / "other")]) == 2
    assert "made with different config" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["prune", "--method", "maskpro", "--learn-on", "sparsegpt-block", "--init", "wanda",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["prune", "--method", "maskpro", "--learn-on", "sparsegpt-block", "--recon-epochs", "0",
                 "--out", str(tmp_path / "bad")]) == 2  # refused before any model is loaded
