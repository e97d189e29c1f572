"""SmolLM2-135M-Instruct, for real: prune -> save -> reload with plain transformers -> check -> evaluate."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from maskpro.artifacts import load_masks, read_metadata
from maskpro.cli import main
from maskpro.evaluate import perplexity
from maskpro.data import wikitext2_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(smollm2_pruned):
    return smollm2_pruned


def test_saved_folder_reloads_with_plain_transformers_and_matches_masks(pruned):
    meta = read_metadata(pruned)
    assert (meta["n"], meta["m"], meta["method"]) == (2, 4, "maskpro")
    assert len(meta["targets"]) == 210 and meta["learner"]["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32)
    masks = load_masks(pruned)
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        w = mods[name].weight
        assert torch.all(w[~mask] == 0) and mask.view(-1, 4).sum(1).eq(2).all()


def test_check_passes_then_names_a_flipped_weight(pruned, tmp_path, capsys, reseal):
    assert main(["check", "--model", str(pruned)]) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    key = "model.layers.3.mlp.down_proj.weight"
    w = tensors[key]
    row = w[7].clone()
    row[:4] = 1.0  # group 0 of row 7 now has 4 non-zeros
    w[7] = row
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert main(["check", "--model", str(broken)]) == 2  # an edit the folder's record does not know of
    assert "model.safetensors is not the file maskpro.json records" in capsys.readouterr().err
    assert main(["check", "--model", str(reseal(broken))]) == 1  # written that way: the pattern check fails
    err = capsys.readouterr().err
    assert "model.layers.3.mlp.down_proj" in err and "row 7, columns 0..3" in err


def test_eval_perplexity_of_the_pruned_model(pruned, smollm2_path, tmp_path, capsys):
    out, dense = tmp_path / "eval.json", tmp_path / "dense.json"
    args = ["--ppl", "wikitext2", "--seq-len", "256", "--max-windows", "2", "--batch-size", "1", "--zeroshot",
            "piqa", "--limit", "8", "-q"]
    assert main(["eval", "--model", str(pruned), *args, "--json", str(out)]) == 0
    assert main(["eval", "--model", str(smollm2_path), *args, "--json", str(dense)]) == 0
    res, ref = json.loads(out.read_text()), json.loads(dense.read_text())
    # the same windows through the API give the same number; pruning half the weights costs perplexity
    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32)
    from transformers import AutoTokenizer

    api = perplexity(model, AutoTokenizer.from_pretrained(str(pruned)), wikitext2_text(), seq_len=256,
                     batch_size=1, max_windows=2, progress=False)
    assert res["perplexity"]["wikitext2"] == pytest.approx(api, rel=1e-4)
    assert 1.5 * ref["perplexity"]["wikitext2"] < res["perplexity"]["wikitext2"] < 1e4
    piqa = res["zeroshot"]["piqa"]
    assert piqa["n"] == 8 and (piqa["acc"] * 8).is_integer() and (piqa["acc_norm"] * 8).is_integer()


def test_dense_perplexity_on_real_text(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    ppl = perplexity(model, tok, wikitext2_text(), seq_len=512, batch_size=1, max_windows=2, progress=False)
    assert 5 < ppl < 60
