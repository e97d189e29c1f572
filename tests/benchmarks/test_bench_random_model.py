"""maskpro-bench random-model: a stand-in model at named shapes that the checks and servers accept."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from maskpro.bench.cli import main
from maskpro.export.check import check_folder


def test_random_model_is_a_checked_2_of_4_folder_with_the_tokenizers_vocabulary(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "m"
    assert main(["random-model", "--config", "tiny", "--tokenizer", str(tiny_model_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["hidden_size"] == 64  # SmolLM2's tokenizer, tiny's shapes
    report = check_folder(out)
    assert report.ok and len(report.layers) == 14
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert (w.reshape(-1, 4) != 0).sum(1).max() == 2
    assert main(["random-model", "--config", "tiny", "--tokenizer", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "exists; pick another --out or pass --overwrite" in capsys.readouterr().err


def test_random_model_dense_keeps_every_weight(tmp_path, tiny_model_dir):
    out = tmp_path / "d"
    assert main(["random-model", "--config", "tiny", "--tokenizer", str(tiny_model_dir), "--out", str(out),
                 "--dense"]) == 0
    assert not (out / "maskpro.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert (f.get_tensor("model.layers.0.mlp.up_proj.weight") != 0).float().mean() > 0.99


@pytest.mark.parametrize("args", [["--tokenizer", "/nonexistent"], ["--config", "nope"]])
def test_random_model_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys, args):
    base = {"--config": "tiny", "--tokenizer": str(tiny_model_dir), "--out": str(tmp_path / "x")}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["random-model", *[v for kv in base.items() for v in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maskpro-bench: error:"), err
